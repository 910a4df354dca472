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
import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.utils.checkpoint

from . import flows as F
from . import hook_names
from ._typing import Float, Tensor
from .errors import ConfigError, InputError, SaliencyError
from .layers import LayerSpec, normalize_layer_spec, resolve_layers
from .model import as_adapter, frozen_for_saliency
from .segments import PromptBatch, SegmentLayout

__all__ = [
    "SaliencyConfig", "SaliencyResult", "SaliencyStore", "compute_saliency", "normal_mode_bytes",
    "saliency_hooks", "target_nll",
]

LossFn = Callable[[Tensor, PromptBatch], Tensor]


@dataclass(frozen=True)
class SaliencyConfig:
    """What the saliency pass computes.

    Attributes:
        layers: which layers to measure, in the one layer grammar of :mod:`dpc_lens.layers`
            (indices, negative allowed; a fraction pair; ``"shallow"`` / ``"deep"``), or ``None``
            for all layers.
        per_head: keep the head axis (IAP's layer x head maps).
        signed: no absolute value.
        include_diagonal: keep ``I[i, i]`` (default: zeroed, as Wang et al.).
        fp32: accumulate in float32 under bf16/fp16 models.
        loss_segments: segments whose tokens the default teacher-forced NLL is taken over.
        flow_segments: segments to compute pairwise flows between; ``None`` = every segment in
            the batch's layouts.
        column_targets: if set, per-source-token column scores summed over these target rows
            (raw and row-normalised).
        row_sources: if set, per-target-token incoming flow from these sources, with each row's
            total incoming flow.
        keep_full: also keep the full ``[q, k]`` map of every layer (memory ``L x B x T^2``).
        memory: ``"normal"`` keeps every layer's attention graph for the backward pass (what a
            plain forward+backward keeps: ``layers x heads x T^2``); ``"lean"`` recomputes each
            block during the backward (activation checkpointing per block), so only the residual
            stream between blocks and one block's graph are alive at a time, for about one more
            forward pass of time; ``"auto"`` (default) is normal unless an estimate of the normal
            pass's attention memory exceeds 80% of the free memory of the model's device.
            Saliency is the same in every mode.
    """

    layers: LayerSpec | None = None
    per_head: bool = False
    signed: bool = False
    include_diagonal: bool = False
    fp32: bool = True
    loss_segments: tuple[str, ...] = ("rationale", "answer")
    flow_segments: tuple[str, ...] | None = None
    column_targets: tuple[str, ...] | None = None
    row_sources: tuple[str, ...] | None = None
    keep_full: bool = False
    memory: str = "auto"

    def __post_init__(self) -> None:
        if self.memory not in ("auto", "normal", "lean"):
            raise ConfigError(
                f"SaliencyConfig.memory must be 'auto', 'normal' or 'lean', got {self.memory!r}."
            )
        for name in ("loss_segments", "flow_segments", "column_targets", "row_sources"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                    raise ConfigError(f"SaliencyConfig.{name} must be a sequence, got {v!r}.")
                object.__setattr__(self, name, tuple(v))
        if self.layers is not None:
            spec = normalize_layer_spec(self.layers, "SaliencyConfig.layers")
            object.__setattr__(self, "layers", spec)
        if not self.loss_segments:
            raise ConfigError(
                "SaliencyConfig.loss_segments is empty; name the segments the loss is taken over."
            )

    def resolved_layers(self, n_layers: int) -> list[int]:
        """The layers this config measures in an ``n_layers``-layer model (sorted; the one layer
        grammar of :mod:`dpc_lens.layers`)."""
        if self.layers is None:
            return list(range(n_layers))
        try:
            return resolve_layers(self.layers, n_layers)
        except ConfigError as err:
            raise ConfigError(f"SaliencyConfig.layers: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SaliencyConfig":
        from .validate import check_keys

        check_keys(d, [f.name for f in fields(cls)], "SaliencyConfig")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


def target_nll(
    logits: Float[Tensor, "batch pos d_vocab"],
    batch: PromptBatch,
    segments: Sequence[str] = ("rationale", "answer"),
) -> Float[Tensor, " batch"]:
    """Teacher-forced mean NLL per example of the tokens in ``segments``.

    Token at position ``t`` is scored by the logits at ``t - 1``. Positions of segments an
    example lacks are skipped; an example with no target token raises :class:`InputError`.
    """
    B, T, _ = logits.shape
    tmask = batch.union_mask(segments).to(logits.device)
    tmask[:, 0] = 0.0  # the first position has no prediction
    if (tmask.sum(-1) == 0).any():
        bad = (tmask.sum(-1) == 0).nonzero().flatten().tolist()
        raise InputError(
            f"Examples {bad} have no tokens in the loss segments {list(segments)}; the saliency "
            "loss needs a rationale (or set loss_segments to segments the examples have)."
        )
    targets = batch.token_ids.clamp(min=0)[:, 1:].to(logits.device)
    work = torch.promote_types(logits.dtype, torch.float32)  # never below fp32, never downcast fp64
    w = tmask[:, 1:]
    # log-softmax only at the scored positions: the full [batch, T, vocab] copy costs
    # 8 x 139 x 49,152 x 4 B = 219 MB on SmolLM2, and most positions are not scored
    rows = w > 0
    logp = torch.log_softmax(logits[:, :-1][rows].to(work), dim=-1)
    tok_lp = torch.zeros(w.shape, dtype=work, device=logits.device)
    tok_lp[rows] = logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
    return -(tok_lp * w).sum(-1) / w.sum(-1)


@dataclass(frozen=True, eq=False)
class SaliencyResult:
    """Reduced saliency of one batch. Leading axes: ``[layer, batch]`` (+ ``head_index`` when
    ``config.per_head``). Positions are padded-batch positions (see ``layouts``).

    Attributes:
        config: the :class:`SaliencyConfig` used.
        layers: the model layers, in the order of the layer axis.
        segment_names: order of the ``target``/``source`` axes of ``flow_sums``.
        layouts: per example, the named spans in padded coordinates.
        flow_sums: ``[layer, batch, (head), target, source]`` sums of ``I`` over segment pairs.
        pair_counts: ``[batch, target, source]`` pairs that enter each sum.
        column_sums / column_shares: ``[layer, batch, (head), key_pos]`` column scores over
            ``config.column_targets`` rows, raw and row-normalised.
        row_sums / row_totals: ``[layer, batch, (head), query_pos]`` incoming flow from
            ``config.row_sources``, and each row's whole incoming flow.
        full: ``[layer, batch, (head), query_pos, key_pos]`` when ``keep_full``.
        loss: ``[batch]`` per-example loss.
    """

    config: SaliencyConfig
    layers: tuple[int, ...]
    segment_names: tuple[str, ...]
    layouts: tuple[SegmentLayout, ...]
    flow_sums: Tensor
    pair_counts: Tensor
    loss: Tensor
    column_sums: Tensor | None = None
    column_shares: Tensor | None = None
    row_sums: Tensor | None = None
    row_totals: Tensor | None = None
    full: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------- flows
    def _seg_index(self, name: str) -> int:
        try:
            return self.segment_names.index(name)
        except ValueError:
            raise InputError(
                f"Unknown segment {name!r}; flows were computed for {list(self.segment_names)}."
            ) from None

    def flow(self, source: str, target: str, reduce: str = "mean") -> Tensor:
        """``flow_l(source->target)`` per layer and example: ``[layer, batch, (head)]``.

        ``mean``: over pairs ``i in target, j in source, j < i`` (NaN where there is no pair);
        ``sum``: the plain sum.
        """
        t, s = self._seg_index(target), self._seg_index(source)
        sums = self.flow_sums[..., t, s]
        if reduce == "sum":
            return sums
        if reduce != "mean":
            raise InputError(f"reduce must be 'mean' or 'sum', got {reduce!r}.")
        counts = self.pair_counts[:, t, s]  # [batch]
        shape = [1, counts.shape[0]] + [1] * (sums.dim() - 2)
        c = counts.view(shape).to(sums.dtype)
        return torch.where(c > 0, sums / c.clamp(min=1), torch.full_like(sums, float("nan")))

    def flows(self, names: Sequence[str], reduce: str = "mean") -> dict[str, Tensor]:
        """Several flows by ``"source->target"`` name."""
        return {n: self.flow(*_split_flow_name(n), reduce=reduce) for n in names}

    def proportions(self, names: Sequence[str], reduce: str = "mean") -> dict[str, Tensor]:
        """Per-layer proportions over ``names`` (they sum to 1 per layer and example)."""
        return F.flow_proportions(self.flows(names, reduce), names)

    # ------------------------------------------------------------ export
    def to_dataframe(self):
        """Long table: one row per (layer, example, [head,] source, target) with sum, count, mean."""
        import pandas as pd

        rows = []
        fs = self.flow_sums.cpu()
        pc = self.pair_counts.cpu()
        per_head = self.config.per_head
        for li, layer in enumerate(self.layers):
            for b in range(fs.shape[1]):
                heads = range(fs.shape[2]) if per_head else [None]
                for h in heads:
                    block = fs[li, b, h] if per_head else fs[li, b]
                    for ti, tn in enumerate(self.segment_names):
                        for si, sn in enumerate(self.segment_names):
                            c = float(pc[b, ti, si])
                            if c == 0:
                                continue
                            s = float(block[ti, si])
                            row = {"layer": layer, "example": b, "source": sn, "target": tn,
                                   "flow": f"{sn}->{tn}", "sum": s, "count": c, "mean": s / c}
                            if per_head:
                                row["head"] = h
                            rows.append(row)
        return pd.DataFrame(rows)

    def save(self, path: str | os.PathLike) -> str:
        """Write ``saliency.safetensors`` and ``saliency.json`` (config, layers, layouts)."""
        from safetensors.torch import save_file

        from .runs import check_out_dir

        path = check_out_dir(path, "SaliencyResult.save path")
        tensors = {"flow_sums": self.flow_sums, "pair_counts": self.pair_counts, "loss": self.loss}
        for name in ("column_sums", "column_shares", "row_sums", "row_totals", "full"):
            v = getattr(self, name)
            if v is not None:
                tensors[name] = v
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(path, "saliency.safetensors"))
        meta = {
            "config": self.config.to_dict(),
            "layers": list(self.layers),
            "segment_names": list(self.segment_names),
            "layouts": [lay.to_dict() for lay in self.layouts],
            "meta": self.meta,
        }
        with open(os.path.join(path, "saliency.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SaliencyResult":
        from safetensors.torch import load_file

        path = os.fspath(path)
        with open(os.path.join(path, "saliency.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        t = load_file(os.path.join(path, "saliency.safetensors"))
        return cls(
            config=SaliencyConfig.from_dict(meta["config"]),
            layers=tuple(meta["layers"]),
            segment_names=tuple(meta["segment_names"]),
            layouts=tuple(SegmentLayout.from_dict(d) for d in meta["layouts"]),
            flow_sums=t["flow_sums"],
            pair_counts=t["pair_counts"],
            loss=t["loss"],
            column_sums=t.get("column_sums"),
            column_shares=t.get("column_shares"),
            row_sums=t.get("row_sums"),
            row_totals=t.get("row_totals"),
            full=t.get("full"),
            meta=meta.get("meta", {}),
        )


def _split_flow_name(name: str) -> tuple[str, str]:
    if "->" not in name:
        raise InputError(f"Flow names are 'source->target', e.g. 'soft->rationale'; got {name!r}.")
    s, t = name.split("->", 1)
    return s.strip(), t.strip()


class SaliencyStore:
    """What :func:`saliency_hooks` collects during one forward + backward, layer by layer.

    Each hooked layer's ``[batch, head, q, k]`` product is reduced inside the gradient hook to
    what the config asked for (segment flow sums, column and row scores) and kept in
    :attr:`per_layer`; nothing of size ``T^2`` survives unless ``keep_full``. Call
    :meth:`result` after the backward pass.
    """

    def __init__(self, config: SaliencyConfig, layers: list[int], names: list[str],
                 batch: PromptBatch) -> None:
        self.config = config
        self.layers = list(layers)
        self.names = list(names)
        self.batch = batch
        self.per_layer: dict[int, dict[str, Tensor]] = {}

    def result(self, loss: Tensor | None = None) -> SaliencyResult:
        """The :class:`SaliencyResult` of the pass (``loss``: one value per example, kept in the
        result; default NaN).

        Raises:
            SaliencyError: a hooked layer delivered no gradient (its pattern is not on the path
                to the loss, or the backward pass did not run).
        """
        layers, store = self.layers, self.per_layer
        missing = [l for l in layers if l not in store]
        if missing:
            raise SaliencyError(
                f"Layers {missing} delivered no attention gradient. This model's attention pattern "
                "hook is not on the path to the loss; dpc_lens cannot measure saliency there."
            )

        def stack(key: str) -> Tensor | None:
            if key not in store[layers[0]]:
                return None
            # layers split over devices (device_map) are reduced where they run, gathered here
            home = store[layers[0]][key].device
            return torch.stack([store[l][key].to(home) for l in layers]).detach()

        if loss is None:
            loss = torch.full((self.batch.batch_size,), float("nan"))
        loss = loss.detach()
        seg_masks = self.batch.segment_masks(self.names)
        return SaliencyResult(
            config=self.config,
            layers=tuple(layers),
            segment_names=tuple(self.names),
            layouts=self.batch.layouts,
            flow_sums=stack("flow_sums"),
            pair_counts=F.segment_pair_counts(seg_masks, include_diagonal=self.config.include_diagonal),
            loss=loss.to(torch.promote_types(loss.dtype, torch.float32)),
            column_sums=stack("column_sums"),
            column_shares=stack("column_shares"),
            row_sums=stack("row_sums"),
            row_totals=stack("row_totals"),
            full=stack("full"),
        )


def saliency_hooks(
    model: Any,
    batch: PromptBatch,
    config: SaliencyConfig | None = None,
    *,
    recompute: bool = False,
) -> tuple[SaliencyStore, list[tuple[str, Callable[..., Any]]]]:
    """The saliency capture as plain hooks: ``(store, hooks)`` for one forward + backward.

    ``hooks`` are ``(hook_name, fn)`` forward hooks on ``blocks.{l}.attn.hook_pattern``; each
    registers a tensor gradient hook on the pattern (backward hooks on ``hook_pattern`` do not
    fire on some bridge architectures), and the gradient hook reduces
    ``I_l = |sum_h A_{h,l} * dL/dA_{h,l}|`` at once into ``store``. Concatenate them with your
    own hooks or with :func:`~dpc_lens.patching.soft_row_hooks` and run one pass::

        store, hooks = saliency_hooks(model, batch, cfg)
        with adapter.hooks(fwd_hooks=hooks + soft_row_hooks(batch, soft, [2])), torch.enable_grad():
            embeds = batch.embeds.detach().requires_grad_(True)  # frozen weights: grad flows here
            logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids)
            loss = target_nll(logits, batch, cfg.loss_segments)
            loss.sum().backward()
        res = store.result(loss)

    Hook names are checked against the model before anything is returned. The backward pass
    must run while the hooks are registered (inside the ``with`` block). :func:`compute_saliency`
    is this plus the pass itself.

    Under activation checkpointing (blocks recomputed during the backward) a layer's hook fires
    twice: the first firing registers the one gradient hook, a later firing for the same layer
    is the recomputation and only hands its pattern to that hook (never a second hook, never a
    double count). ``recompute=True`` says the forward runs under checkpointing, so the first
    firing keeps no reference to the pattern (the recomputed one is used and dropped after its
    layer is reduced): that is what keeps memory at one block's graph.
    """
    if not isinstance(batch, PromptBatch):
        raise InputError(
            f"compute_saliency needs a PromptBatch as its batch, got {type(batch).__name__}"
            f"{' ' + repr(batch)[:60] if isinstance(batch, (str, dict)) else ''}. Build one first, "
            "e.g. PromptBatch.from_pieces(model, [[('bos', [tok.bos_token_id]), ('question', text)]], "
            "soft_prompt)."
        )
    config = config or SaliencyConfig()
    adapter = as_adapter(model)
    layers = config.resolved_layers(adapter.n_layers)
    names = list(config.flow_segments) if config.flow_segments is not None else _all_segment_names(batch)
    for group in (config.flow_segments, config.column_targets, config.row_sources):
        for n in group or ():
            if not any(n in lay.spans for lay in batch.layouts):
                raise InputError(
                    f"Segment {n!r} appears in no example of the batch; the batch has "
                    f"{_all_segment_names(batch)}."
                )
    hook_list = [hook_names.pattern(l) for l in layers]
    hook_names.check_hook_names(adapter.hook_dict, hook_list)

    seg_masks = batch.segment_masks(names)
    tmask = batch.union_mask(config.column_targets) if config.column_targets else None
    smask = batch.union_mask(config.row_sources) if config.row_sources else None
    store = SaliencyStore(config, layers, names, batch)
    layer_of = {hook_names.pattern(l): l for l in layers}

    def reduce(layer: int, pattern: Tensor, grad: Tensor) -> None:
        I = F.saliency_map(pattern, grad, per_head=config.per_head, signed=config.signed,
                           include_diagonal=config.include_diagonal, fp32=config.fp32)
        out: dict[str, Tensor] = {"flow_sums": F.segment_flow_sums(I, seg_masks.to(I.device))}
        if smask is not None or tmask is not None:
            total = F.row_totals(I)
        if smask is not None:
            out["row_sums"] = F.row_scores(I, smask.to(I.device))
            out["row_totals"] = total
        if tmask is not None:
            tm = tmask.to(I.device)
            out["column_sums"] = F.column_scores(I, tm)
            out["column_shares"] = F.column_scores(I, tm, row_normalize=True, row_total=total)
        if config.keep_full:
            out["full"] = I
        store.per_layer[layer] = out

    # layer -> the pattern its gradient hook reduces with (detached: shares storage with what
    # autograd keeps anyway; under recomputation, the recomputed copy, dropped once reduced)
    patterns: dict[int, Tensor] = {}
    hooked: set[int] = set()

    def capture(pattern: Tensor, hook: Any) -> None:
        layer = layer_of[hook.name]
        if not pattern.requires_grad:
            raise SaliencyError(
                f"The attention pattern of layer {layer} is not part of the autograd graph, so "
                "no gradient can reach it. Do not run the saliency pass under torch.no_grad() "
                "or torch.inference_mode()."
            )
        if layer in hooked:  # the recomputation of a checkpointed block: hand over its pattern
            patterns[layer] = pattern.detach()
            return
        hooked.add(layer)
        if not recompute:
            patterns[layer] = pattern.detach()

        def on_grad(grad: Tensor) -> None:
            saved = patterns.pop(layer, None)
            if saved is None:
                raise SaliencyError(
                    f"Layer {layer}'s attention gradient arrived but its pattern was not "
                    "recomputed; recompute=True needs the forward to run under activation "
                    "checkpointing (SaliencyConfig(memory='lean') does that for you)."
                )
            reduce(layer, saved, grad)

        pattern.register_hook(on_grad)

    return store, [(n, capture) for n in hook_list]


def compute_saliency(
    model: Any,
    batch: PromptBatch,
    config: SaliencyConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
) -> SaliencyResult:
    """One teacher-forced forward + backward over ``batch``; saliency reduced layer by layer.

    The capture is :func:`saliency_hooks`; this runs the pass with them, every hook registered
    inside one ``with`` block and the backward inside it.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (or a :class:`ModelAdapter`).
        batch: the input, built with :class:`~dpc_lens.segments.PromptBatch`.
        config: what to compute (default: all layers, segment flows between every segment).
        loss_fn: ``fn(logits, batch)`` returning a scalar or one loss per example (summed);
            default :func:`target_nll` over ``config.loss_segments``.

    Raises:
        SaliencyError: a requested layer delivered no gradient, or the loss is not a finite
            scalar / per-example vector.
    """
    config = config or SaliencyConfig()
    adapter = as_adapter(model)
    # (a non-batch is refused by saliency_hooks below, with the fix in its message)
    fits = not isinstance(batch, PromptBatch) or not _normal_mode_would_not_fit(adapter, batch)
    lean = config.memory == "lean" or (config.memory == "auto" and not fits)
    store, hooks = saliency_hooks(model, batch, config, recompute=lean)
    model_obj = adapter.model
    with frozen_for_saliency(model_obj), torch.enable_grad(), _released_patterns(adapter, during=lean):
        embeds = batch.embeds.detach().requires_grad_(True)
        recompute = _checkpointed_blocks(adapter) if lean else contextlib.nullcontext()
        with adapter.hooks(fwd_hooks=hooks), recompute:
            logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids)
            if loss_fn is None:
                per_example = target_nll(logits, batch, config.loss_segments)
                loss = per_example.sum()
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
                raise SaliencyError(
                    "The loss does not depend on the model's output (no gradient); a custom loss "
                    "must be computed from the logits it is given."
                )
            torch.autograd.grad(loss, embeds)
    return store.result(per_example)


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


def _normal_mode_would_not_fit(adapter: Any, batch: PromptBatch) -> bool:
    free = _free_bytes(adapter.device)
    return free is not None and normal_mode_bytes(adapter, batch) > 0.8 * free


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


def _all_segment_names(batch: PromptBatch) -> list[str]:
    names: list[str] = []
    for lay in batch.layouts:
        for n in lay.spans:
            if n not in names:
                names.append(n)
    return names
