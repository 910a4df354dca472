"""Fit DPC's detector knobs on a labelled dev split (SPEC section 3: "dpc_lens should fit them
on a labelled dev split (calibration) and report how sensitive accuracy is to each").

The grid search never re-runs the model per setting. Three facts make that possible:

1. The prompt-tuned (PT) answer and the saliency of an instance do not depend on any detector
   knob: one :func:`~dpc_lens.dpc.analyse` pass per example (PT generation + one forward /
   backward) caches its :class:`~dpc_lens.detector.DetectorInputs`.
2. The trigger decision and the located rows of every grid point are pure tensor maths on those
   cached inputs (:func:`~dpc_lens.detector.dynamic_trigger`, well under a millisecond); R
   changes no statistic, so it is swept on the stored decisions with
   :func:`~dpc_lens.detector.fires_at_thresholds`.
3. The corrupted answer of an instance depends only on the *set* of soft rows corrupted. So the
   pairs ``(example, rows)`` that some grid point fires on are collected over the whole grid,
   deduplicated, and generated once, in batches (``generate`` takes one soft prompt per prompt).

Then, for every grid point p over the N dev examples::

    accuracy(p) = 1/N * sum_i ( fired_p(i) ? corrupted_correct(i, rows_p(i)) : pt_correct(i) )

Cost: N PT generations + N saliency passes + one generation per distinct fired
``(example, rows)`` pair (at most N * #distinct row sets, whatever the grid size).

Pieces, bottom to top (the first four are model-free, and tested on hand-built inputs):

* :class:`CalibrationGrid` - the knob values to try (a frozen, validated config).
* :func:`sweep_triggers` - every grid point's trigger decisions and located rows on cached inputs.
* :func:`needed_pairs` / :func:`score_points` - the distinct corrupted generations a sweep needs,
  and the accuracy of every grid point given the correctness tables.
* :func:`sensitivity` and :func:`calibrate_from_cache` - the best point and how accuracy moves with
  each knob, as a :class:`DPCCalibration`.
* :func:`calibrate_dpc` - the model-running wrapper.

The best accuracy is measured on the split it was chosen on, so it is optimistic; judge the
chosen config with :func:`~dpc_lens.dpc.run_dpc` on a held-out split.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, get_args

import torch
from tqdm.auto import tqdm

from .._typing import Bool, Float, Tensor
from ..errors import ConfigError, DataError, InputError
from ..evaluation import any_right_oracle, grade, prompt_text
from ..generation import encode_prompts, generate
from ..model import as_adapter
from ..patching import corrupt_soft_prompt
from ..runs import append_jsonl, read_json, repair_jsonl, resume_run, write_json
from ..soft_prompt import SoftPrompt
from .detector import (
    DetectorConfig,
    DetectorInputs,
    LayerSpec,
    SinkMode,
    Statistic,
    dynamic_trigger,
    resolve_layers,
)
from .diagnostics import fires_at_thresholds, fit_sink_scale
from .pipeline import DPCConfig, analyse

__all__ = [
    "KNOBS",
    "CalibrationGrid",
    "TriggerSweep",
    "PointScores",
    "DPCCalibration",
    "sweep_triggers",
    "needed_pairs",
    "score_points",
    "select_best",
    "sensitivity",
    "calibrate_from_cache",
    "calibrate_dpc",
]

#: The knobs a grid point sets, in the order tables show them.
KNOBS: tuple[str, ...] = ("statistic", "beta", "top_k", "shallow_layers", "deep_layers", "sink", "R")

#: ``(example index, sorted corrupted soft rows)``: the key of one corrupted generation.
Pair = tuple[int, tuple[int, ...]]

_STATISTICS: tuple[str, ...] = get_args(Statistic)
_SINKS: tuple[str, ...] = get_args(SinkMode)


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
        sink: sink modes for soft column 0 (default ``"keep"`` and ``"exclude"``;
            ``"normalize"`` fits its ``sink_scale`` on the dev inputs with
            :func:`~dpc_lens.detector.fit_sink_scale`, per statistic and shallow set).

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

    def __post_init__(self) -> None:
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
                * len(self.shallow_layers) * len(self.deep_layers) * len(self.sink))

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
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CalibrationGrid":
        known = {"R", "statistic", "beta_values", "include_first_half_mean", "top_k",
                 "shallow_layers", "deep_layers", "sink"}
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


def _resolved_specs(specs: Sequence[Any], n_layers: int, name: str, notes: list[str]) -> list[Any]:
    kept: list[Any] = []
    seen: dict[tuple[int, ...], Any] = {}
    for spec in specs:
        try:
            layers = tuple(resolve_layers(spec, n_layers))
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
            counted = n_soft - (1 if sink == "exclude" else 0)
            if k > counted:
                raise InputError(
                    f"CalibrationGrid.top_k={k} but only {counted} soft positions are counted "
                    f"(P={n_soft}, sink={sink!r}); drop that top_k from the grid."
                )
    notes: list[str] = []
    shallow = _resolved_specs(grid.shallow_layers, n_layers, "shallow_layers", notes)
    deep = _resolved_specs(grid.deep_layers, n_layers, "deep_layers", notes)

    sink_scales: dict[tuple[str, Any], float] = {}
    if "normalize" in grid.sink:
        for stat in grid.statistic:
            for sh in shallow:
                ref = DetectorConfig(statistic=stat, shallow_layers=sh)
                scale = fit_sink_scale(present, ref)
                sink_scales[(stat, sh)] = scale
                notes.append(f"sink_scale for statistic={stat!r}, shallow_layers="
                             f"{_spec_json(sh)!r}: {scale:.6g} (fitted on the dev inputs)")

    base_fields = {k: v for k, v in base.to_dict().items()
                   if k in ("require_accumulation", "accumulation_measure", "accumulation_threshold")}
    settings: list[DetectorConfig] = []
    labels: list[dict[str, Any]] = []
    for stat in grid.statistic:
        for beta in grid.betas:
            for k in grid.top_k:
                for sh in shallow:
                    for dp in deep:
                        for sink in grid.sink:
                            cfg = DetectorConfig(
                                shallow_layers=sh, deep_layers=dp, statistic=stat,
                                beta_mode="first_half_mean" if beta == "first_half_mean" else "fixed",
                                beta_value=None if beta == "first_half_mean" else float(beta),
                                R=base.R, sink=sink,
                                sink_scale=sink_scales.get((stat, sh)) if sink == "normalize" else None,
                                top_k=k, **base_fields,
                            )
                            settings.append(cfg)
                            labels.append({"statistic": stat, "beta": beta, "top_k": k,
                                           "shallow_layers": _spec_json(sh),
                                           "deep_layers": _spec_json(dp), "sink": sink})
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
    for knob in KNOBS:
        values: list[Any] = []
        for pt in points:
            if pt[knob] not in values:
                values.append(pt[knob])
        rows = []
        for v in values:
            at_best = next(
                (acc[p] for p, pt in enumerate(points)
                 if pt[knob] == v and all(pt[o] == ref[o] for o in KNOBS if o != knob)),
                None,
            )
            rows.append({"value": v, "at_best": at_best,
                         "best": max(acc[p] for p, pt in enumerate(points) if pt[knob] == v)})
        out[knob] = rows
    return out


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DPCCalibration:
    """What calibration found, and what it cost.

    Attributes:
        config: the chosen :class:`~dpc_lens.dpc.DPCConfig` (the base config with the best
            detector fields); saved as ``dpc_config.json`` for ``DPCConfig.load``.
        best_point: the knob values of the best grid point.
        best_accuracy: its accuracy on the dev split (optimistic: chosen on that split).
        pt_accuracy: vanilla prompt-tuning accuracy on the same split.
        corruption_oracle_accuracy: share of instances right with the PT answer or with at least
            one corrupted answer generated (what a perfect chooser among them could reach; not
            the DPC run's ``oracle``, which is base or PT, see :mod:`dpc_lens.evaluation`).
        best_trigger_rate: share of instances the best point fires on.
        n_examples: dev examples; ``n_no_rationale``: those with an empty rationale (never fire).
        points, accuracy, trigger_rate, wrong_to_right, right_to_wrong: one entry per grid point.
        sensitivity: :func:`sensitivity` of the accuracy.
        n_generations: ``{"pt", "corrupted", "total"}`` generations run, with
            ``"naive"``: what re-running each grid point's corrupted generations would cost.
        grid: the grid searched; ``notes``: layer sets dropped / merged, fitted sink scales.
        timings: seconds per stage.
    """

    config: DPCConfig
    best_point: dict[str, Any]
    best_accuracy: float
    pt_accuracy: float
    corruption_oracle_accuracy: float
    best_trigger_rate: float
    n_examples: int
    n_no_rationale: int
    points: tuple[dict[str, Any], ...]
    accuracy: tuple[float, ...]
    trigger_rate: tuple[float, ...]
    wrong_to_right: tuple[int, ...]
    right_to_wrong: tuple[int, ...]
    sensitivity: dict[str, list[dict[str, Any]]]
    n_generations: dict[str, int]
    grid: CalibrationGrid
    notes: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        """``best_accuracy - pt_accuracy`` on the dev split."""
        return self.best_accuracy - self.pt_accuracy

    @property
    def remarks(self) -> list[str]:
        """What a user must know before trusting the chosen point: it never fires (DPC with it
        is vanilla PT), or the dev split is too small to tell the grid points apart."""
        out = []
        if self.best_trigger_rate == 0:
            out.append(
                "The chosen point never fires on the dev split: DPC with this config answers exactly "
                "like vanilla prompt tuning (no grid point beat PT here). Use a larger or different "
                "dev split, or a wider grid, before relying on it."
            )
        step = 1.0 / self.n_examples if self.n_examples else 1.0
        tied = sum(1 for a in self.accuracy if round(a, 12) == round(self.best_accuracy, 12))
        if self.n_examples < 50:
            out.append(
                f"Only {self.n_examples} dev examples: one question moves accuracy by "
                f"{100 * step:.1f} points, so the grid points are not separable. Calibrate on 100 "
                "or more examples."
            )
        elif tied > 1 and len(self.accuracy) > 1:
            out.append(
                f"{tied} of {len(self.accuracy)} grid points tie at the best accuracy; the dev "
                "split cannot separate them (the one firing least was chosen)."
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "best_point": dict(self.best_point),
            "best_accuracy": self.best_accuracy,
            "pt_accuracy": self.pt_accuracy,
            "corruption_oracle_accuracy": self.corruption_oracle_accuracy,
            "best_trigger_rate": self.best_trigger_rate,
            "n_examples": self.n_examples,
            "n_no_rationale": self.n_no_rationale,
            "n_points": len(self.points),
            "n_generations": dict(self.n_generations),
            "sensitivity": self.sensitivity,
            "points": [
                {**p, "accuracy": a, "trigger_rate": t, "wrong_to_right": w, "right_to_wrong": r}
                for p, a, t, w, r in zip(self.points, self.accuracy, self.trigger_rate,
                                         self.wrong_to_right, self.right_to_wrong)
            ],
            "grid": self.grid.to_dict(),
            "notes": list(self.notes),
            "remarks": self.remarks,
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DPCCalibration":
        pts = [dict(p) for p in d["points"]]
        extra = ("accuracy", "trigger_rate", "wrong_to_right", "right_to_wrong")
        return cls(
            config=DPCConfig.from_dict(d["config"]),
            best_point=dict(d["best_point"]),
            best_accuracy=float(d["best_accuracy"]),
            pt_accuracy=float(d["pt_accuracy"]),
            corruption_oracle_accuracy=float(  # files written before 0.2 say "oracle_accuracy"
                d.get("corruption_oracle_accuracy", d.get("oracle_accuracy"))),
            best_trigger_rate=float(d["best_trigger_rate"]),
            n_examples=int(d["n_examples"]),
            n_no_rationale=int(d["n_no_rationale"]),
            points=tuple({k: v for k, v in p.items() if k not in extra} for p in pts),
            accuracy=tuple(float(p["accuracy"]) for p in pts),
            trigger_rate=tuple(float(p["trigger_rate"]) for p in pts),
            wrong_to_right=tuple(int(p["wrong_to_right"]) for p in pts),
            right_to_wrong=tuple(int(p["right_to_wrong"]) for p in pts),
            sensitivity={k: [dict(r) for r in v] for k, v in d["sensitivity"].items()},
            n_generations={k: int(v) for k, v in d["n_generations"].items()},
            grid=CalibrationGrid.from_dict(d["grid"]),
            notes=tuple(d.get("notes", ())),
            timings={k: float(v) for k, v in d.get("timings", {}).items()},
        )

    def save(self, out_dir: str | os.PathLike) -> str:
        """Write ``calibration.json`` (everything) and ``dpc_config.json`` (the chosen config,
        loadable by :meth:`DPCConfig.load`) into ``out_dir``; return the directory."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "calibration.json"), self.to_dict())
        self.config.save(os.path.join(out_dir, "dpc_config.json"))
        return out_dir

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "DPCCalibration":
        """Read back what :meth:`save` wrote."""
        path = os.path.join(os.fspath(out_dir), "calibration.json")
        d = read_json(path, "DPC calibration")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path!r} is not a calibration file: {exc}") from exc

    def to_dataframe(self) -> Any:
        """One row per grid point: the knob values (layer specs as text), accuracy,
        trigger rate, flips, and ``is_best``."""
        import pandas as pd

        recs = []
        best = self.points.index(self.best_point) if self.best_point in self.points else -1
        for p, (pt, a, t, w, r) in enumerate(zip(self.points, self.accuracy, self.trigger_rate,
                                                  self.wrong_to_right, self.right_to_wrong)):
            row = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in pt.items()}
            row.update(accuracy=a, trigger_rate=t, wrong_to_right=w, right_to_wrong=r, is_best=p == best)
            recs.append(row)
        return pd.DataFrame.from_records(recs)

    def sensitivity_dataframe(self) -> Any:
        """One row per (knob, value): ``at_best`` and ``best`` accuracy."""
        import pandas as pd

        recs = [{"knob": k, "value": json.dumps(r["value"]) if isinstance(r["value"], list) else r["value"],
                 "at_best": r["at_best"], "best": r["best"]}
                for k, rows in self.sensitivity.items() for r in rows]
        return pd.DataFrame.from_records(recs)


def calibrate_from_cache(
    inputs: Sequence[DetectorInputs | None],
    pt_correct: Sequence[bool],
    corrupted_correct: Mapping[Pair, bool],
    grid: CalibrationGrid | None = None,
    base_config: DPCConfig | None = None,
    *,
    sweep: TriggerSweep | None = None,
    n_generations: Mapping[str, int] | None = None,
    timings: Mapping[str, float] | None = None,
) -> DPCCalibration:
    """Calibrate on cached detector inputs and correctness tables (no model).

    ``corrupted_correct`` maps ``(instance, sorted rows)`` to correctness for every pair of
    :func:`needed_pairs`; ``sweep`` may be passed when already computed for these inputs.
    """
    grid = grid or CalibrationGrid()
    base = base_config or DPCConfig()
    if len(pt_correct) != len(inputs):
        raise InputError(f"{len(pt_correct)} pt_correct values for {len(inputs)} instances.")
    sweep = sweep or sweep_triggers(inputs, grid, base.detector)
    n_r = len(sweep.R)
    rows_per_point = [sweep.rows[p // n_r] for p in range(sweep.n_points)]
    scores = score_points(sweep.fired, rows_per_point, pt_correct, corrupted_correct)
    best = select_best(scores)
    n = sweep.n_instances
    acc = tuple(float(a) for a in scores.accuracy)
    rate = tuple(int(x) / n for x in scores.n_fired)
    oracle = any_right_oracle(
        [pt_correct[i], *(v for (j, _), v in corrupted_correct.items() if j == i)] for i in range(n)
    )
    gens = dict(n_generations or {})
    gens.setdefault("naive", int(sum(int(x) for x in scores.n_fired)) + n)
    return DPCCalibration(
        config=replace(base, detector=sweep.config(best)),
        best_point=dict(sweep.points[best]),
        best_accuracy=acc[best],
        pt_accuracy=sum(bool(x) for x in pt_correct) / n,
        corruption_oracle_accuracy=oracle,
        best_trigger_rate=rate[best],
        n_examples=n,
        n_no_rationale=sum(1 for x in inputs if x is None),
        points=tuple(dict(p) for p in sweep.points),
        accuracy=acc,
        trigger_rate=rate,
        wrong_to_right=tuple(int(x) for x in scores.wrong_to_right),
        right_to_wrong=tuple(int(x) for x in scores.right_to_wrong),
        sensitivity=sensitivity(sweep.points, acc, best),
        n_generations=gens,
        grid=grid,
        notes=sweep.notes,
        timings=dict(timings or {}),
    )


# --------------------------------------------------------------------------------------------
# With a model
# --------------------------------------------------------------------------------------------


def calibrate_dpc(
    model: Any,
    soft_prompt: SoftPrompt,
    examples: Sequence[Any],
    task: Any,
    base_config: DPCConfig | None = None,
    grid: CalibrationGrid | None = None,
    *,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> DPCCalibration:
    """Grid-search DPC's detector knobs on labelled dev ``examples``, maximising accuracy.

    Steps: (1) PT generation of every example, and one saliency pass each (:func:`analyse`);
    (2) :func:`sweep_triggers` over the grid on the cached inputs; (3) one corrupted generation
    per distinct fired ``(example, rows)`` pair (:func:`needed_pairs`), in batches of
    ``base_config.generation.batch_size`` with one corrupted soft prompt per row; (4) scores,
    best point and sensitivity (:func:`calibrate_from_cache`).

    Everything but the detector (template, BOS, corruption mode, decoding, saliency batch)
    comes from ``base_config`` and is kept in the chosen config. The caller's soft prompt and
    model are not modified.

    With ``out_dir`` the directory is locked for the run and every finished generation batch
    is kept in ``out_dir/calibration_progress/`` (``pt.jsonl``: PT correctness and detector
    inputs per example; ``corrupted.jsonl``: correctness per corrupted pair), so a killed
    calibration continues with ``resume=True`` (``--resume``) instead of starting over; the
    result is saved there (:meth:`DPCCalibration.save`) at the end.

    Raises:
        InputError: no examples, repeated ids, a soft prompt that does not fit the model, or a
            grid that does not fit the model (see :func:`sweep_triggers`); RunError: the output
            directory is locked, not writable, or holds another calibration without ``resume``.
    """
    cfg = base_config or DPCConfig()
    grid = grid or CalibrationGrid()
    adapter = as_adapter(model)
    if not isinstance(soft_prompt, SoftPrompt):
        raise InputError(f"soft_prompt must be a SoftPrompt, got {type(soft_prompt).__name__}.")
    soft_prompt.for_model(adapter)
    examples = list(examples)
    if not examples:
        raise InputError("calibrate_dpc needs at least one labelled dev example.")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise InputError("Example ids must be unique in the dev split.")
    from contextlib import nullcontext

    from ..runs import RunLock, check_out_dir
    from .pipeline import check_config_fits

    check_config_fits(cfg, soft_prompt)
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
    with RunLock(out_dir, "calibrate") if out_dir is not None else nullcontext():
        cal = _calibrate_locked(adapter, soft_prompt, examples, ids, task, cfg, grid, progress,
                                out_dir, resume)
        if out_dir is not None:
            cal.save(out_dir)
        return cal


def _inputs_json(x: DetectorInputs | None) -> dict[str, Any] | None:
    if x is None:
        return None
    return {k: getattr(x, k).tolist() for k in
            ("soft_columns", "soft_columns_norm", "rationale_rows", "rationale_rows_norm")}


def _inputs_from_json(d: Mapping[str, Any] | None) -> DetectorInputs | None:
    if d is None:
        return None
    return DetectorInputs(**{k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()})


def _calibrate_locked(adapter, soft_prompt, examples, ids, task, cfg, grid, progress, out_dir,
                      resume) -> DPCCalibration:
    timings: dict[str, float] = {}
    prog = os.path.join(out_dir, "calibration_progress") if out_dir is not None else None
    pt_path = os.path.join(prog, "pt.jsonl") if prog else None
    cor_path = os.path.join(prog, "corrupted.jsonl") if prog else None
    cached_pt: dict[str, dict] = {}
    cached_cor: dict[tuple[str, tuple[int, ...]], bool] = {}
    if prog is not None:
        settings = {"config": cfg.to_dict(), "grid": grid.to_dict()}
        settings["config"].pop("saliency_batch_size", None)
        settings["config"]["generation"].pop("batch_size", None)
        settings_path = os.path.join(prog, "settings.json")
        on_disk = resume_run(
            pt_path, resume=resume, settings_path=settings_path, settings=settings,
            exists_message=(f"{out_dir} holds a calibration already ({pt_path}). Pass --resume "
                            "(resume=True) to continue it, or choose another --out."),
            mismatch_message=lambda old, new: (
                f"Cannot resume the calibration in {out_dir}: it was started with another "
                "config or grid. Resume with the same --config, or choose another --out."),
        )
        if resume:
            cached_pt = {r["id"]: r for r in on_disk}
            for r in repair_jsonl(cor_path, key=lambda r: (r.get("id"), tuple(r.get("rows", ()))))[0]:
                cached_cor[(r["id"], tuple(r["rows"]))] = bool(r["correct"])

    t0 = time.perf_counter()
    prompts = encode_prompts(adapter, [prompt_text(cfg.template, e.question) for e in examples],
                             add_bos=cfg.add_bos)
    inputs: list[DetectorInputs | None] = [None] * len(examples)
    pt_correct: list[bool] = [False] * len(examples)
    todo = []
    for i, ex in enumerate(examples):
        if ex.id in cached_pt:
            inputs[i] = _inputs_from_json(cached_pt[ex.id]["inputs"])
            pt_correct[i] = bool(cached_pt[ex.id]["pt_correct"])
        else:
            todo.append(i)
    step = cfg.generation.batch_size
    for s in tqdm(range(0, len(todo), step), desc="PT generate + saliency", disable=not progress,
                  leave=False):
        idx = todo[s:s + step]
        gens = generate(adapter, [prompts[i] for i in idx], soft_prompt, cfg.generation,
                        progress=False)
        ans = analyse(adapter, soft_prompt, [examples[i].question for i in idx], cfg,
                      generations=gens, progress=False)
        rows = []
        for i, g, a in zip(idx, gens, ans):
            ex = examples[i]
            inputs[i] = a.inputs
            pt_correct[i] = grade(task, g.text, ex)[1]
            rows.append({"id": ex.id, "pt_correct": pt_correct[i], "inputs": _inputs_json(a.inputs)})
        if pt_path is not None:
            append_jsonl(pt_path, rows)
    timings["pt_generate_and_saliency_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweep = sweep_triggers(inputs, grid, cfg.detector)
    pairs = needed_pairs(sweep)
    timings["sweep_s"] = time.perf_counter() - t0

    # shortest prompts together, so batches carry little padding (results do not depend on it)
    order = sorted(pairs, key=lambda pr: (len(prompts[pr[0]]), pr))
    table: dict[Pair, bool] = {}
    for i, rows in order:
        key = (examples[i].id, tuple(rows))
        if key in cached_cor:
            table[(i, rows)] = cached_cor[key]
    order_todo = [pr for pr in order if pr not in table]
    t0 = time.perf_counter()
    step = cfg.generation.batch_size
    for s in tqdm(range(0, len(order_todo), step), desc="corrupted generate", disable=not progress,
                  leave=False):
        chunk = order_todo[s:s + step]
        softs = [corrupt_soft_prompt(soft_prompt, rows, cfg.corruption) for _, rows in chunk]
        gens = generate(adapter, [prompts[i] for i, _ in chunk], softs, cfg.generation,
                        progress=False)
        done_rows = []
        for (i, rows), g in zip(chunk, gens):
            ex = examples[i]
            table[(i, rows)] = grade(task, g.text, ex)[1]
            done_rows.append({"id": ex.id, "rows": list(rows), "correct": table[(i, rows)]})
        if cor_path is not None:
            append_jsonl(cor_path, done_rows)
    timings["corrupted_generate_s"] = time.perf_counter() - t0

    n_gen = {"pt": len(todo), "corrupted": len(order_todo), "total": len(todo) + len(order_todo)}
    reused = len(examples) - len(todo) + len(order) - len(order_todo)
    if reused:
        n_gen["reused"] = reused
    return calibrate_from_cache(
        inputs, pt_correct, table, grid, cfg,
        sweep=sweep, n_generations=n_gen, timings=timings,
    )
