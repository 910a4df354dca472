"""SaliencyConfig (what a saliency pass computes, its memory modes, validation) and the default
loss, :func:`target_nll`."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .._typing import Float, Tensor
from ..errors import ConfigError, InputError
from ..layers import LayerSpec, normalize_layer_spec, resolve_layers
from ..segments import PromptBatch

__all__ = ["SaliencyConfig", "target_nll", "LossFn"]

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
        fp32: accumulate in float32 under bf16/fp16 models (``False`` there warns once per
            process: see :func:`warn_low_precision`).
        layers may also be ``"global"`` / ``"sliding"`` (the model's full-attention /
            sliding-window layers).
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
            ``"blockwise"`` never forms a ``T x T`` pattern: the model's attention runs
            without eager patterns, keeping q, k, v, and saliency is formed in the backward a
            block of ``block_size`` query rows at a time from q, k, v and dz and reduced at once
            (docs/blockwise.md); memory linear in ``T``, for models whose attention it reproduces
            exactly (GPT-2, Llama, Mistral, Qwen2, OPT, Gemma 2/3), else a SaliencyError names
            the eager fallback. ``"auto"`` takes normal if it fits, else lean if one layer's
            pattern fits (80% of free memory), else blockwise where the architecture allows.
            Saliency is the same in every mode.
        block_size: query rows per block in the blockwise mode (``None``: chosen from the free
            memory, see :func:`dpc_lens.saliency.blockwise.default_block_size`).
        loss_fp64: the default loss accumulates its log-softmax over the scored rows in float64
            (the vocabulary-long sum of exponentials, where float32 loses digits; the elementwise
            work stays float32, so it costs ~1% of a SmolLM2 pass): SmolLM2 saliency is then within
            ~3e-6 of each layer's largest entry of a float64 reference, against 1.4e-4 with a
            float32 log-softmax. ``False`` keeps float32 (float64 models stay float64 either way).
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
    loss_fp64: bool = True
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.memory not in ("auto", "normal", "lean", "blockwise"):
            raise ConfigError(
                "SaliencyConfig.memory must be 'auto', 'normal', 'lean' or 'blockwise', got "
                f"{self.memory!r}."
            )
        if self.block_size is not None and (
                isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                or self.block_size < 1):
            raise ConfigError(
                f"SaliencyConfig.block_size must be a positive int (query rows per block) or "
                f"None (chosen from free memory), got {self.block_size!r}."
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

    def resolved_layers(self, n_layers: int, windows: Any = None) -> list[int]:
        """The layers this config measures in an ``n_layers``-layer model (sorted; the one layer
        grammar of :mod:`dpc_lens.layers`; ``windows``: per layer its sliding window or ``None``,
        which ``"global"`` / ``"sliding"`` need)."""
        if self.layers is None:
            return list(range(n_layers))
        try:
            return resolve_layers(self.layers, n_layers, windows)
        except ConfigError as err:
            raise ConfigError(f"SaliencyConfig.layers: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SaliencyConfig":
        from ..validate import check_keys

        check_keys(d, [f.name for f in fields(cls)], "SaliencyConfig")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


_LOW_PRECISION_WARNED: set[str] = set()


def warn_low_precision(dtype: torch.dtype, config: SaliencyConfig) -> None:
    """Once per process and dtype: a saliency pass in bf16 / fp16 without float32 accumulation
    (``config.fp32=False``) is told how far off such maps can be. dpc_lens's bf16 saliency
    equals transformers' own bf16 model, but bf16 differs from fp32 by up to 2.6x of a layer's
    largest entry (Gemma 3 270M, T = 810); load the model in float32 for maps you compare."""
    if dtype not in (torch.bfloat16, torch.float16) or config.fp32 or str(dtype) in _LOW_PRECISION_WARNED:
        return
    import warnings

    from ..errors import DpcLensWarning

    _LOW_PRECISION_WARNED.add(str(dtype))
    name = str(dtype).removeprefix("torch.")
    warnings.warn(
        f"Saliency in {name} without float32 accumulation (SaliencyConfig(fp32=False)): "
        f"{name} saliency can differ from float32 by more than a layer's largest entry (up to "
        "2.6x measured on Gemma 3 270M at T = 810). Keep fp32=True, and load the model in "
        "float32 (load_model(..., dtype='float32')) for maps you compare or publish. "
        "(Shown once per process.)", DpcLensWarning, stacklevel=3)


def scored_positions(batch: PromptBatch, segments: Sequence[str]) -> Tensor:
    """The positions whose logits :func:`target_nll` reads (``t - 1`` for every token ``t`` of
    ``segments`` in any example), sorted: the unembedding need not run anywhere else."""
    tmask = batch.union_mask(segments)
    tmask[:, 0] = 0.0
    return (tmask[:, 1:] > 0).any(0).nonzero().flatten()


def target_nll(
    logits: Float[Tensor, "batch pos d_vocab"],
    batch: PromptBatch,
    segments: Sequence[str] = ("rationale", "answer"),
    *,
    dtype: torch.dtype | None = None,
    positions: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """Teacher-forced mean NLL per example of the tokens in ``segments``.

    Token at position ``t`` is scored by the logits at ``t - 1``. Positions of segments an
    example lacks are skipped; an example with no target token raises :class:`InputError`.
    ``positions``: ``logits`` holds only these positions (``[batch, len(positions), vocab]``,
    e.g. from ``logits_to_keep=scored_positions(batch, segments)``), which must include every
    scored one; default: every position.
    """
    B, T = batch.token_ids.shape
    tmask = batch.union_mask(segments).to(logits.device)
    tmask[:, 0] = 0.0  # the first position has no prediction
    if (tmask.sum(-1) == 0).any():
        bad = (tmask.sum(-1) == 0).nonzero().flatten().tolist()
        raise InputError(
            f"Examples {bad} have no tokens in the loss segments {list(segments)}; the saliency "
            "loss needs a rationale (or set loss_segments to segments the examples have)."
        )
    targets = batch.token_ids.clamp(min=0)[:, 1:].to(logits.device)
    # never below fp32, never downcast fp64; ``dtype`` (e.g. float64) raises it further
    work = torch.promote_types(logits.dtype, dtype or torch.float32)
    w = tmask[:, 1:]
    # log-softmax only at the scored positions: the full [batch, T, vocab] copy costs
    # 8 x 139 x 49,152 x 4 B = 219 MB on SmolLM2, and most positions are not scored
    rows = w > 0
    if positions is None:
        x = logits[:, :-1][rows]
    else:  # compact logits: position q sits at index inv[q]
        inv = torch.full((T,), -1, dtype=torch.long, device=logits.device)
        inv[positions.to(logits.device)] = torch.arange(positions.numel(), device=logits.device)
        b_idx, q_idx = rows.nonzero(as_tuple=True)
        k_idx = inv[q_idx]
        if bool((k_idx < 0).any()):
            raise InputError("target_nll: positions misses a scored position; pass "
                             "scored_positions(batch, segments).")
        x = logits[b_idx, k_idx]
    picked = targets[rows].unsqueeze(-1)
    if work == x.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or \
            work != torch.float64:
        logp = torch.log_softmax(x.to(work), dim=-1)
        tok = logp.gather(-1, picked).squeeze(-1)
    else:
        # float64 where the precision is lost, at float32 cost: the vocabulary-long sum of
        # exponentials is accumulated in float64 (its float32 accumulation is what loses digits
        # over ~50k entries); the elementwise shift and exp stay in float32 (1 ulp each), so no
        # float64 copy of the [rows, vocab] logits is made
        z = x.float() - x.detach().float().amax(-1, keepdim=True)
        lse = torch.log(torch.exp(z).sum(-1, dtype=torch.float64))
        tok = z.gather(-1, picked).squeeze(-1).double() - lse
    tok_lp = torch.zeros(w.shape, dtype=work, device=logits.device)
    tok_lp[rows] = tok.to(work)
    return -(tok_lp * w).sum(-1) / w.sum(-1)


def _as_config(config: Any) -> SaliencyConfig:
    if config is None:
        return SaliencyConfig()
    if isinstance(config, SaliencyConfig):
        return config
    if isinstance(config, Mapping):
        return SaliencyConfig.from_dict(config)
    raise ConfigError(
        f"config must be a SaliencyConfig or a dict of its fields, got {type(config).__name__}; "
        "e.g. SaliencyConfig(layers='deep') or {'layers': 'deep'}."
    )


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
