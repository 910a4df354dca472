"""Which soft tokens DPC corrupts: the locators, as pure functions of one instance's column
scores (and, for the dev-relative one, a profile fitted on the dev split).

Three locators (selected in :class:`~dpc_lens.dpc.DetectorConfig`):

* **the paper's argmax** (``locator="argmax"``, ``sink="keep"``): the ``k`` soft positions with
  the largest shallow-layer column score (:func:`argmax_locate`);
* **argmax with sinks handled** (``locator="argmax"`` with ``sink="exclude"`` or
  ``"normalize"``): the sink policy acts on the sink positions -- position 0
  (``sink_source="position0"``, the SPEC's assumption) or the sinks detected from attention
  received (``sink_source="detected"``, :mod:`dpc_lens.dpc.sinks`) -- before the argmax
  (:func:`apply_sink_policy`, :func:`candidate_positions`);
* **dev-relative z** (``locator="z"``): each position's share of the column score, z-scored
  against its mean and spread on the dev split (:class:`LocatorProfile`), so a position that is
  large on *every* question (a sink) is not located unless it is unusually large on this one
  (:func:`z_locate`).

Ties go to the lower position everywhere (stable sort), so a locator is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._typing import Float, Tensor
from ..errors import ConfigError, DataError, InputError
from ..layers import normalize_layer_spec, resolve_layers

__all__ = [
    "candidate_positions",
    "apply_sink_policy",
    "argmax_locate",
    "z_locate",
    "column_shares",
    "LocatorProfile",
]


def _vector(x: Any, name: str) -> Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or not x.is_floating_point():
        raise InputError(f"{name} must be a 1-D floating-point tensor [soft], got "
                         f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}.")
    return x.detach().to("cpu", torch.float64)


def _positions(sinks: Sequence[int], n_soft: int) -> list[int]:
    out = sorted({int(j) for j in sinks})
    if out and (out[0] < 0 or out[-1] >= n_soft):
        raise InputError(f"sink positions {out} fall outside the {n_soft} soft positions.")
    return out


def candidate_positions(n_soft: int, sinks: Sequence[int], policy: str) -> list[int]:
    """The soft positions a locator may choose: all of them, except the sinks under
    ``policy="exclude"``. The random-corruption baseline draws from the same set."""
    sinks_ = _positions(sinks, n_soft)
    if policy == "exclude":
        return [j for j in range(n_soft) if j not in sinks_]
    return list(range(n_soft))


def apply_sink_policy(
    column: Float[Tensor, " soft"],
    sinks: Sequence[int],
    policy: str,
    sink_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(scores, counted)``: the column scores after the sink policy, and which positions count.

    ``keep``: unchanged; ``exclude``: sinks set to 0 and not counted; ``normalize``: each sink's
    score divided by ``sink_scale`` (its usual excess over an ordinary position).
    """
    c = _vector(column, "column")
    s = _positions(sinks, c.shape[0])
    scores = c.clone()
    counted = torch.ones(c.shape[0], dtype=torch.bool)
    if policy == "exclude":
        counted[s] = False
        scores[s] = 0.0
    elif policy == "normalize":
        if sink_scale is None or not sink_scale > 0:
            raise InputError(f"sink='normalize' needs sink_scale > 0, got {sink_scale!r}; see "
                             "fit_sink_scale().")
        scores[s] = scores[s] / float(sink_scale)
    elif policy != "keep":
        raise InputError(f"sink policy {policy!r} is not one of ('keep', 'exclude', 'normalize').")
    return scores, counted


def argmax_locate(scores: Float[Tensor, " soft"], k: int, counted: Tensor | None = None) -> tuple[int, ...]:
    """The ``k`` counted positions with the largest score, by descending score (ties: lower
    position first). The paper's locator when ``scores`` is the raw column score."""
    s = _vector(scores, "scores")
    mask = torch.ones(s.shape[0], dtype=torch.bool) if counted is None else counted.to(torch.bool)
    if int(mask.sum()) < k or k < 1:
        raise InputError(f"cannot locate top_k={k} among {int(mask.sum())} counted soft positions "
                         f"(P={s.shape[0]}); lower top_k.")
    ranked = torch.where(mask, s, torch.tensor(-math.inf, dtype=torch.float64))
    return tuple(int(i) for i in torch.sort(ranked, descending=True, stable=True).indices[:k].tolist())


def column_shares(column: Float[Tensor, " soft"]) -> Tensor:
    """``p_j = c_j / sum_j c_j``: each position's share of the shallow column score."""
    c = _vector(column, "column")
    total = float(c.sum())
    if total <= 0:
        raise InputError("the soft-column scores sum to 0; no flow reached the soft prompt.")
    return c / total


def z_locate(column: Float[Tensor, " soft"], profile: LocatorProfile, k: int,
             counted: Tensor | None = None) -> tuple[tuple[int, ...], Tensor]:
    """``(located, z)``: ``z_j = (p_j - mean_j) / std_j`` with ``p = column_shares(column)`` and
    the dev profile's per-position mean and std; the ``k`` counted positions with the largest z."""
    p = column_shares(column)
    if p.shape[0] != profile.n_soft:
        raise InputError(f"the locator profile was fitted on {profile.n_soft} soft positions, this "
                         f"instance has {p.shape[0]}; refit it for this soft prompt.")
    z = (p - torch.tensor(profile.mean, dtype=torch.float64)) / torch.tensor(profile.std, dtype=torch.float64)
    return argmax_locate(z, k, counted), z


@dataclass(frozen=True)
class LocatorProfile:
    """The dev split's per-position share profile for ``locator="z"`` (fitted like IAP's
    :class:`~dpc_lens.iap.FlowStandardizer`: sample std, ddof 1; a position with zero spread is
    refused, not patched with an epsilon that would make its z-scores huge).

    Attributes:
        statistic, shallow_layers: the detector settings the shares were computed with (a
            :class:`~dpc_lens.dpc.DetectorConfig` using the profile must have the same).
        mean, std: per soft position, the mean and sample std of ``p_j`` over the dev instances.
        count: dev instances fitted on.
    """

    statistic: str
    shallow_layers: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "shallow_layers",
                           normalize_layer_spec(self.shallow_layers, "LocatorProfile.shallow_layers"))
        mean, std = tuple(float(x) for x in self.mean), tuple(float(x) for x in self.std)
        if not mean or len(mean) != len(std):
            raise ConfigError(f"LocatorProfile: mean has {len(mean)} positions and std {len(std)}; "
                              "both need one value per soft position.")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise ConfigError("LocatorProfile: every mean must be finite and every std finite and > 0; "
                              "refit it with LocatorProfile.fit on dev inputs.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "count", int(self.count))

    @property
    def n_soft(self) -> int:
        return len(self.mean)

    @classmethod
    def fit(cls, inputs: Sequence[Any], statistic: str = "normalized",
            shallow_layers: Any = "shallow") -> LocatorProfile:
        """Fit on dev :class:`~dpc_lens.dpc.DetectorInputs` (``None`` entries skipped): per
        position, mean and sample std of its share of the shallow column score."""
        items = [x for x in inputs if x is not None]
        if len(items) < 2:
            raise InputError(f"LocatorProfile.fit needs at least 2 dev instances with detector "
                             f"inputs, got {len(items)}.")
        shares = []
        for x in items:
            layers = resolve_layers(shallow_layers, x.n_layers, x.windows)
            col = x.columns(statistic).detach().to("cpu", torch.float64)[layers].sum(0)
            shares.append(column_shares(col))
        if len({s.shape[0] for s in shares}) != 1:
            raise InputError("LocatorProfile.fit: the dev inputs disagree on the number of soft positions.")
        t = torch.stack(shares)
        std = t.std(dim=0, correction=1)
        if bool((std == 0).any()):
            flat = [int(j) for j in torch.nonzero(std == 0).flatten().tolist()]
            raise InputError(f"LocatorProfile.fit: soft positions {flat} have the same share on every "
                             "dev instance (std 0), so their z-scores are undefined; fit on more "
                             "varied dev data.")
        return cls(statistic, shallow_layers, tuple(t.mean(0).tolist()), tuple(std.tolist()), len(items))

    def to_dict(self) -> dict[str, Any]:
        sl = self.shallow_layers
        return {"kind": "LocatorProfile", "statistic": self.statistic,
                "shallow_layers": list(sl) if isinstance(sl, tuple) else sl,
                "mean": list(self.mean), "std": list(self.std), "count": self.count}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LocatorProfile:
        need = ("statistic", "shallow_layers", "mean", "std", "count")
        if not isinstance(d, Mapping) or any(k not in d for k in need):
            raise DataError(f"LocatorProfile.from_dict: expected a mapping with {list(need)} (as written "
                            f"by to_dict), got {d!r:.200}.")
        sl = d["shallow_layers"]
        try:
            return cls(str(d["statistic"]), tuple(sl) if isinstance(sl, list) else sl,
                       tuple(d["mean"]), tuple(d["std"]), int(d["count"]))
        except (ConfigError, TypeError, ValueError) as e:
            raise DataError(f"LocatorProfile.from_dict: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write as JSON (never pickle)."""
        from ..runs import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LocatorProfile:
        from ..runs import read_json

        try:
            return cls.from_dict(read_json(path, "locator profile"))
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
