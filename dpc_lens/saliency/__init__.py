"""The saliency engine: attention saliency captured through TransformerLens hooks.

For every requested layer ``l`` it computes (SPEC section 2; Wang et al. 2023)::

    I_l = | sum_h  A_{h,l} * dL/dA_{h,l} |

with ``A`` captured at ``blocks.{l}.attn.hook_pattern``. The gradient is taken with a *forward*
hook that registers a tensor gradient hook on the pattern (``pattern.register_hook``): backward
hooks on ``hook_pattern`` silently never fire on bridge architectures whose attention is computed
by Hugging Face (OPT, GPT-J, GPT-Neo, ...), while tensor hooks fire everywhere. A requested layer
that delivers no gradient raises :class:`~dpc_lens.errors.SaliencyError`; it is never skipped.

Reduce as you go: inside each layer's gradient hook the ``[batch, head, q, k]`` product becomes
what was asked for (segment-flow sums, per-source-token columns, per-target-token rows, or the
full ``[q, k]`` map when opted in) and is dropped, so memory does not grow with
``layers x heads x T^2`` beyond what autograd already keeps. Weights are frozen for the pass (no
weight gradients are allocated); only the input embeddings carry ``requires_grad``.

The loss (unspecified in both papers) defaults to the teacher-forced mean negative
log-likelihood of the tokens in the ``rationale`` and ``answer`` segments, given everything
before them. In a batch the per-example losses are *summed*, so each example's gradient — and
saliency — equals what it gets alone. A gold-label loss is the same NLL over a segment holding
the gold answer (``loss_segments=("answer",)``); any callable ``fn(logits, batch) -> Tensor``
(a scalar or one value per example) can replace it.

Every hook is registered inside one ``with`` block and removed on exit, also after an exception;
the caller's own hooks, parameters, ``requires_grad`` flags and training mode are left as found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint

from .. import hook_names
from .._typing import Tensor
from ..errors import InputError, SaliencyError
from ..model import as_adapter, frozen_for_saliency
from ..segments import PromptBatch, SegmentLayout, _warn_if_all_unknown
from .capture import (
    SaliencyStore,
    _all_segment_names,
    _check_batch,
    _checkpointed_blocks,
    _outside_inference_mode,
    saliency_hooks,
)
from .config import (
    LossFn,
    SaliencyConfig,
    _as_config,
    _did_you_mean,
    scored_positions,
    target_nll,
    warn_low_precision,
)
from .diagnose import diagnose
from .result import SaliencyResult

__all__ = [
    "SaliencyConfig", "SaliencyResult", "SaliencyStore", "compute_saliency", "diagnose",
    "normal_mode_bytes", "logits_bytes", "saliency_hooks", "scored_positions", "target_nll",
]


HookSpec = Sequence[tuple[Any, Callable[..., Any]]]


def _wrap_caller_hooks(
    adapter: Any, fwd_hooks: HookSpec, cuts: list[str]
) -> list[tuple[Any, Callable[..., Any]]]:
    """The caller's hooks, unchanged in what they do, each noting in ``cuts`` when it returns a
    tensor not computed from an input that needed grad (a detached patch)."""
    out = []
    try:
        hooks = list(fwd_hooks)
    except TypeError:
        raise InputError(f"fwd_hooks must be a list of (hook_name, fn) pairs, got {fwd_hooks!r}.") from None
    for item in hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])
                and (isinstance(item[0], str) or callable(item[0]))):
            raise InputError(
                f"Each of fwd_hooks must be a (hook_name, fn) pair as in TransformerLens, got "
                f"{item!r}; e.g. [('blocks.1.attn.hook_pattern', ablate_head)]."
            )
        name, fn = item
        if isinstance(name, str):
            hook_names.check_hook_names(adapter.hook_dict, [name])

        def wrapped(tensor: Any, hook: Any, _fn: Callable[..., Any] = fn, _name: Any = name) -> Any:
            res = _fn(tensor, hook=hook)
            if (isinstance(res, torch.Tensor) and isinstance(tensor, torch.Tensor)
                    and tensor.requires_grad and res.grad_fn is None and torch.is_grad_enabled()):
                cuts.append(_name if isinstance(_name, str) else hook.name)
            return res

        out.append((name, wrapped))
    return out


def _batch_from_tokens(adapter: Any, x: Any) -> PromptBatch:
    """The one-segment batch (segment ``"text"``) for text, a list of texts, or token ids."""
    if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and all(isinstance(s, str) for s in x)):
        texts = [x] if isinstance(x, str) else list(x)
        tok = adapter.tokenizer
        if tok is None:
            raise InputError("Text input needs a model with a tokenizer; pass token ids instead.")
        seqs = []
        for t in texts:
            ids = list(tok(t, add_special_tokens=False)["input_ids"])
            _warn_if_all_unknown(tok, "text", t, ids)
            bos = getattr(tok, "bos_token_id", None)
            seqs.append(([bos] if bos is not None else []) + ids)
    elif isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dim() not in (1, 2):
            raise InputError(
                f"Token ids must be an integer tensor [pos] or [batch, pos], got {x.dtype} "
                f"{tuple(x.shape)}.")
        rows = x.reshape(1, -1) if x.dim() == 1 else x
        seqs = [[int(t) for t in r] for r in rows.tolist()]
    elif isinstance(x, (list, tuple)) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x):
        seqs = [list(x)]
    elif isinstance(x, (list, tuple)) and x and all(isinstance(r, (list, tuple)) for r in x):
        seqs = [[int(t) for t in r] for r in x]
    else:
        _check_batch(x)  # raises the error that names what a batch is
        raise InputError(f"Cannot build a batch from {x!r:.60}.")
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise InputError(
                f"Example {i} has {len(s)} token(s); the next-token loss needs at least 2.")
    lays = [SegmentLayout({"text": (0, len(s))}, len(s)) for s in seqs]
    return PromptBatch.build(adapter, seqs, lays)


def compute_saliency(
    model: Any,
    batch: "PromptBatch | str | Sequence[str] | Sequence[int] | Tensor",
    config: SaliencyConfig | Mapping[str, Any] | None = None,
    *,
    fwd_hooks: HookSpec = (),
    loss_fn: LossFn | None = None,
) -> SaliencyResult:
    """One teacher-forced forward + backward over ``batch``; saliency reduced layer by layer.

    The capture is :func:`saliency_hooks`; this runs the pass with them, every hook registered
    inside one ``with`` block and the backward inside it.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (or a :class:`ModelAdapter`).
        batch: the input: a :class:`~dpc_lens.segments.PromptBatch`; or, as TransformerLens's
            ``model(tokens)`` takes it, text, a list of texts, or token ids (a list, ``[pos]`` or
            ``[batch, pos]`` tensor). Text gets the tokenizer's BOS first; token ids are used as
            given. Either becomes a batch with one segment, ``"text"``, over every position, and
            the default loss is then the mean NLL of every next token (``loss_segments`` is set
            to ``("text",)`` unless the config names other segments).
        config: a :class:`SaliencyConfig`, or a dict of its fields (default: all layers, segment
            flows between every segment).
        fwd_hooks: your own ``[(hook_name, fn), ...]`` forward hooks, run in the same pass with
            TransformerLens's names and semantics (a returned tensor replaces the activation);
            the same as wrapping the call in ``with model.hooks(fwd_hooks=...):``. They run
            before the saliency capture on a shared hook point. A hook that cuts the graph (a
            detached patch) is fine for the layers after it; a requested layer before it raises
            an error naming the hook and the layers that can be measured.
        loss_fn: ``fn(logits, batch)`` returning a scalar or one loss per example (summed);
            default :func:`target_nll` over ``config.loss_segments``, its log-softmax over the
            scored rows accumulated in float64 (``config.loss_fp64``).

    Raises:
        SaliencyError: a requested layer delivered no gradient (the message names the cause), or
            the loss is not a finite scalar / per-example vector.
    """
    config = _as_config(config)
    adapter = as_adapter(model)
    if not isinstance(batch, PromptBatch):
        batch = _batch_from_tokens(adapter, batch)
        if config.loss_segments == SaliencyConfig.loss_segments:
            config = dataclasses.replace(config, loss_segments=("text",))
    if torch.is_inference_mode_enabled():
        raise SaliencyError(
            "compute_saliency was called inside torch.inference_mode(), where no gradient can be "
            "recorded (torch.enable_grad() cannot lift it). Call it outside the inference_mode block."
        )
    batch = _outside_inference_mode(batch)
    _check_loss_segments(batch, config, loss_fn)
    warn_low_precision(adapter.dtype, config)
    fits = not _normal_mode_would_not_fit(adapter, batch, _logit_positions(adapter, batch, config, loss_fn))
    if config.memory == "blockwise" or (config.memory == "auto" and not fits):
        from .blockwise import blockwise_supported, compute_blockwise, lean_mode_bytes

        free = _free_bytes(adapter.device)
        if config.memory == "blockwise" or (
                free is not None and lean_mode_bytes(adapter, batch) > 0.8 * free
                and blockwise_supported(adapter)):
            return compute_blockwise(adapter, batch, config, _wrap_caller_hooks(adapter, fwd_hooks, []),
                                     loss_fn, free)
    lean = config.memory == "lean" or (config.memory == "auto" and not fits)
    store, hooks = saliency_hooks(model, batch, config, recompute=lean)
    cuts: list[str] = []
    mine = _wrap_caller_hooks(adapter, fwd_hooks, cuts)
    store._want_edges = True
    model_obj = adapter.model
    try:
        with frozen_for_saliency(model_obj), torch.enable_grad(), _released_patterns(adapter, during=lean):
            embeds = batch.embeds.detach().requires_grad_(True)
            recompute = _checkpointed_blocks(adapter) if lean else contextlib.nullcontext()
            with adapter.hooks(fwd_hooks=mine + hooks), recompute:
                # the default loss reads the logits of the scored positions only: unembed there
                keep = (scored_positions(batch, config.loss_segments)
                        if loss_fn is None and adapter.keeps_logits_subset else None)
                logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids,
                                                logits_at=keep)
                if not store.passes:
                    raise SaliencyError(diagnose(store))
                p = store.passes[-1]
                p.cut_by = list(dict.fromkeys(cuts))
                if loss_fn is None:
                    per_example = target_nll(logits, batch, config.loss_segments,
                                             dtype=torch.float64 if config.loss_fp64 else None,
                                             positions=keep)
                    loss = per_example.sum()
                    # the result keeps the loss at the model's precision (>= float32)
                    per_example = per_example.detach().to(torch.promote_types(logits.dtype, torch.float32))
                else:
                    raw = loss_fn(logits, batch)
                    if not isinstance(raw, torch.Tensor) or raw.dim() > 1 or (
                        raw.dim() == 1 and raw.shape[0] != batch.batch_size
                    ):
                        shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
                        raise SaliencyError(
                            f"The loss must be a scalar tensor or one value per example "
                            f"([{batch.batch_size}]); got {shape}. Reduce it (e.g. .mean() per example)."
                        )
                    per_example = raw.detach().reshape(-1) if raw.dim() == 1 else raw.detach().reshape(1)
                    loss = raw.sum()
                if not torch.isfinite(loss):
                    raise SaliencyError(
                        f"The loss is not finite ({loss.item()}); check the inputs and loss function."
                    )
                if not loss.requires_grad:
                    p.backward_ran = True
                    if p.cut_by:
                        raise SaliencyError(diagnose(store))
                    raise SaliencyError(
                        "The loss does not depend on the model's output (no gradient); a custom loss "
                        "must be computed from the logits it is given."
                    )
                # the gradient of every captured pattern (not of the input embeddings: a
                # caller's patch may make a new leaf, and autograd prunes what leads elsewhere)
                edges = [p.edges[l] for l in p.hooked if p.edges.get(l) is not None]
                if len(edges) < len(p.hooked):  # torch < 2.2 has no gradient edges
                    edges = edges + [embeds]
                p.edges.clear()
                torch.autograd.grad(loss, edges, allow_unused=True)
                p.backward_ran = True
    finally:
        store._want_edges = False
        for q in store.passes:
            q.edges.clear()
            q.patterns.clear()
    return store.result(per_example)


def _check_loss_segments(batch: PromptBatch, config: SaliencyConfig, loss_fn: Any) -> None:
    """The default loss needs, in every example, a token of some loss segment: say which
    segment is missing and which exist before any model work."""
    if loss_fn is not None:
        return
    have = _all_segment_names(batch)
    for b, lay in enumerate(batch.layouts):
        scored = [n for n in config.loss_segments
                  if n in lay.spans and lay.spans[n][1] > max(lay.spans[n][0], 1)]
        if not scored:
            nowhere = [n for n in config.loss_segments if n not in have]
            hint = "".join(
                f" Segment {n!r} exists in no example of the batch.{_did_you_mean(n, have)}" for n in nowhere)
            raise InputError(
                f"Example {b} has no token in the loss segments {list(config.loss_segments)}; it "
                f"has segments {list(lay.spans)} (the batch has {have}).{hint} The default loss "
                "is the NLL of the tokens in SaliencyConfig.loss_segments: name segments the "
                "examples have (e.g. loss_segments=('rationale',)), or pass loss_fn=."
            )


def normal_mode_bytes(adapter: Any, batch: PromptBatch) -> int:
    """Estimated attention memory a plain forward+backward keeps alive for the backward pass:
    about three ``[batch, head, T, T]`` tensors per layer (scores, pattern, and the pattern's
    saved copy for the value product), at the model's element size."""
    T = batch.seq_len
    elt = torch.finfo(adapter.dtype).bits // 8
    return 3 * adapter.n_layers * batch.batch_size * adapter.n_heads * T * T * elt


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def logits_bytes(adapter: Any, batch: PromptBatch, n_positions: int | None = None) -> int:
    """Estimated memory of a pass's logits: the ``[batch, positions, vocab]`` logits, their
    float32 log-softmax work copy and its gradient (``n_positions``: the positions unembedded,
    default all; a saliency pass with the default loss unembeds the scored ones only)."""
    n = batch.seq_len if n_positions is None else n_positions
    elt = max(torch.finfo(adapter.dtype).bits // 8, 4)
    return 3 * batch.batch_size * n * int(adapter.embedding_weight.shape[0]) * elt


def _logit_positions(adapter: Any, batch: PromptBatch, config: SaliencyConfig, loss_fn: Any) -> int | None:
    if loss_fn is None and adapter.keeps_logits_subset:
        return int(scored_positions(batch, config.loss_segments).numel())
    return None


def _normal_mode_would_not_fit(adapter: Any, batch: PromptBatch,
                               n_logit_positions: int | None = None) -> bool:
    """The normal mode's attention estimate plus the pass's logits (:func:`logits_bytes`)."""
    free = _free_bytes(adapter.device)
    need = normal_mode_bytes(adapter, batch) + logits_bytes(adapter, batch, n_logit_positions)
    return free is not None and need > 0.8 * free


_KEEPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pattern_keepers(adapter: Any) -> list[Any]:
    """Attention modules that keep their last pattern, with its graph, as ``_pattern`` after a
    forward (TransformerLens 4.3's GPT-2-family ``JointQKVAttentionBridge``); found once per
    model (walking a bridge's module tree costs ~10 ms)."""
    found = _KEEPERS.get(adapter.model)
    if found is None:
        found = _KEEPERS[adapter.model] = [m for m in adapter.model.modules() if "_pattern" in m.__dict__]
    return found


@contextlib.contextmanager
def _released_patterns(adapter: Any, *, during: bool) -> Iterator[None]:
    """Do not leave attention patterns (and their autograd graphs) alive on the model after a
    saliency pass: TL 4.3's GPT-2 attention bridge keeps every layer's last pattern, 2.4 GB idle
    at GPT-2-small, T = 2048. With ``during``, each is released right after its own forward too
    (lean mode: otherwise every layer's pattern stays alive until the pass ends)."""
    keepers = _pattern_keepers(adapter)
    handles = []
    if during:
        def release(module: Any, args: Any, output: Any) -> None:
            module.__dict__["_pattern"] = None

        handles = [m.register_forward_hook(release) for m in keepers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in keepers:
            m.__dict__["_pattern"] = None
