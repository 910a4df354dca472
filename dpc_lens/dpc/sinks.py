"""Attention sinks among the soft tokens, found from what a sink *is*, wherever it sits.

An attention sink is a position that takes a large, content-independent share of the attention
of every later token (Xiao et al. 2023, "Efficient streaming language models with attention
sinks"), usually with a residual-stream norm far above a typical token's (Sun et al. 2024,
"Massive activations"). Sinks usually sit at position 0, but prompt tuning can make any soft row
one: on the shipped SmolLM2 test bed soft row 2 takes 0.40-0.56 of the attention of the question
and rationale in layers 3-10, against about 0.005 for a typical token (issue 19). DPC's column
score follows attention received, so an argmax over columns then finds the sink on every
question. This module measures both signatures and says which soft positions are sinks; the
detector's sink policy (``exclude``, ``normalize``, ``keep``) then applies to those positions
(:class:`~dpc_lens.dpc.DetectorConfig`, ``sink_source="detected"``).

Pure functions of small tensors, except :func:`measure_sink_inputs`, which runs one no-grad
forward with its own hooks on ``hook_pattern`` and ``hook_resid_pre`` (every hook inside one
``with`` block, removed on exit) and reduces each layer at once.

Definitions, for one sequence, layer l, queries Q (question and rationale positions)::

    received[l, j] = mean_h mean_{i in Q, i > j} A_l[h, i, j]     (the share of a query's
                     attention that goes to key j, over the queries that can see j)
    typical[l]     = median_j received[l, j]   over every key seen by at least one query
    attention multiple[l, j] = received[l, j] / typical[l]

    residual multiple[l, j] = ||resid_pre_l[j]|| / median_k ||resid_pre_l[k]||   (all positions)

A soft position is a sink over a layer set S when ``mean_{l in S} attention multiple[l, j] >=
attention_threshold``, or (when a residual threshold is given) ``mean_{l in S} residual
multiple[l, j] >= residual_threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._typing import Float, Tensor
from ..errors import InputError

__all__ = [
    "SINK_ATTENTION_THRESHOLD",
    "attention_received",
    "relative_to_typical",
    "residual_multiple",
    "detect_sinks",
    "sinks_by_band",
    "sink_hooks",
    "measure_sink_inputs",
]

#: Default attention-multiple threshold: a sink takes at least 10x a typical token's share.
#: Measured on SmolLM2 (issue 19): the trained sink row takes ~100x (0.40-0.56 vs 0.005) and the
#: untrained init's row ~5x (0.023), so 10 separates a sink from an ordinary early token.
SINK_ATTENTION_THRESHOLD = 10.0


def _check_float(t: Any, name: str, ndim: int, dims: str) -> Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != ndim:
        got = f"{type(t).__name__} {tuple(t.shape) if isinstance(t, torch.Tensor) else ''}"
        raise InputError(f"{name} must be a floating-point tensor of shape [{dims}], got {got}.")
    return t.detach().to("cpu", torch.float64)


def attention_received(
    pattern: Float[Tensor, "layer head query key"],
    queries: Sequence[int],
) -> Float[Tensor, "layer key"]:
    """``received[l, j] = mean_h mean_{i in queries, i > j} pattern[l, h, i, j]``.

    ``pattern`` is the post-softmax attention of ONE sequence (no padding), ``queries`` the
    positions whose attention is counted. Keys no counted query can see are ``nan``.

    Raises:
        InputError: wrong rank, no query, a query outside the sequence.
    """
    p = _check_float(pattern, "pattern", 4, "layer head query key")
    n_q, n_k = p.shape[2], p.shape[3]
    q = sorted({int(i) for i in queries})
    if not q:
        raise InputError("attention_received: no query position given; pass the question and "
                         "rationale positions.")
    if q[0] < 0 or q[-1] >= n_q:
        raise InputError(f"attention_received: query positions {q[0]}..{q[-1]} are outside the "
                         f"pattern's {n_q} query positions.")
    heads = p.mean(dim=1)  # [layer, query, key]
    qi = torch.tensor(q)
    keys = torch.arange(n_k)
    sees = (qi[:, None] > keys[None, :]).to(torch.float64)  # [Q, key]: strictly later queries
    total = (heads[:, qi, :] * sees[None]).sum(dim=1)  # [layer, key]
    count = sees.sum(dim=0)  # [key]
    out = total / count.clamp(min=1.0)
    out[:, count == 0] = math.nan
    return out


def relative_to_typical(received: Float[Tensor, "layer key"]) -> Float[Tensor, "layer key"]:
    """Each key's received share as a multiple of the layer's typical token:
    ``received[l, j] / nanmedian_j received[l, j]`` (``nan`` keys stay ``nan``).

    Raises:
        InputError: a layer with no defined key, or a typical share of 0.
    """
    r = _check_float(received, "received", 2, "layer key")
    typical = torch.nanmedian(r, dim=1).values
    if bool(torch.isnan(typical).any()) or bool((typical <= 0).any()):
        raise InputError("relative_to_typical: a layer has no key with positive attention "
                         "received; the typical token's share is undefined there.")
    return r / typical[:, None]


def residual_multiple(norms: Float[Tensor, "layer pos"]) -> Float[Tensor, "layer pos"]:
    """``norms[l, j] / median_k norms[l, k]``: each position's residual-stream norm as a
    multiple of the layer's median (pass ``||resid_pre_l[j]||`` of one sequence)."""
    n = _check_float(norms, "norms", 2, "layer pos")
    med = n.median(dim=1).values
    if bool((med <= 0).any()):
        raise InputError("residual_multiple: a layer's median residual norm is 0.")
    return n / med[:, None]


def detect_sinks(
    attention_multiple: Float[Tensor, "layer soft"],
    layers: Sequence[int],
    threshold: float = SINK_ATTENTION_THRESHOLD,
    residual: Float[Tensor, "layer soft"] | None = None,
    residual_threshold: float | None = None,
) -> tuple[int, ...]:
    """Soft positions that are sinks over ``layers`` (see the module docstring), ascending.

    ``attention_multiple`` and ``residual`` are ``[layer, soft]`` multiples of a typical token
    (:func:`relative_to_typical`, :func:`residual_multiple`) for the soft positions.
    """
    a = _check_float(attention_multiple, "attention_multiple", 2, "layer soft")
    chosen = [int(x) for x in layers]
    if not chosen or min(chosen) < 0 or max(chosen) >= a.shape[0]:
        raise InputError(f"detect_sinks: layers {chosen} must be a non-empty list inside "
                         f"0..{a.shape[0] - 1}.")
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise InputError(f"detect_sinks: threshold={threshold!r} must be a number > 0.")
    hit = a[chosen].mean(dim=0) >= float(threshold)
    if residual is not None and residual_threshold is not None:
        r = _check_float(residual, "residual", 2, "layer soft")
        if r.shape != a.shape:
            raise InputError(f"detect_sinks: residual has shape {tuple(r.shape)}, attention "
                             f"{tuple(a.shape)}; both are [layer, soft].")
        hit = hit | (r[chosen].mean(dim=0) >= float(residual_threshold))
    return tuple(int(j) for j in torch.nonzero(hit).flatten().tolist())


def sinks_by_band(
    attention_multiple: Float[Tensor, "layer soft"],
    threshold: float = SINK_ATTENTION_THRESHOLD,
    n_bands: int = 3,
) -> list[dict[str, Any]]:
    """The sinks of each band of layers: the layers cut into ``n_bands`` contiguous, near-equal
    bands (``early``, ``middle``, ``late`` for 3), each with its layers, the sinks over those
    layers (:func:`detect_sinks`) and each sink's mean attention multiple there."""
    a = _check_float(attention_multiple, "attention_multiple", 2, "layer soft")
    n_layers = a.shape[0]
    n_bands = max(1, min(int(n_bands), n_layers))
    names = ("early", "middle", "late") if n_bands == 3 else tuple(f"band{b}" for b in range(n_bands))
    out = []
    for b in range(n_bands):
        lo, hi = (b * n_layers) // n_bands, ((b + 1) * n_layers) // n_bands
        layers = list(range(lo, hi))
        sinks = detect_sinks(a, layers, threshold)
        mean = a[layers].mean(dim=0)
        out.append({"band": names[b], "layers": layers, "sinks": list(sinks),
                    "multiple": {str(j): float(mean[j]) for j in sinks}})
    return out


def sink_hooks(n_layers: int) -> tuple[dict[str, dict[int, Tensor]], list[tuple[str, Any]]]:
    """``(store, hooks)``: forward hooks that keep, per layer, the head-mean attention pattern
    (``store["pattern"][l]``, ``[batch, query, key]``) and the residual norm entering the block
    (``store["norm"][l]``, ``[batch, pos]``), on the CPU in float32."""
    from .. import hook_names

    store: dict[str, dict[int, Tensor]] = {"pattern": {}, "norm": {}}

    def keep_pattern(t: Tensor, *, hook: Any) -> None:
        store["pattern"][int(hook.name.split(".")[1])] = t.detach().float().mean(dim=1).cpu()

    def keep_norm(t: Tensor, *, hook: Any) -> None:
        store["norm"][int(hook.name.split(".")[1])] = t.detach().float().norm(dim=-1).cpu()

    hooks = [(hook_names.pattern(layer), keep_pattern) for layer in range(n_layers)]
    hooks += [(hook_names.resid_pre(layer), keep_norm) for layer in range(n_layers)]
    return store, hooks


def measure_sink_inputs(
    adapter: Any,
    sequences: Sequence[Sequence[int]],
    layouts: Sequence[Any],
    soft: Any,
    *,
    batch_size: int = 8,
) -> list[tuple[Tensor, Tensor]]:
    """Per sequence, ``(attention multiple, residual multiple)`` of its soft positions, each
    ``[layer, soft]`` float64, from one no-grad forward per batch.

    ``layouts`` are the token layouts (``question`` and ``rationale`` spans, soft prompt not
    counted), as :func:`dpc_lens.dpc.analyse` builds them. The hooks keep each layer's head-mean
    pattern of the batch only (``batch x query x key`` floats per layer, on the CPU), live in one
    ``with`` block and are removed when it exits, also on error. Cost: one forward per batch.
    """
    from .. import hook_names
    from ..segments import PromptBatch

    n_layers = adapter.n_layers
    store, hooks = sink_hooks(n_layers)
    hook_names.check_hook_names(adapter.hook_dict, [h for h, _ in hooks])
    pats, norms = store["pattern"], store["norm"]
    out: list[tuple[Tensor, Tensor]] = []
    for s in range(0, len(sequences), batch_size):
        seqs, lays = list(sequences[s:s + batch_size]), list(layouts[s:s + batch_size])
        batch = PromptBatch.build(adapter, seqs, lays, soft)
        pats.clear()
        norms.clear()
        with torch.no_grad(), adapter.hooks(fwd_hooks=hooks):
            adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
        for b, lay in enumerate(batch.layouts):
            pad = batch.pad_lengths[b]
            s0, s1 = lay.spans["soft"]
            q = [i - pad for name in ("question", "rationale") if name in lay.spans
                 for i in range(*lay.spans[name])]
            pat = torch.stack([pats[layer][b, pad:, pad:] for layer in range(n_layers)])[:, None]
            att = relative_to_typical(attention_received(pat, q))[:, s0 - pad:s1 - pad]
            nrm = torch.stack([norms[layer][b, pad:] for layer in range(n_layers)])
            res = residual_multiple(nrm)[:, s0 - pad:s1 - pad]
            out.append((att.contiguous(), res.contiguous()))
    return out
