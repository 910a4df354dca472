"""What the saliency engine hands the DPC detector for one instance: :class:`DetectorInputs`,
four small tensors (column and row sums, raw and normalised) and, when measured, the attention
each soft row receives and its residual norm (for sink detection, :mod:`dpc_lens.dpc.sinks`).
Split from :mod:`dpc_lens.dpc.detector`, which re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from dpc_lens.errors import InputError

__all__ = ["DetectorInputs", "Statistic"]

Statistic = Literal["raw", "normalized"]


def _check_matrix(t: Any, name: str, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor of shape [{dims}], got {type(t).__name__}."
        )
    if t.ndim != 2:
        raise InputError(f"{name} must be 2-D [{dims}], got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {t.dtype}.")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise InputError(
            f"{name} holds NaN or inf values; the saliency pass produced non-finite flows "
            "(check the loss and, under bf16/fp16, use fp32 accumulation)."
        )
    if t.numel() and bool((t < 0).any()):
        raise InputError(
            f"{name} holds negative values (min {float(t.min()):.4g}); the detector needs the "
            "absolute saliency |sum_h A * dL/dA|, not the signed option."
        )


@dataclass(frozen=True, eq=False)
class DetectorInputs:
    """What the saliency engine hands the detector for ONE instance, already reduced.

    Layout of the instance: ``[soft (P tokens); question; rationale (n tokens)]``, saliency
    ``I_l(i, j)`` = flow from source j (column) into target i (row), every model layer l.

    Attributes:
        soft_columns: ``[layer, soft]``; ``soft_columns[l, j] = sum_{i in question ∪ rationale}
            I_l(i, j)`` -- raw column score of soft token j.
        soft_columns_norm: ``[layer, soft]``; the same sum of row-normalised saliency
            ``I_l(i, j) / sum_{j' < i} I_l(i, j')`` (diagonal excluded): each target row's share
            of its incoming flow, so each row contributes at most 1.
        rationale_rows: ``[layer, rat]``; ``rationale_rows[l, i] = mean_{j in soft} I_l(i, j)``
            for rationale token i (raw).
        rationale_rows_norm: ``[layer, rat]``; ``sum_{j in soft} I_l(i, j) / sum_{j' < i}
            I_l(i, j')`` -- the share of row i's incoming flow that comes from the soft prompt,
            in [0, 1].

        soft_attention: optional ``[layer, soft]``; the attention each soft position receives
            from the question and rationale, as a multiple of a typical token's
            (:mod:`dpc_lens.dpc.sinks`); ``None`` when not measured. Sink detection reads it.
        soft_residual: optional ``[layer, soft]``; each soft position's residual-stream norm
            entering the layer, as a multiple of the median position's.
        layer_windows: optional ``[layer]`` int64; each layer's sliding window, ``0`` for a
            global (full causal) layer. Needed for the layer sets ``"global"`` and
            ``"sliding"``; ``None`` (the default) when every layer is global.
        rationale_visible: optional ``[layer, rat]`` bool; whether rationale token i can attend
            to any soft position in layer l under that layer's mask. Where it is False the
            soft->token flow is structurally zero (the token is a window or more past the soft
            prompt), so :func:`~dpc_lens.dpc.detector.deep_flow` leaves that (layer, token) out
            of its means instead of averaging a zero in. ``None``: every pair is visible.

    Dim 0 covers all the model's layers (``n_layers``); the detector picks its layer sets.
    All four must be finite and non-negative. The rationale axis may have length 0 (empty
    generation); :func:`deep_flow` then returns a defined no-trigger result.

    Raises:
        InputError: wrong type, rank, dtype, shape mismatch, NaN/inf or negative values.
    """

    soft_columns: Float[Tensor, "layer soft"]
    soft_columns_norm: Float[Tensor, "layer soft"]
    rationale_rows: Float[Tensor, "layer rat"]
    rationale_rows_norm: Float[Tensor, "layer rat"]
    soft_attention: Float[Tensor, "layer soft"] | None = None
    soft_residual: Float[Tensor, "layer soft"] | None = None
    layer_windows: Tensor | None = None
    rationale_visible: Tensor | None = None

    def __post_init__(self) -> None:
        self._check_windows()
        for name in ("soft_attention", "soft_residual"):
            t = getattr(self, name)
            if t is not None:
                _check_matrix(t, name, "layer soft")
                if t.shape != self.soft_columns.shape:
                    raise InputError(
                        f"{name} has shape {tuple(t.shape)} but soft_columns has "
                        f"{tuple(self.soft_columns.shape)}; both are [n_layers, n_soft]."
                    )
        _check_matrix(self.soft_columns, "soft_columns", "layer soft")
        _check_matrix(self.soft_columns_norm, "soft_columns_norm", "layer soft")
        _check_matrix(self.rationale_rows, "rationale_rows", "layer rat")
        _check_matrix(self.rationale_rows_norm, "rationale_rows_norm", "layer rat")
        if self.soft_columns.shape != self.soft_columns_norm.shape:
            raise InputError(
                f"soft_columns has shape {tuple(self.soft_columns.shape)} but "
                "soft_columns_norm has "
                f"{tuple(self.soft_columns_norm.shape)}; both must be [n_layers, n_soft]."
            )
        if self.rationale_rows.shape != self.rationale_rows_norm.shape:
            raise InputError(
                f"rationale_rows has shape {tuple(self.rationale_rows.shape)} but "
                f"rationale_rows_norm has {tuple(self.rationale_rows_norm.shape)}; both must be "
                "[n_layers, n_rationale]."
            )
        if self.soft_columns.shape[0] != self.rationale_rows.shape[0]:
            raise InputError(
                f"soft_columns covers {self.soft_columns.shape[0]} layers but rationale_rows "
                "covers "
                f"{self.rationale_rows.shape[0]}; both must cover every model layer."
            )
        if self.soft_columns.shape[0] < 1 or self.soft_columns.shape[1] < 1:
            raise InputError(
                f"soft_columns has shape {tuple(self.soft_columns.shape)}; need at least one layer "
                "and one soft token."
            )
        if self.rationale_rows_norm.numel() and float(self.rationale_rows_norm.max()) > 1.0 + 1e-4:
            raise InputError(
                f"rationale_rows_norm has a value {float(self.rationale_rows_norm.max()):.4g} > 1, "
                "but it is a share of a row's incoming flow; did you pass the raw rows there?"
            )

    def _check_windows(self) -> None:
        n_layers = self.soft_columns.shape[0] if isinstance(self.soft_columns, torch.Tensor) else None
        w = self.layer_windows
        if w is not None:
            if (not isinstance(w, torch.Tensor) or w.ndim != 1 or w.is_floating_point()
                    or w.dtype == torch.bool):
                raise InputError("layer_windows must be a 1-D integer tensor [n_layers] (0 for a "
                                 f"global layer), got {getattr(w, 'dtype', type(w).__name__)} "
                                 f"of shape {tuple(getattr(w, 'shape', ()))}.")
            if n_layers is not None and w.shape[0] != n_layers:
                raise InputError(f"layer_windows has {w.shape[0]} entries for {n_layers} layers.")
            if bool((w < 0).any()):
                raise InputError("layer_windows holds a negative window; use 0 for a global layer.")
        v = self.rationale_visible
        if v is not None:
            if not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.ndim != 2:
                raise InputError("rationale_visible must be a 2-D bool tensor [n_layers, n_rationale], "
                                 f"got {getattr(v, 'dtype', type(v).__name__)}.")
            rr = self.rationale_rows
            if isinstance(rr, torch.Tensor) and tuple(v.shape) != tuple(rr.shape):
                raise InputError(f"rationale_visible has shape {tuple(v.shape)} but rationale_rows has "
                                 f"{tuple(rr.shape)}; both are [n_layers, n_rationale].")

    @property
    def windows(self) -> tuple[int | None, ...] | None:
        """Each layer's sliding window (``None`` for a global layer), or ``None`` when the inputs
        carry no layer types (:func:`~dpc_lens.layers.resolve_layers`' ``windows``)."""
        if self.layer_windows is None:
            return None
        return tuple(int(w) or None for w in self.layer_windows.tolist())

    @property
    def n_layers(self) -> int:
        return int(self.soft_columns.shape[0])

    @property
    def n_soft(self) -> int:
        return int(self.soft_columns.shape[1])

    @property
    def n_rationale(self) -> int:
        return int(self.rationale_rows.shape[1])

    def columns(self, statistic: Statistic) -> Float[Tensor, "layer soft"]:
        """The soft-column tensor for ``statistic`` (``"raw"`` or ``"normalized"``)."""
        return self.soft_columns_norm if statistic == "normalized" else self.soft_columns

    def rows(self, statistic: Statistic) -> Float[Tensor, "layer rat"]:
        """The rationale-row tensor for ``statistic`` (``"raw"`` or ``"normalized"``)."""
        return self.rationale_rows_norm if statistic == "normalized" else self.rationale_rows

    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors by field name (for ``safetensors.torch.save_file`` caching); the optional
        sink tensors only when measured."""
        return {f.name: getattr(self, f.name).contiguous() for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> DetectorInputs:
        """Inverse of :meth:`to_tensors`."""
        required = [f.name for f in fields(cls) if f.name not in _OPTIONAL_INPUTS]
        missing = [name for name in required if name not in tensors]
        if missing:
            raise InputError(
                f"cached detector inputs lack {missing}; expected all of {required}."
            )
        return cls(**{f.name: tensors[f.name] for f in fields(cls) if f.name in tensors})


_OPTIONAL_INPUTS = ("soft_attention", "soft_residual", "layer_windows", "rationale_visible")
