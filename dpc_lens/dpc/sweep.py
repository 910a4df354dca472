"""DPC calibration's model-free half: the grid of knob values, every grid point's trigger
decisions on cached detector inputs, the distinct corrupted generations a sweep needs, each
point's accuracy from the correctness tables, and how accuracy moves with each knob.

Tested on hand-built inputs; :mod:`dpc_lens.dpc.calibration` runs the model around it (see its
docstring for why the grid search never re-runs the model per setting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any, get_args

import torch

from .._typing import Bool, Float, Tensor
from ..errors import ConfigError, InputError
from .detector import (
    DetectorConfig,
    DetectorInputs,
    LayerSpec,
    Locator,
    SinkMode,
    SinkSource,
    Statistic,
    dynamic_trigger,
    resolve_layers,
)
from .diagnostics import fires_at_thresholds, fit_sink_scale
from .locate import LocatorProfile

__all__ = [
    "KNOBS",
    "Pair",
    "CalibrationGrid",
    "TriggerSweep",
    "PointScores",
    "sweep_triggers",
    "needed_pairs",
    "score_points",
    "select_best",
    "sensitivity",
]

#: The knobs a grid point sets, in the order tables show them.
KNOBS: tuple[str, ...] = ("statistic", "beta", "top_k", "shallow_layers", "deep_layers", "sink", "R")
#: Knobs a grid point names only when the grid tries more than their default (``locator``
#: ``("argmax",)``, ``sink_source`` ``("position0",)``), so calibrations saved before they existed
#: keep their points and tables.
EXTRA_KNOBS: tuple[str, ...] = ("locator", "sink_source")

#: ``(example index, sorted corrupted soft rows)``: the key of one corrupted generation.
Pair = tuple[int, tuple[int, ...]]

_STATISTICS: tuple[str, ...] = get_args(Statistic)
_SINKS: tuple[str, ...] = get_args(SinkMode)
_LOCATORS: tuple[str, ...] = get_args(Locator)
_SINK_SOURCES: tuple[str, ...] = get_args(SinkSource)


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def _spec_json(spec: Any) -> Any:
    """A normalised layer spec as JSON: a name, a list of ints, or a list of two floats."""
    return list(spec) if isinstance(spec, tuple) else spec


def _norm_spec(spec: Any, what: str) -> Any:
    # DetectorConfig normalises and validates a layer spec's form (the range needs n_layers).
    field_name = "shallow_layers" if what == "shallow_layers" else "deep_layers"
    try:
        return getattr(DetectorConfig(**{field_name: spec}), field_name)
    except ConfigError as err:
        raise ConfigError(f"CalibrationGrid.{what}: {err}") from None


def _tuple_of(value: Any, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(
            f"CalibrationGrid.{name}={value!r} must be a sequence of values to try, e.g. "
            f"{name}=({value!r},)."
        )
    out = tuple(value)
    if name != "beta_values" and not out:
        raise ConfigError(f"CalibrationGrid.{name} is empty; give at least one value to try.")
    return out


def _no_repeats(values: Sequence[Any], name: str) -> None:
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise ConfigError(f"CalibrationGrid.{name} lists {v!r} twice; give each value once.")
        seen.append(v)


@dataclass(frozen=True)
class CalibrationGrid:
    """The detector knob values calibration tries (every combination is one grid point).

    Attributes:
        R: affected-share thresholds in [0, 1] (default 0.1 .. 0.9 in steps of 0.1). Swept on
            stored decisions, so long lists cost nothing.
        statistic: ``"raw"`` and/or ``"normalized"`` (both by default: SPEC section 3 asks
            calibration to be able to choose between them).
        beta_values: fixed betas to try besides the paper's first-half mean (default none).
            A fixed beta is on the scale of the statistic (a share in [0, 1] for
            ``"normalized"``, raw saliency for ``"raw"``).
        include_first_half_mean: try ``beta_mode="first_half_mean"`` (default True).
        top_k: numbers of located soft tokens to corrupt (default 1, 2, 3).
        shallow_layers: layer sets for accumulation (any :func:`~dpc_lens.detector.resolve_layers`
            form). Default: ``"shallow"`` (first third without layer 0), the first half
            ``(0.0, 0.5)`` and the first quarter ``(0.0, 0.25)`` (both with layer 0).
        deep_layers: layer sets for the deep flow. Default: ``"deep"`` (last third), the last
            half ``(0.5, 1.0)`` and the last quarter ``(0.75, 1.0)``.
        sink: sink modes (default ``"keep"`` and ``"exclude"``; ``"normalize"`` fits its
            ``sink_scale`` on the dev inputs with :func:`~dpc_lens.detector.fit_sink_scale`, per
            statistic, shallow set and sink source).
        locator: locators to try (default ``("argmax",)``, the paper's); ``"z"`` fits its
            :class:`~dpc_lens.dpc.locate.LocatorProfile` on the dev inputs per statistic and
            shallow set (``z`` with ``sink="normalize"`` is skipped: z already normalises).
        sink_source: which positions the sink policy treats as sinks (default
            ``("position0",)``; ``"detected"``: from attention received, see
            :mod:`dpc_lens.dpc.sinks`).

    Against a given model, layer sets that select no layer (e.g. ``(0.75, 1.0)`` of a 2-layer
    model) are dropped and sets that resolve to the same layers as an earlier one are merged;
    :attr:`DPCCalibration.notes` says which.

    Raises:
        ConfigError: an empty or repeated list, or a value the detector would refuse.
    """

    R: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))
    statistic: tuple[Statistic, ...] = ("raw", "normalized")
    beta_values: tuple[float, ...] = ()
    include_first_half_mean: bool = True
    top_k: tuple[int, ...] = (1, 2, 3)
    shallow_layers: tuple[LayerSpec, ...] = ("shallow", (0.0, 0.5), (0.0, 0.25))
    deep_layers: tuple[LayerSpec, ...] = ("deep", (0.5, 1.0), (0.75, 1.0))
    sink: tuple[SinkMode, ...] = ("keep", "exclude")
    locator: tuple[Locator, ...] = ("argmax",)
    sink_source: tuple[SinkSource, ...] = ("position0",)

    def __post_init__(self) -> None:
        for name, allowed in (("locator", _LOCATORS), ("sink_source", _SINK_SOURCES)):
            vals = _tuple_of(getattr(self, name), name)
            for v in vals:
                if v not in allowed:
                    raise ConfigError(f"CalibrationGrid.{name} holds {v!r}; expected values from {allowed}.")
            _no_repeats(vals, name)
            object.__setattr__(self, name, vals)
        rs = _tuple_of(self.R, "R")
        for r in rs:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
                raise ConfigError(
                    f"CalibrationGrid.R holds {r!r}; every R is a share threshold in [0, 1]."
                )
        rs = tuple(float(r) for r in rs)
        _no_repeats(rs, "R")
        object.__setattr__(self, "R", rs)
        stats = _tuple_of(self.statistic, "statistic")
        for s in stats:
            if s not in _STATISTICS:
                raise ConfigError(
                    f"CalibrationGrid.statistic holds {s!r}; expected values from {_STATISTICS}."
                )
        _no_repeats(stats, "statistic")
        object.__setattr__(self, "statistic", stats)
        betas = _tuple_of(self.beta_values, "beta_values")
        for b in betas:
            if (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(float(b))
                    or float(b) < 0):
                raise ConfigError(
                    f"CalibrationGrid.beta_values holds {b!r}; a fixed beta is a finite number >= 0."
                )
        betas = tuple(float(b) for b in betas)
        _no_repeats(betas, "beta_values")
        object.__setattr__(self, "beta_values", betas)
        if not isinstance(self.include_first_half_mean, bool):
            raise ConfigError("CalibrationGrid.include_first_half_mean must be True or False.")
        if not self.include_first_half_mean and not betas:
            raise ConfigError(
                "CalibrationGrid has no beta to try: set include_first_half_mean=True or give "
                "beta_values."
            )
        ks = _tuple_of(self.top_k, "top_k")
        for k in ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"CalibrationGrid.top_k holds {k!r}; every top_k is an int >= 1.")
        _no_repeats(ks, "top_k")
        object.__setattr__(self, "top_k", ks)
        for name in ("shallow_layers", "deep_layers"):
            specs = tuple(_norm_spec(s, name) for s in _tuple_of(getattr(self, name), name))
            _no_repeats(specs, name)
            object.__setattr__(self, name, specs)
        sinks = _tuple_of(self.sink, "sink")
        for s in sinks:
            if s not in _SINKS:
                raise ConfigError(f"CalibrationGrid.sink holds {s!r}; expected values from {_SINKS}.")
        _no_repeats(sinks, "sink")
        object.__setattr__(self, "sink", sinks)

    @property
    def betas(self) -> tuple[str | float, ...]:
        """The beta options: ``"first_half_mean"`` and/or fixed values (floats)."""
        return (("first_half_mean",) if self.include_first_half_mean else ()) + self.beta_values

    @property
    def size(self) -> int:
        """Number of grid points (before layer sets are resolved against a model)."""
        return (len(self.R) * len(self.statistic) * len(self.betas) * len(self.top_k)
                * len(self.shallow_layers) * len(self.deep_layers) * len(self.sink)
                * len(self.locator) * len(self.sink_source))

    @property
    def knobs(self) -> tuple[str, ...]:
        """The knobs a grid point names: :data:`KNOBS`, plus ``locator`` / ``sink_source`` when
        the grid tries anything but their default."""
        extra = tuple(k for k, default in zip(EXTRA_KNOBS, (("argmax",), ("position0",)))
                      if getattr(self, k) != default)
        return KNOBS + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "R": list(self.R),
            "statistic": list(self.statistic),
            "beta_values": list(self.beta_values),
            "include_first_half_mean": self.include_first_half_mean,
            "top_k": list(self.top_k),
            "shallow_layers": [_spec_json(s) for s in self.shallow_layers],
            "deep_layers": [_spec_json(s) for s in self.deep_layers],
            "sink": list(self.sink),
            **({"locator": list(self.locator)} if self.locator != ("argmax",) else {}),
            **({"sink_source": list(self.sink_source)} if self.sink_source != ("position0",) else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CalibrationGrid":
        known = {"R", "statistic", "beta_values", "include_first_half_mean", "top_k",
                 "shallow_layers", "deep_layers", "sink", "locator", "sink_source"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown CalibrationGrid fields {unknown}; known: {sorted(known)}.")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


# --------------------------------------------------------------------------------------------
# Model-free core: sweep, pairs, scores
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TriggerSweep:
    """Every grid point's decisions on cached inputs.

    A *setting* is one combination of the knobs other than R (what changes a statistic); grid
    point ``p = setting * len(R) + r``.

    Attributes:
        settings: per setting, the :class:`DetectorConfig` (with ``R`` of the base config).
        R: the R values.
        fired: ``[point, instance]``; instances without inputs (empty rationale) never fire.
        rows: ``rows[setting][instance]``: the located top-k soft rows, sorted (``()`` without
            inputs). Only fired instances are corrupted.
        points: per point, its knob values as JSON-safe values (see :data:`KNOBS`).
        notes: layer sets dropped or merged against this model, fitted sink scales.
    """

    settings: tuple[DetectorConfig, ...]
    R: tuple[float, ...]
    fired: Bool[Tensor, "point instance"]
    rows: tuple[tuple[tuple[int, ...], ...], ...]
    points: tuple[dict[str, Any], ...]
    notes: tuple[str, ...] = ()

    @property
    def n_points(self) -> int:
        return int(self.fired.shape[0])

    @property
    def n_instances(self) -> int:
        return int(self.fired.shape[1])

    def point_rows(self, point: int) -> tuple[tuple[int, ...], ...]:
        """The located rows of every instance at grid point ``point``."""
        return self.rows[point // len(self.R)]

    def config(self, point: int) -> DetectorConfig:
        """The full detector config of grid point ``point``."""
        return replace(self.settings[point // len(self.R)], R=self.R[point % len(self.R)])


def _resolved_specs(specs: Sequence[Any], n_layers: int, name: str, notes: list[str],
                    windows: Sequence[int | None] | None = None) -> list[Any]:
    kept: list[Any] = []
    seen: dict[tuple[int, ...], Any] = {}
    for spec in specs:
        try:
            layers = tuple(resolve_layers(spec, n_layers, windows))
        except ConfigError as err:
            notes.append(f"{name} {_spec_json(spec)!r} dropped for this {n_layers}-layer model: {err}")
            continue
        if layers in seen:
            notes.append(
                f"{name} {_spec_json(spec)!r} resolves to layers {list(layers)}, the same as "
                f"{_spec_json(seen[layers])!r}; merged into it."
            )
            continue
        seen[layers] = spec
        kept.append(spec)
    if not kept:
        raise ConfigError(
            f"CalibrationGrid.{name}: no layer set selects any layer of this {n_layers}-layer "
            f"model ({'; '.join(notes)}). Give index lists or wider fraction pairs."
        )
    return kept


def sweep_triggers(
    inputs: Sequence[DetectorInputs | None],
    grid: CalibrationGrid | None = None,
    base: DetectorConfig | None = None,
) -> TriggerSweep:
    """Run the Dynamic Trigger for every grid point on cached inputs (no model).

    For each setting (the knobs other than R) :func:`~dpc_lens.detector.dynamic_trigger` runs
    once per instance; :func:`~dpc_lens.detector.fires_at_thresholds` then gives the decision
    for every R. The fields the grid does not cover (``require_accumulation``,
    ``accumulation_measure``, ``accumulation_threshold``) come from ``base``.

    Raises:
        InputError: no instance has inputs, the inputs disagree on n_layers / n_soft, or a
            ``top_k`` of the grid exceeds the soft positions counted.
        ConfigError: no layer set of the grid fits the model.
    """
    grid = grid or CalibrationGrid()
    base = base or DetectorConfig()
    items = list(inputs)
    if not items:
        raise InputError("sweep_triggers: got no instances; pass one DetectorInputs (or None) each.")
    present = [x for x in items if x is not None]
    bad = [type(x).__name__ for x in present if not isinstance(x, DetectorInputs)]
    if bad:
        raise InputError(f"sweep_triggers: expected DetectorInputs or None, got {sorted(set(bad))}.")
    if not present:
        raise InputError(
            "sweep_triggers: no instance has detector inputs (every rationale was empty); "
            "nothing can be calibrated. Raise max_new_tokens or check the soft prompt."
        )
    shapes = {(x.n_layers, x.n_soft) for x in present}
    if len(shapes) != 1:
        raise InputError(
            f"sweep_triggers: inputs disagree on (n_layers, n_soft): {sorted(shapes)}; they must "
            "come from one model and one soft prompt."
        )
    n_layers, n_soft = shapes.pop()
    for k in grid.top_k:
        for sink in grid.sink:
            # detected sinks vary per instance: an instance with too few candidates is refused
            # by dynamic_trigger itself
            counted = n_soft - (1 if sink == "exclude" and "position0" in grid.sink_source else 0)
            if k > counted:
                raise InputError(
                    f"CalibrationGrid.top_k={k} but only {counted} soft positions are counted "
                    f"(P={n_soft}, sink={sink!r}); drop that top_k from the grid."
                )
    notes: list[str] = []
    windows = present[0].windows  # one model: the same layer types on every instance
    shallow = _resolved_specs(grid.shallow_layers, n_layers, "shallow_layers", notes, windows)
    deep = _resolved_specs(grid.deep_layers, n_layers, "deep_layers", notes, windows)

    sink_fields = {"sink_threshold": base.sink_threshold,
                   "sink_residual_threshold": base.sink_residual_threshold}
    sink_scales: dict[tuple[str, Any, str], float] = {}
    if "normalize" in grid.sink:
        for stat in grid.statistic:
            for sh in shallow:
                for src in grid.sink_source:
                    ref = DetectorConfig(statistic=stat, shallow_layers=sh, sink_source=src, **sink_fields)
                    scale = fit_sink_scale(present, ref)
                    sink_scales[(stat, sh, src)] = scale
                    notes.append(f"sink_scale for statistic={stat!r}, shallow_layers="
                                 f"{_spec_json(sh)!r}, sink_source={src!r}: {scale:.6g} (fitted on "
                                 "the dev inputs)")
    profiles: dict[tuple[str, Any], LocatorProfile] = {}
    if "z" in grid.locator:
        for stat in grid.statistic:
            for sh in shallow:
                profiles[(stat, sh)] = LocatorProfile.fit(present, stat, sh)
                notes.append(f"locator profile for statistic={stat!r}, shallow_layers={_spec_json(sh)!r} "
                             f"fitted on {len(present)} dev instances")
        if "normalize" in grid.sink:
            notes.append("locator='z' with sink='normalize' skipped: z already compares each position "
                         "with its dev profile")

    base_fields = {k: getattr(base, k) for k in ("require_accumulation", "accumulation_measure",
                                                 "accumulation_threshold")}
    base_fields.update(sink_fields)
    knobs = grid.knobs
    settings: list[DetectorConfig] = []
    labels: list[dict[str, Any]] = []
    for stat in grid.statistic:
        for beta in grid.betas:
            for k in grid.top_k:
                for sh in shallow:
                    for dp in deep:
                        for sink, loc, src in product(grid.sink, grid.locator, grid.sink_source):
                            if loc == "z" and sink == "normalize":
                                continue
                            cfg = DetectorConfig(
                                shallow_layers=sh, deep_layers=dp, statistic=stat,
                                beta_mode="first_half_mean" if beta == "first_half_mean" else "fixed",
                                beta_value=None if beta == "first_half_mean" else float(beta),
                                R=base.R, sink=sink,
                                sink_scale=sink_scales.get((stat, sh, src)) if sink == "normalize" else None,
                                top_k=k, sink_source=src, locator=loc,
                                locator_profile=profiles.get((stat, sh)) if loc == "z" else None,
                                **base_fields,
                            )
                            settings.append(cfg)
                            label = {"statistic": stat, "beta": beta, "top_k": k,
                                     "shallow_layers": _spec_json(sh),
                                     "deep_layers": _spec_json(dp), "sink": sink,
                                     "locator": loc, "sink_source": src}
                            labels.append({key: v for key, v in label.items() if key in knobs})
    n = len(items)
    fired = torch.zeros(len(settings), len(grid.R), n, dtype=torch.bool)
    rows: list[tuple[tuple[int, ...], ...]] = []
    idx = [i for i, x in enumerate(items) if x is not None]
    for s, cfg in enumerate(settings):
        decisions = [dynamic_trigger(items[i], cfg) for i in idx]
        fires = fires_at_thresholds(
            decisions, grid.R,
            [cfg.accumulation_threshold] if cfg.require_accumulation else None,
        )[:, 0, :]  # [R, present instance]
        fired[s][:, idx] = fires
        per = [()] * n
        for i, d in zip(idx, decisions):
            per[i] = tuple(sorted(d.accumulation.top_indices))
        rows.append(tuple(per))
    points = tuple({**lab, "R": r} for lab in labels for r in grid.R)
    return TriggerSweep(tuple(settings), grid.R, fired.reshape(-1, n), tuple(rows), points, tuple(notes))


def needed_pairs(sweep: TriggerSweep) -> list[Pair]:
    """The distinct ``(instance, rows)`` pairs some grid point fires on, sorted.

    One corrupted generation per pair is all the scoring needs, whatever the grid size.
    """
    pairs: set[Pair] = set()
    n_r = len(sweep.R)
    for s, per in enumerate(sweep.rows):
        any_fired = sweep.fired[s * n_r:(s + 1) * n_r].any(dim=0)
        for i in torch.nonzero(any_fired).flatten().tolist():
            pairs.add((int(i), per[i]))
    return sorted(pairs)


@dataclass(frozen=True, eq=False)
class PointScores:
    """Per grid point: accuracy, how many instances fired, and the flips against vanilla PT."""

    accuracy: Float[Tensor, " point"]
    n_fired: Tensor
    wrong_to_right: Tensor
    right_to_wrong: Tensor


def score_points(
    fired: Bool[Tensor, "point instance"],
    rows: Sequence[Sequence[Sequence[int]]],
    pt_correct: Sequence[bool],
    corrupted_correct: Mapping[Pair, bool],
) -> PointScores:
    """Accuracy of every grid point from the correctness tables (pure; no model).

    ``accuracy[p] = mean_i ( fired[p, i] ? corrupted_correct[(i, sorted(rows[p][i]))]
    : pt_correct[i] )``.

    Args:
        fired: ``[point, instance]`` trigger decisions.
        rows: ``rows[p][i]``, the soft rows corrupted at point p for instance i (read only where
            fired; order does not matter).
        pt_correct: per instance, whether the vanilla prompt-tuning answer is right.
        corrupted_correct: ``(i, sorted rows) -> correct`` for every fired pair.

    Raises:
        InputError: shapes disagree, or a fired pair has no entry in ``corrupted_correct``.
    """
    if fired.ndim != 2 or fired.dtype != torch.bool:
        raise InputError(f"fired must be a bool [point, instance] tensor, got {fired.dtype} "
                         f"{tuple(fired.shape)}.")
    n_p, n = fired.shape
    if len(pt_correct) != n:
        raise InputError(f"{len(pt_correct)} pt_correct values for {n} instances.")
    if len(rows) != n_p or any(len(r) != n for r in rows):
        raise InputError(f"rows must be [point][instance] = [{n_p}][{n}].")
    if n == 0:
        raise InputError("score_points: no instances; accuracy of zero examples is undefined.")
    pt = torch.tensor([bool(x) for x in pt_correct], dtype=torch.bool)
    final = pt.repeat(n_p, 1)
    for p, i in torch.nonzero(fired).tolist():
        key = (i, tuple(sorted(int(r) for r in rows[p][i])))
        if key not in corrupted_correct:
            raise InputError(
                f"grid point {p} fires on instance {i} with rows {list(key[1])}, but the corrupted "
                "table has no answer for that pair; generate every pair of needed_pairs()."
            )
        final[p, i] = bool(corrupted_correct[key])
    return PointScores(
        accuracy=final.double().mean(dim=1),
        n_fired=fired.sum(dim=1),
        wrong_to_right=(fired & ~pt & final).sum(dim=1),
        right_to_wrong=(fired & pt & ~final).sum(dim=1),
    )


def select_best(scores: PointScores) -> int:
    """Index of the best point: highest accuracy; ties go to the point that fires on fewer
    instances (the smaller change from vanilla PT), then to the earlier point in grid order.

    Accuracies are compared after rounding to 12 decimals, so float noise cannot break a tie.
    """
    acc = [round(float(a), 12) for a in scores.accuracy]
    fires = [int(x) for x in scores.n_fired]
    return min(range(len(acc)), key=lambda p: (-acc[p], fires[p], p))


def sensitivity(
    points: Sequence[Mapping[str, Any]], accuracy: Sequence[float] | Tensor, best: int
) -> dict[str, list[dict[str, Any]]]:
    """How accuracy moves with each knob (pure).

    For every knob in :data:`KNOBS` and every value v it takes in the grid (grid order):

    * ``at_best``: accuracy of the point equal to the best one except that knob = v;
    * ``best``: the best accuracy over all points with that knob = v (other knobs free).
    """
    acc = [float(a) for a in accuracy]
    if len(acc) != len(points):
        raise InputError(f"{len(acc)} accuracies for {len(points)} points.")
    ref = points[best]
    out: dict[str, list[dict[str, Any]]] = {}
    knobs = [k for k in KNOBS + EXTRA_KNOBS if k in ref]
    for knob in knobs:
        values: list[Any] = []
        for pt in points:
            if pt[knob] not in values:
                values.append(pt[knob])
        rows = []
        for v in values:
            at_best = next(
                (acc[p] for p, pt in enumerate(points)
                 if pt[knob] == v and all(pt[o] == ref[o] for o in knobs if o != knob)),
                None,
            )
            rows.append({"value": v, "at_best": at_best,
                         "best": max(acc[p] for p, pt in enumerate(points) if pt[knob] == v)})
        out[knob] = rows
    return out
