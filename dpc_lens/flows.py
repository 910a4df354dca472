"""Pure tensor maths of attention saliency and information flow (no model, no hooks).

Everything here is a function of tensors, so tests feed it hand-built matrices. The saliency
engine (:mod:`dpc_lens.saliency`) calls these inside its gradient hooks, layer by layer.

The saliency score is the one of Wang et al., "Label Words are Anchors" (EMNLP 2023)::

    I_l = | sum_h  A_{h,l} * dL/dA_{h,l} |

``I_l[i, j]`` is the flow from source token ``j`` (key, column) into target token ``i``
(query, row). A segment flow is a mean (or sum) of ``I_l`` over the pairs ``(i, j)`` with
``i`` in the target segment, ``j`` in the source segment and ``j < i`` (``j <= i`` when the
diagonal is kept).

Shapes use TransformerLens's axis words. A leading ``...`` axis is either nothing or
``head_index`` (per-head output).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._typing import Float, Tensor
from .errors import InputError

__all__ = [
    "saliency_map",
    "pair_mask",
    "segment_flow_sums",
    "segment_pair_counts",
    "layer_pair_counts",
    "flow_mean",
    "flow_proportions",
    "column_scores",
    "row_scores",
    "row_totals",
]


def saliency_map(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    grad: Float[Tensor, "*grad_shape"],  # must equal pattern's shape: checked below with a clear error
    *,
    per_head: bool = False,
    signed: bool = False,
    include_diagonal: bool = False,
    fp32: bool = True,
) -> Float[Tensor, "batch ... query_pos key_pos"]:
    """``I = |sum_h A ⊙ dL/dA|`` for one layer (Wang et al. 2023, eq. 1).

    Args:
        pattern: post-softmax attention ``A``.
        grad: ``dL/dA``, same shape.
        per_head: keep the head axis (no head sum); the abs is then taken per head.
        signed: skip the absolute value.
        include_diagonal: keep ``I[i, i]``; by default it is zeroed, as in the reference
            implementation, so self-flow never enters flow means.
        fp32: accumulate in at least float32 (bf16/fp16 models; float64 stays float64).

    Returns ``[batch, query_pos, key_pos]``, or ``[batch, head_index, query_pos, key_pos]``
    with ``per_head``. Entries above the diagonal are exactly zero (``A`` is zero there).
    """
    if pattern.shape != grad.shape:
        raise InputError(
            f"pattern and grad must have the same shape, got {tuple(pattern.shape)} and "
            f"{tuple(grad.shape)}."
        )
    n_heads = pattern.shape[1]
    # fp32 accumulation for bf16/fp16 models; a float64 model keeps float64
    dtype = torch.promote_types(pattern.dtype, torch.float32) if fp32 else pattern.dtype
    if per_head:
        out = pattern.to(dtype) * grad.to(dtype)
    else:
        # one fused pass over the heads (no [batch, head, q, k] temporary)
        out = pattern[:, 0].to(dtype) * grad[:, 0].to(dtype)
        for h in range(1, n_heads):
            out.addcmul_(pattern[:, h].to(dtype), grad[:, h].to(dtype))
    if not signed:
        out.abs_()
    if not include_diagonal:
        out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


def pair_mask(n_pos: int, *, include_diagonal: bool = False, device=None,
              window: int | None = None) -> Tensor:
    """``[query_pos, key_pos]`` float mask of the pairs that count: ``j < i`` (or ``j <= i``).

    ``window``: a sliding-window layer's size ``W`` (Hugging Face's rule: query ``i`` sees key
    ``j`` when ``i - W < j <= i``); the pairs ``i - j >= W`` then never carry saliency and do not
    count. ``None``: a global (full causal) layer."""
    offset = 0 if include_diagonal else -1
    m = torch.ones(n_pos, n_pos, device=device).tril(offset)
    if window is not None:
        if int(window) < 1:
            raise InputError(f"window={window!r} must be a positive int (the sliding window size).")
        m = m.triu(-(int(window) - 1))
    return m


def segment_flow_sums(
    saliency: Float[Tensor, "batch ... query_pos key_pos"],
    segment_masks: Float[Tensor, "batch segment pos"],
) -> Float[Tensor, "batch ... target source"]:
    """``S[b, t, s] = sum_{i in T_t, j in S_s} I[b, i, j]`` for every ordered segment pair.

    ``segment_masks[b, n, p]`` is 1 where position ``p`` belongs to segment ``n`` of example
    ``b``. Only pairs inside the causal triangle carry saliency, so no extra mask is needed when
    the map came from :func:`saliency_map` (it is zero above and, by default, on the diagonal).
    The result is indexed ``[target, source]``: row = where the flow goes.
    """
    m = segment_masks.to(saliency.dtype)
    if saliency.dim() == 4:  # per head: broadcast the masks over the head axis
        m = m.unsqueeze(1)
    return (m @ saliency) @ m.transpose(-1, -2)


def segment_pair_counts(
    segment_masks: Float[Tensor, "batch segment pos"], *, include_diagonal: bool = False,
    window: int | None = None,
) -> Float[Tensor, "batch target source"]:
    """``C[b, t, s]``: the number of pairs ``(i, j)``, ``i in T_t``, ``j in S_s``, ``j < i``.

    With ``include_diagonal`` the pairs ``j <= i`` count; with ``window`` (a sliding-window
    layer) only the pairs ``i - j < window``. A zero count means the flow is undefined (for
    example question->soft, which the causal mask forbids).
    """
    m = segment_masks.float()
    pm = pair_mask(m.shape[-1], include_diagonal=include_diagonal, device=m.device, window=window)
    return torch.einsum("btq,qk,bsk->bts", m, pm, m)


def layer_pair_counts(
    segment_masks: Float[Tensor, "batch segment pos"],
    windows: Sequence[int | None],
    *,
    include_diagonal: bool = False,
) -> Float[Tensor, "layer batch target source"] | None:
    """Per-layer pair counts, each layer's under its own attention mask (``windows[l]``: the
    sliding window of the ``l``-th measured layer, ``None`` for a global layer). ``None`` when
    no layer has a window (every layer then counts the causal pairs of
    :func:`segment_pair_counts`)."""
    if all(w is None for w in windows):
        return None
    by_window = {w: segment_pair_counts(segment_masks, include_diagonal=include_diagonal, window=w)
                 for w in dict.fromkeys(windows)}
    return torch.stack([by_window[w] for w in windows])


def flow_mean(
    sums: Float[Tensor, "*shape target source"], counts: Float[Tensor, "*cshape target source"]
) -> Float[Tensor, "*shape target source"]:
    """``sums / counts`` where ``counts > 0``, NaN where the flow is undefined (count 0)."""
    counts = counts.to(sums.dtype)
    while counts.dim() < sums.dim():  # broadcast over layer / head axes
        counts = counts.unsqueeze(-3)
    out = sums / counts.clamp(min=1)
    return out.masked_fill(counts == 0, float("nan"))


def flow_proportions(flows: Mapping[str, Tensor], names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Per-layer proportions: ``p_k = flow_k / sum_{k'} flow_k'`` over the chosen flows.

    This is how Wang et al. plot flows: for each layer (and example) the chosen flows sum to 1.
    ``flows`` maps a name such as ``"soft->rationale"`` to a tensor of any common shape
    (e.g. ``[layer]`` or ``[layer, batch]``). Where every flow is zero the proportions are NaN.
    """
    names = list(names) if names is not None else list(flows)
    if not names:
        raise InputError("flow_proportions needs at least one flow name.")
    missing = [n for n in names if n not in flows]
    if missing:
        raise InputError(f"Unknown flows {missing}; available: {sorted(flows)}.")
    # float64 flows stay float64 (lower precisions are promoted to float32, never demoted)
    dtype = torch.float32
    for n in names:
        dtype = torch.promote_types(dtype, flows[n].dtype)
    stacked = torch.stack([flows[n].to(dtype) for n in names])
    total = stacked.sum(0, keepdim=True)
    props = stacked / total
    props = torch.where(total == 0, torch.full_like(props, float("nan")), props)
    return {n: props[i] for i, n in enumerate(names)}


def column_scores(
    saliency: Float[Tensor, "batch ... query_pos key_pos"],
    target_mask: Float[Tensor, "batch query_pos"],
    *,
    row_normalize: bool = False,
    row_total: Float[Tensor, "batch ... query_pos"] | None = None,
) -> Float[Tensor, "batch ... key_pos"]:
    """Per-source-token column score ``c_j = sum_{i in T} I[i, j]`` (SPEC section 3, step 3).

    With ``row_normalize`` each row is first divided by its incoming total
    ``sum_j' I[i, j']`` (its share of the row's flow; rows with zero total contribute zero), so
    a high-loss generation does not dominate (SPEC section 3, "Measured on a small model").
    """
    w = target_mask.to(saliency.dtype)
    if saliency.dim() == 4:
        w = w.unsqueeze(1)  # broadcast over heads
    if row_normalize:
        total = row_totals(saliency) if row_total is None else row_total
        safe = torch.where(total > 0, total, torch.ones_like(total))
        w = torch.where(total > 0, w / safe, torch.zeros_like(w))
    return (w.unsqueeze(-2) @ saliency).squeeze(-2)


def row_scores(
    saliency: Float[Tensor, "batch ... query_pos key_pos"],
    source_mask: Float[Tensor, "batch key_pos"],
) -> Float[Tensor, "batch ... query_pos"]:
    """Per-target-token incoming flow from a source set: ``r_i = sum_{j in S} I[i, j]``."""
    w = source_mask.to(saliency.dtype)
    if saliency.dim() == 4:
        w = w.unsqueeze(1)
    return (saliency @ w.unsqueeze(-1)).squeeze(-1)


def row_totals(
    saliency: Float[Tensor, "batch ... query_pos key_pos"],
) -> Float[Tensor, "batch ... query_pos"]:
    """The whole incoming flow of each target row, ``sum_j I[i, j]``."""
    return saliency.sum(-1)
