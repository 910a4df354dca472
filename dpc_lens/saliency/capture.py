"""The eager capture on ``hook_pattern`` (normal and lean memory): the hooks and the store that
reduces each layer's saliency inside its gradient hook, pass by pass."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

from .. import flows as F
from .. import hook_names
from .._typing import Tensor
from ..errors import InputError, SaliencyError
from ..model import as_adapter
from ..segments import PromptBatch
from .config import SaliencyConfig, _as_config, _did_you_mean
from .diagnose import _other_hooks, diagnose
from .result import SaliencyResult

__all__ = ["SaliencyStore", "saliency_hooks"]


class _Pass:
    """What one forward (+ backward) through a store's hooks recorded."""

    def __init__(self, index: int, batch: PromptBatch, masks: "_Masks") -> None:
        self.index = index
        self.batch = batch
        self.masks = masks
        self.hooked: list[int] = []  # layers whose capture hook fired, in firing order
        self.on_graph: list[int] = []  # ... whose pattern required grad by itself
        self.leafed: list[int] = []  # ... whose pattern was made a graph leaf here
        self.patterns: dict[int, Tensor] = {}
        self.edges: dict[int, Any] = {}  # gradient edges, only while compute_saliency runs
        self.per_layer: dict[int, dict[str, Tensor]] = {}
        self.backward_ran = False
        self.cut_by: list[str] = []  # caller hooks seen returning a tensor cut from its input
        self.other_hooks: list[str] = []  # other hooks registered on the model during the pass


@dataclass(frozen=True)
class _Masks:
    names: tuple[str, ...]
    seg: Tensor
    targets: Tensor | None
    sources: Tensor | None


class SaliencyStore:
    """What :func:`saliency_hooks` collects, pass by pass, layer by layer.

    Each forward that runs through the hooks with gradients on starts a new *pass*; its
    ``[batch, head, q, k]`` products are reduced inside the gradient hooks to what the config
    asked for (segment flow sums, column and row scores). :meth:`result` is the latest pass,
    :meth:`results` every pass in order, so one ``(store, hooks)`` pair can be reused over a loop
    of batches. Give each new batch with :meth:`set_batch` before its pass (a pass whose pattern
    does not fit the current batch raises). Forwards with gradients off (``torch.no_grad()``,
    ``generate()``, ``torch.inference_mode()``) leave the hooks inert: they record nothing.
    """

    def __init__(self, config: SaliencyConfig, layers: list[int], names: list[str] | None,
                 batch: PromptBatch, adapter: Any = None) -> None:
        self.config = config
        self.layers = list(layers)
        self.adapter = adapter
        self.passes: list[_Pass] = []
        self.gradless_forwards = 0  # forwards with gradients off since the last pass began
        self._gradless_inference = False
        self._want_edges = False
        self._hook_names: list[str] = []
        self.set_batch(batch)

    # ------------------------------------------------------------ batches
    def set_batch(self, batch: PromptBatch) -> None:
        """Use ``batch`` for the next passes (segment masks are built from its layouts)."""
        batch = _outside_inference_mode(_check_batch(batch))
        cfg = self.config
        names = list(cfg.flow_segments) if cfg.flow_segments is not None else _all_segment_names(batch)
        for group in (cfg.flow_segments, cfg.column_targets, cfg.row_sources):
            for n in group or ():
                if not any(n in lay.spans for lay in batch.layouts):
                    raise InputError(
                        f"Segment {n!r} appears in no example of the batch; the batch has "
                        f"{_all_segment_names(batch)}.{_did_you_mean(n, _all_segment_names(batch))}"
                    )
        self.batch = batch
        self.names = names
        self._fingerprint: tuple[PromptBatch, Tensor] | None = None  # see saliency_hooks
        self._masks = _Masks(
            tuple(names), batch.segment_masks(names),
            batch.union_mask(cfg.column_targets) if cfg.column_targets else None,
            batch.union_mask(cfg.row_sources) if cfg.row_sources else None,
        )

    def clear(self) -> None:
        """Forget every pass so far (a long loop that keeps full maps can call it after reading
        each pass's :meth:`result`); the batch and the hooks stay as they are."""
        self.passes.clear()
        self.gradless_forwards = 0

    @property
    def n_passes(self) -> int:
        """How many passes (forwards with gradients on) have run through the hooks."""
        return len(self.passes)

    @property
    def per_layer(self) -> dict[int, dict[str, Tensor]]:
        """The latest pass's reductions per layer (empty before any pass)."""
        return self.passes[-1].per_layer if self.passes else {}

    def _start_pass(self) -> _Pass:
        if self.passes:  # a pass that never got its backward keeps no pattern alive
            self.passes[-1].patterns.clear()
            self.passes[-1].edges.clear()
        p = _Pass(len(self.passes), self.batch, self._masks)
        if self.adapter is not None:
            p.other_hooks = _other_hooks(self.adapter, set(self._hook_names))
        self.passes.append(p)
        self.gradless_forwards = 0
        return p

    # ------------------------------------------------------------ results
    def result(self, loss: Tensor | None = None) -> SaliencyResult:
        """The :class:`SaliencyResult` of the latest pass (``loss``: one value per example, kept
        in the result; default NaN).

        Raises:
            SaliencyError: no pass ran yet, or a hooked layer delivered no gradient; the message
                names the cause (see :func:`diagnose`).
        """
        if not self.passes:
            raise SaliencyError(diagnose(self))
        return self._result_of(self.passes[-1], loss)

    def results(self) -> list[SaliencyResult]:
        """One :class:`SaliencyResult` per pass, in order (losses NaN)."""
        if not self.passes:
            raise SaliencyError(diagnose(self))
        return [self._result_of(p, None) for p in self.passes]

    def _result_of(self, p: _Pass, loss: Tensor | None) -> SaliencyResult:
        msg = diagnose(self, p)
        if msg is not None:
            raise SaliencyError(msg)
        layers, store = self.layers, p.per_layer

        def stack(key: str) -> Tensor | None:
            if key not in store[layers[0]]:
                return None
            # layers split over devices (device_map) are reduced where they run, gathered here
            home = store[layers[0]][key].device
            return torch.stack([store[l][key].to(home) for l in layers]).detach()

        if loss is None:
            loss = torch.full((p.batch.batch_size,), float("nan"))
        loss = loss.detach()
        return SaliencyResult(
            config=self.config,
            layers=tuple(layers),
            segment_names=p.masks.names,
            layouts=p.batch.layouts,
            flow_sums=stack("flow_sums"),
            pair_counts=F.segment_pair_counts(p.masks.seg, include_diagonal=self.config.include_diagonal),
            layer_pair_counts=_layer_pair_counts(self, p),
            loss=loss.to(torch.promote_types(loss.dtype, torch.float32)),
            column_sums=stack("column_sums"),
            column_shares=stack("column_shares"),
            row_sums=stack("row_sums"),
            row_totals=stack("row_totals"),
            full=stack("full"),
            tokens=_token_strings(self.adapter, p.batch),
        )

    def __repr__(self) -> str:
        return (f"SaliencyStore(layers={self.layers}, passes={self.n_passes}, "
                f"batch={self.batch.batch_size}x{self.batch.seq_len}, segments={self.names})")


def _layer_pair_counts(store: SaliencyStore, p: _Pass) -> Tensor | None:
    """Per measured layer, the pairs under that layer's own mask (sliding windows), or ``None``
    when every measured layer is global."""
    if store.adapter is None:
        return None
    all_windows = store.adapter.attention_windows
    return F.layer_pair_counts(p.masks.seg, [all_windows[l] for l in store.layers],
                               include_diagonal=store.config.include_diagonal)


def _check_batch(batch: Any) -> PromptBatch:
    if not isinstance(batch, PromptBatch):
        raise InputError(
            f"saliency needs a PromptBatch as its batch, got {type(batch).__name__}"
            f"{' ' + repr(batch)[:60] if isinstance(batch, (str, dict)) else ''}. Build one first, "
            "e.g. PromptBatch.from_pieces(model, [[('bos', [tok.bos_token_id]), ('question', text)]], "
            "soft_prompt), or pass text / token ids to compute_saliency."
        )
    return batch


def _outside_inference_mode(batch: PromptBatch) -> PromptBatch:
    """A batch built under ``torch.inference_mode()`` holds inference tensors, which autograd
    cannot save; outside inference mode they are cloned into ordinary tensors (same values)."""
    fields_ = ("embeds", "attention_mask", "position_ids", "token_ids")
    if not any(getattr(batch, f).is_inference() for f in fields_) or torch.is_inference_mode_enabled():
        return batch
    return dataclasses.replace(batch, **{f: getattr(batch, f).clone() for f in fields_})


def _token_strings(adapter: Any, batch: PromptBatch) -> tuple[tuple[str, ...], ...] | None:
    """Per example, a readable string per padded position: the token's text, ``<soft k>`` on
    soft-prompt positions and ``""`` on pads (None without a tokenizer)."""
    tok = getattr(adapter, "tokenizer", None) if adapter is not None else None
    if tok is None:
        return None
    ids = batch.token_ids.detach().cpu().tolist()
    unique = sorted({t for row in ids for t in row if t >= 0})
    text = dict(zip(unique, tok.batch_decode([[t] for t in unique]))) if unique else {}
    out = []
    for b, row in enumerate(ids):
        pad = batch.pad_lengths[b]
        strs = []
        for pos, t in enumerate(row):
            if pos < pad:
                strs.append("")
            elif t < 0:
                strs.append(f"<soft {pos - pad}>")
            else:
                strs.append(text[t])
        out.append(tuple(strs))
    return tuple(out)


def saliency_hooks(
    model: Any,
    batch: PromptBatch,
    config: SaliencyConfig | Mapping[str, Any] | None = None,
    *,
    recompute: bool = False,
) -> tuple[SaliencyStore, list[tuple[str, Callable[..., Any]]]]:
    """The saliency capture as plain hooks: ``(store, hooks)``, reusable over many passes.

    ``hooks`` are ``(hook_name, fn)`` forward hooks on ``blocks.{l}.attn.hook_pattern``; each
    registers a tensor gradient hook on the pattern (backward hooks on ``hook_pattern`` do not
    fire on some bridge architectures), and the gradient hook reduces
    ``I_l = |sum_h A_{h,l} * dL/dA_{h,l}|`` at once into ``store``. Use them as any
    TransformerLens hooks, with your own or with :func:`~dpc_lens.patching.soft_row_hooks`::

        store, hooks = saliency_hooks(model, batch, cfg)
        with model.hooks(fwd_hooks=hooks + my_hooks):
            logits = model(batch.embeds, attention_mask=batch.attention_mask)  # or run_with_hooks
            target_nll(logits, batch, cfg.loss_segments).sum().backward()
        res = store.result()

    Saliency does not depend on how the caller set up autograd: when a pattern does not require
    grad by itself (frozen weights, input embeddings without grad, a detached patch upstream),
    the capture hook makes it a graph leaf that requires grad and hands it on, so the gradient of
    the loss still reaches it. With gradients off (``torch.no_grad()``, ``generate()``,
    ``torch.inference_mode()``) the hooks are inert: leftover hooks do not change generation.

    Each forward with gradients on is a new pass: :meth:`SaliencyStore.result` is the latest,
    :meth:`SaliencyStore.results` all of them. For a loop over batches call
    ``store.set_batch(next_batch)`` before each pass (a pattern whose shape does not fit the
    store's batch raises). When a layer delivers no gradient the error names the cause
    (:func:`diagnose`). The backward must run while the hooks are registered.

    Under activation checkpointing (blocks recomputed during the backward) a layer's hook fires
    again inside the backward: that firing only hands its pattern to the gradient hook (never a
    second hook, never a double count). ``recompute=True`` says the forward runs under
    checkpointing, so the first firing keeps no reference to the pattern (the recomputed one is
    used and dropped after its layer is reduced): that is what keeps memory at one block's graph.
    """
    _check_batch(batch)
    config = _as_config(config)
    adapter = as_adapter(model)
    layers = config.resolved_layers(adapter.n_layers, adapter.attention_windows)
    hook_list = [hook_names.pattern(l) for l in layers]
    hook_names.check_hook_names(adapter.hook_dict, hook_list)
    store = SaliencyStore(config, layers, None, batch, adapter)
    store._hook_names = hook_list
    layer_of = {hook_names.pattern(l): l for l in layers}

    def reduce(p: _Pass, layer: int, pattern: Tensor, grad: Tensor) -> None:
        m = p.masks
        I = F.saliency_map(pattern, grad, per_head=config.per_head, signed=config.signed,
                           include_diagonal=config.include_diagonal, fp32=config.fp32)
        out: dict[str, Tensor] = {"flow_sums": F.segment_flow_sums(I, m.seg.to(I.device))}
        if m.sources is not None or m.targets is not None:
            total = F.row_totals(I)
        if m.sources is not None:
            out["row_sums"] = F.row_scores(I, m.sources.to(I.device))
            out["row_totals"] = total
        if m.targets is not None:
            tm = m.targets.to(I.device)
            out["column_sums"] = F.column_scores(I, tm)
            out["column_shares"] = F.column_scores(I, tm, row_normalize=True, row_total=total)
        if config.keep_full:
            out["full"] = I
        p.per_layer[layer] = out

    def capture(pattern: Tensor, hook: Any) -> Tensor | None:
        layer = layer_of[hook.name]
        if not torch.is_grad_enabled():  # no_grad, generate(), inference_mode: inert
            store.gradless_forwards += 1
            store._gradless_inference = torch.is_inference_mode_enabled()
            return None
        cur = store.passes[-1] if store.passes else None
        in_backward = _in_backward(recompute)
        if in_backward and cur is not None and layer in cur.hooked:
            # the recomputation of a checkpointed block: hand over its pattern
            cur.patterns[layer] = pattern.detach()
            return None if pattern.requires_grad else pattern.detach().requires_grad_(True)
        if cur is None or layer in cur.hooked or cur.batch is not store.batch:
            cur = store._start_pass()
        B, T = cur.batch.batch_size, cur.batch.seq_len
        if pattern.dim() != 4 or pattern.shape[0] != B or pattern.shape[-1] != T or pattern.shape[-2] != T:
            raise SaliencyError(
                f"The saliency hook of layer {layer} saw an attention pattern of shape "
                f"{tuple(pattern.shape)}, but the store's batch needs [{B}, head, {T}, {T}]. If "
                "saliency hooks are still registered during generation or another forward (hooks "
                "added with model.add_hook stay until model.reset_hooks()), remove them, or "
                "register them only inside `with model.hooks(fwd_hooks=hooks):`. To reuse the "
                "hooks on another batch, call store.set_batch(batch) before its pass."
            )
        cur.hooked.append(layer)
        out = None
        if pattern.requires_grad:
            cur.on_graph.append(layer)
            p = pattern
        else:  # nothing upstream needs grad: the pattern becomes a leaf the loss depends on
            p = out = pattern.detach().requires_grad_(True)
            cur.leafed.append(layer)
        if not recompute:
            cur.patterns[layer] = p.detach()
        if store._want_edges:
            edge = getattr(torch.autograd.graph, "get_gradient_edge", None)  # torch >= 2.2
            cur.edges[layer] = edge(p) if edge is not None else (p if p.is_leaf else None)

        def on_grad(grad: Tensor, _p: _Pass = cur) -> None:
            _p.backward_ran = True
            saved = _p.patterns.pop(layer, None)
            if saved is None:
                raise SaliencyError(
                    f"Layer {layer}'s attention gradient arrived but its pattern was not "
                    "recomputed; recompute=True needs the forward to run under activation "
                    "checkpointing (SaliencyConfig(memory='lean') does that for you)."
                )
            reduce(_p, layer, saved, grad)

        p.register_hook(on_grad)
        return out

    # The same (store, hooks) pair on another batch of the same shape, without set_batch, would
    # reduce the new pass with the old batch's segments: silently wrong. The residual stream
    # entering block 0 is fingerprinted per batch (its sum over d_model, [batch, pos]); a pass
    # whose input differs from the first pass on the same batch object raises instead.
    fp_hook = hook_names.resid_pre(0)
    if fp_hook not in adapter.hook_dict:  # an architecture without it: no fingerprint
        return store, [(n, capture) for n in hook_list]

    def fingerprint(resid: Tensor, hook: Any) -> None:
        if not torch.is_grad_enabled():
            return None
        fp = resid.detach().float().sum(dim=-1)
        seen = store._fingerprint
        if seen is None or seen[0] is not store.batch or seen[1].shape != fp.shape:
            store._fingerprint = (store.batch, fp)
        elif not torch.allclose(fp, seen[1], rtol=1e-5, atol=1e-6):
            raise SaliencyError(
                "This forward pass runs on a different input than the store's batch (the residual "
                "stream entering block 0 differs from the first pass on that batch), so its "
                "saliency would be reduced with the old batch's segments. Call "
                "store.set_batch(new_batch) before each new batch's pass. If you changed the input "
                "on purpose and the segments are the same (e.g. a patch at block 0), call "
                "store.set_batch(batch) again before the pass to say so."
            )
        return None

    store._hook_names = hook_list + [fp_hook]  # ours: not a caller's hook in the diagnosis
    return store, [(fp_hook, fingerprint)] + [(n, capture) for n in hook_list]


def _in_backward(recompute: bool) -> bool:
    """Whether autograd's engine is running a backward now (a checkpointed block being
    recomputed). Where torch does not say (its graph-task id is private API), a repeated firing
    counts as a recomputation exactly when the pass runs under checkpointing (``recompute``)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    if task is None:
        return recompute
    return task() != -1


def _all_segment_names(batch: PromptBatch) -> list[str]:
    names: list[str] = []
    for lay in batch.layouts:
        for n in lay.spans:
            if n not in names:
                names.append(n)
    return names


@contextlib.contextmanager
def _checkpointed_blocks(adapter: Any) -> Iterator[None]:
    """Within the block, every transformer block runs under non-reentrant activation
    checkpointing: its graph is dropped after the forward and recomputed during the backward.
    The wrapper is set as an instance attribute (bypassing TransformerLens's attribute proxy)
    and removed on exit, also after an exception, so the caller's model is left as found."""
    blocks = list(adapter.model.blocks)
    for block in blocks:
        if "forward" in block.__dict__:
            raise SaliencyError(
                f"{type(block).__name__} already has an instance-level forward (another "
                "checkpointing wrapper?); lean saliency will not stack a second one. Use "
                "SaliencyConfig(memory='normal')."
            )
    try:
        for block in blocks:
            inner = block.forward

            def forward(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
                return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            object.__setattr__(block, "forward", forward)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
