"""IAP's score: per-flow standardisation fitted on dev data (:class:`FlowStandardizer`), every
knob of the score and strategies (:class:`IAPConfig`, layer sets in the one grammar of
:mod:`dpc_lens.layers`) and the synthesised score
``S = lam * z(q->p) + (1 - lam) * z(q->r) + mu * z(p->r)``. Model-free."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from dpc_lens.errors import ConfigError, DataError, InputError
from dpc_lens.layers import LayerSpec, layer_spec_json, normalize_layer_spec, resolve_layers
from dpc_lens.runs import read_json, write_json
from dpc_lens.validate import is_int as _is_int

from .pool import _JSON_VERSION, FLOW_PR, FLOW_QP, FLOW_QR, IAP_FLOWS, _check_flow_name

if TYPE_CHECKING:  # pandas is imported lazily, only by to_dataframe()
    pass

__all__ = [
    "FlowStandardizer",
    "IAPConfig",
    "synthesized_score",
]

# Classes marked ``@no_type_check`` validate and coerce raw user input in ``__post_init__``
# (lists -> tuples, strings -> prompts, ints -> floats) and explain what is wrong and how to fix
# it. The run-time type checker the test suite installs (jaxtyping's import hook) would otherwise
# check the raw ``__init__`` arguments against the *stored* field types and pre-empt those
# messages with a generic TypeCheckError. None of them has a tensor shape to check.


# ---------------------------------------------------------------------------------------------
# Flow standardisation
# ---------------------------------------------------------------------------------------------

FlowValues = Float[Tensor, "*pairs"] | Sequence[float] | float


def _as_float64(values: FlowValues, what: str) -> Tensor:
    try:
        if isinstance(values, Tensor):
            t = values.detach().to("cpu", torch.float64)
        else:
            t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{what}: expected numbers (a tensor or a list of floats), got {values!r} ({e})."
        ) from None
    if not torch.isfinite(t).all():
        raise InputError(
            f"{what}: contains NaN or infinite values; drop the (question, prompt) pairs whose "
            "saliency failed before fitting or scoring."
        )
    return t


@dataclass(frozen=True)
class FlowStandardizer:
    """Per-flow z-scoring, ``z = (x - mean) / std``, fitted on dev data for one model and task.

    Raw saliency magnitudes differ by orders of magnitude between flows, models and tasks (and
    grow with the loss), so the score combines z-scores. Fit on one value per (question, prompt)
    pair of a dev split, with :meth:`fit`.

    ``std`` is the *sample* standard deviation (ddof = 1). A flow with fewer than 2 values or with
    zero spread is refused with an error rather than patched with an epsilon: an epsilon would
    turn every later value into a huge z-score that silently dominates the sum.

    Attributes:
        mean, std: per-flow statistics, keyed by flow name (any subset of :data:`IAP_FLOWS`).
        count: how many values each flow was fitted on (provenance only).
    """

    mean: Mapping[str, float]
    std: Mapping[str, float]
    count: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.mean:
            raise ConfigError(
                "FlowStandardizer has no flow; fit it with FlowStandardizer.fit({...}) on dev "
                f"flows named from {list(IAP_FLOWS)}."
            )
        if set(self.mean) != set(self.std):
            raise ConfigError(
                f"FlowStandardizer: mean has flows {sorted(self.mean)} but std has "
                f"{sorted(self.std)}; both need the same flows."
            )
        for name in self.mean:
            _check_flow_name(name, "FlowStandardizer")
            m, s = self.mean[name], self.std[name]
            if not (isinstance(m, (int, float)) and math.isfinite(m)):
                raise ConfigError(f"FlowStandardizer: mean of {name!r} must be a finite number, got {m!r}.")
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
                raise ConfigError(
                    f"FlowStandardizer: std of {name!r} must be a finite number > 0, got {s!r}; "
                    "refit on dev data where this flow varies."
                )
        object.__setattr__(self, "mean", {k: float(v) for k, v in self.mean.items()})
        object.__setattr__(self, "std", {k: float(self.std[k]) for k in self.mean})
        object.__setattr__(self, "count", {k: int(v) for k, v in dict(self.count).items()})

    @property
    def flows(self) -> tuple[str, ...]:
        return tuple(f for f in IAP_FLOWS if f in self.mean)

    @classmethod
    def fit(cls, flows: Mapping[str, FlowValues]) -> FlowStandardizer:
        """Fit mean and sample std (ddof = 1) of each flow.

        Args:
            flows: flow name -> values, one per (question, prompt) pair of the dev split (any
                shape; flattened). Any subset of :data:`IAP_FLOWS`.

        Raises:
            InputError: unknown flow name, non-numeric or non-finite values, fewer than 2 values,
                or all values equal (std 0).
        """
        if not isinstance(flows, Mapping) or not flows:
            raise InputError(
                f"FlowStandardizer.fit needs a non-empty mapping flow name -> values, got {flows!r}; "
                f"names are {list(IAP_FLOWS)}."
            )
        mean, std, count = {}, {}, {}
        for name, values in flows.items():
            _check_flow_name(name, "FlowStandardizer.fit")
            t = _as_float64(values, f"FlowStandardizer.fit[{name!r}]").reshape(-1)
            if t.numel() < 2:
                raise InputError(
                    f"FlowStandardizer.fit[{name!r}]: got {t.numel()} value(s); a standard deviation "
                    "needs at least 2 — fit on more (question, prompt) pairs of the dev split."
                )
            s = float(t.std(correction=1))
            if s == 0.0:
                raise InputError(
                    f"FlowStandardizer.fit[{name!r}]: all {t.numel()} values equal {float(t[0])!r} "
                    "(std 0), so z-scores are undefined; fit on more varied dev data, or leave this "
                    "flow out (and give it weight 0 in the score)."
                )
            mean[name], std[name], count[name] = float(t.mean()), s, int(t.numel())
        return cls(mean=mean, std=std, count=count)

    def z(self, name: str, values: FlowValues) -> Tensor:
        """z-scores of one flow's values, same shape as given (float64 unless a floating tensor
        was given, whose dtype is kept)."""
        _check_flow_name(name, "FlowStandardizer.z")
        if name not in self.mean:
            raise InputError(
                f"FlowStandardizer.z: flow {name!r} was not fitted (fitted: {list(self.flows)}); "
                "refit including it."
            )
        t = _as_float64(values, f"FlowStandardizer.z[{name!r}]")
        out = (t - self.mean[name]) / self.std[name]
        if isinstance(values, Tensor) and values.is_floating_point():
            out = out.to(values.dtype)
        return out

    def transform(self, flows: Mapping[str, FlowValues]) -> dict[str, Tensor]:
        """z-scores of every flow given (each must have been fitted)."""
        return {name: self.z(name, values) for name, values in flows.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "FlowStandardizer",
            "version": _JSON_VERSION,
            "mean": dict(self.mean),
            "std": dict(self.std),
            "count": dict(self.count),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowStandardizer:
        if not isinstance(d, Mapping) or "mean" not in d or "std" not in d:
            raise DataError(
                "FlowStandardizer.from_dict: expected a mapping with 'mean' and 'std' "
                f"(as written by to_dict), got {d!r}."
            )
        try:
            mean = {str(k): float(v) for k, v in dict(d["mean"]).items()}
            std = {str(k): float(v) for k, v in dict(d["std"]).items()}
            count = {str(k): int(v) for k, v in dict(d.get("count") or {}).items()}
        except (TypeError, ValueError) as e:
            raise DataError(
                f"FlowStandardizer.from_dict: 'mean', 'std' and 'count' must map flow names to "
                f"numbers ({e})."
            ) from None
        try:
            return cls(mean=mean, std=std, count=count)
        except (ConfigError, InputError) as e:
            raise DataError(f"FlowStandardizer.from_dict: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write as JSON (never pickle)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FlowStandardizer:
        d = read_json(path, "standardizer")
        try:
            return cls.from_dict(d)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Layer sets and config
# ---------------------------------------------------------------------------------------------

# The layer grammar is dpc_lens.layers (shared with DPC): names, fraction pairs, index lists.


def _check_lam(lam: object, where: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
        raise ConfigError(
            f"{where}: lam must be a number in [0, 1] (weight of question->prompt; 1 - lam goes to "
            f"question->rationale), got {lam!r}."
        )
    return float(lam)


def _check_mu(mu: object, where: str) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (math.isfinite(mu) and mu >= 0):
        raise ConfigError(
            f"{where}: mu must be a finite number >= 0 (weight of prompt->rationale; 0 leaves it "
            f"out), got {mu!r}."
        )
    return float(mu)


def _check_tau(tau: object, where: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ConfigError(
            f"{where}: tau must be a finite number (the score threshold, in z-score units), got {tau!r}."
        )
    return float(tau)


def _check_m(m: object, where: str) -> int:
    if not _is_int(m) or m < 1:
        raise ConfigError(
            f"{where}: m must be an int >= 1 (how many top-scoring prompts vote), got {m!r}."
        )
    return int(m)


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class IAPConfig:
    """Every knob of IAP's score and strategies; saved next to every result.

    Attributes:
        lam: weight of z(question->prompt) in the score, in [0, 1]; ``1 - lam`` weighs
            z(question->rationale). Default 0.5 (the paper tunes it; not public).
        mu: weight of z(prompt->rationale), >= 0. Default 0 (the flow is left out).
        tau: IAP-ss threshold on the score (z-score units; a score exactly equal to tau clears
            it). Default 0.0: "above the dev-set average". Fit it with :func:`calibrate`.
        m: IAP-mv: how many top-scoring prompts vote, an int >= 1. Default 3. An m larger than
            the pool is clamped to the pool size (see :func:`iap_mv`).
        qp_layers: layers averaged for question->prompt (shallow). Default ``(0.0, 1/3)``: the
            first third of layers, layer 0 included (the IAP paper finds question->prompt flow
            in the shallowest layers; DPC's ``"shallow"`` drops layer 0 for its own reasons).
        qr_layers, pr_layers: layers for question->rationale and prompt->rationale (deep).
            Default ``"deep"``: the last third, as in DPC (at least the last layer).
        aggregate: how per-layer flows become one number per flow; only ``"mean"`` (mean over
            the layer set of the per-layer segment-mean flow) for now.

    Layer specs follow the one grammar of :mod:`dpc_lens.layers` (shared with DPC): index lists
    (ints, negative from the end), fraction pairs of floats ``(start, stop)`` or the names
    ``"shallow"`` / ``"deep"``. Note ``(0, 1)`` (ints) means layers 0 and 1, while
    ``(0.0, 1.0)`` means all layers.
    """

    lam: float = 0.5
    mu: float = 0.0
    tau: float = 0.0
    m: int = 3
    qp_layers: LayerSpec = (0.0, 1.0 / 3.0)
    qr_layers: LayerSpec = "deep"
    pr_layers: LayerSpec = "deep"
    aggregate: Literal["mean"] = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", _check_lam(self.lam, "IAPConfig"))
        object.__setattr__(self, "mu", _check_mu(self.mu, "IAPConfig"))
        object.__setattr__(self, "tau", _check_tau(self.tau, "IAPConfig"))
        object.__setattr__(self, "m", _check_m(self.m, "IAPConfig"))
        for name in ("qp_layers", "qr_layers", "pr_layers"):
            object.__setattr__(self, name, normalize_layer_spec(getattr(self, name), f"IAPConfig.{name}"))
        if self.aggregate != "mean":
            raise ConfigError(
                f"IAPConfig.aggregate must be 'mean', got {self.aggregate!r}; other reductions are "
                "not implemented yet."
            )

    def layers(self, n_layers: int,
               windows: Sequence[int | None] | None = None) -> dict[str, tuple[int, ...]]:
        """Resolved layer indices per flow for a model with ``n_layers`` layers (``windows``:
        each layer's sliding window, ``None`` for a global one, for the names ``"global"`` and
        ``"sliding"``; :attr:`~dpc_lens.model.ModelAdapter.attention_windows`)."""
        return {
            FLOW_QP: tuple(resolve_layers(self.qp_layers, n_layers, windows)),
            FLOW_QR: tuple(resolve_layers(self.qr_layers, n_layers, windows)),
            FLOW_PR: tuple(resolve_layers(self.pr_layers, n_layers, windows)),
        }

    def score(
        self,
        z_qp: Float[Tensor, "*prompts"] | float,
        z_qr: Float[Tensor, "*prompts"] | float,
        z_pr: Float[Tensor, "*prompts"] | float | None = None,
    ) -> Float[Tensor, "*prompts"] | float:
        """:func:`synthesized_score` with this config's ``lam`` and ``mu``."""
        return synthesized_score(z_qp, z_qr, z_pr, lam=self.lam, mu=self.mu)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "mu": self.mu,
            "tau": self.tau,
            "m": self.m,
            "qp_layers": layer_spec_json(self.qp_layers),
            "qr_layers": layer_spec_json(self.qr_layers),
            "pr_layers": layer_spec_json(self.pr_layers),
            "aggregate": self.aggregate,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IAPConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"IAPConfig.from_dict: unknown field(s) {sorted(unknown)}; known fields are "
                f"{sorted(cls.__dataclass_fields__)}."
            )
        return cls(**dict(d))


# ---------------------------------------------------------------------------------------------
# The score
# ---------------------------------------------------------------------------------------------


def synthesized_score(
    z_qp: Float[Tensor, "*prompts"] | float,
    z_qr: Float[Tensor, "*prompts"] | float,
    z_pr: Float[Tensor, "*prompts"] | float | None = None,
    *,
    lam: float = 0.5,
    mu: float = 0.0,
) -> Float[Tensor, "*prompts"] | float:
    """IAP's synthesised saliency score of a (question, prompt) pair::

        S = lam * z(question->prompt) + (1 - lam) * z(question->rationale) + mu * z(prompt->rationale)

    The z's are flows standardised per model and task (:class:`FlowStandardizer`). The IAP
    paper's exact formula is not public (it combines layer- and head-averaged saliency with one
    harmonic weight); this is dpc_lens's default, with every weight a knob (SPEC section 4).

    Works elementwise on floats or tensors of the same shape. ``z_pr`` may be omitted only when
    ``mu == 0``.
    """
    lam = _check_lam(lam, "synthesized_score")
    mu = _check_mu(mu, "synthesized_score")
    s = lam * z_qp + (1.0 - lam) * z_qr
    if mu != 0.0:
        if z_pr is None:
            raise InputError(
                f"synthesized_score: mu = {mu} weighs prompt->rationale but z_pr was not given; "
                "pass z_pr or set mu = 0."
            )
        s = s + mu * z_pr
    return s
