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

Pieces, bottom to top (the first four are model-free, live in :mod:`dpc_lens.dpc.sweep` and are
tested on hand-built inputs):

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
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import DataError, InputError
from ..evaluation import any_right_oracle, grade, prompt_text
from ..generation import encode_prompts, generate
from ..model import as_adapter
from ..patching import corrupt_soft_prompt
from ..progress import bar
from ..runs import append_jsonl, read_json, repair_jsonl, resume_run, write_json
from ..soft_prompt import SoftPrompt
from .detector import DetectorInputs
from .pipeline import DPCConfig, analyse
from .sweep import (
    KNOBS,
    CalibrationGrid,
    Pair,
    PointScores,
    TriggerSweep,
    needed_pairs,
    score_points,
    select_best,
    sensitivity,
    sweep_triggers,
)

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
        always_accuracy: dev accuracy of corrupting the best setting's located tokens on every
            question (no trigger), beside ``best_accuracy``: a trigger that only recovers this is
            not choosing anything (``None`` when those generations were not run).
        trigger_auc: the best setting's trigger statistic (deep-flow affected share) judged on
            dev: AUC with a bootstrap interval for "corruption helps vs hurts" (PT wrong and the
            always-corrupted answer right, vs the other way round;
            :func:`~dpc_lens.dpc.diagnostics.trigger_auc`).
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
    always_accuracy: float | None = None
    trigger_auc: dict[str, Any] | None = None

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
        if self.always_accuracy is not None and self.best_accuracy <= self.always_accuracy:
            out.append(
                f"The best trigger ({100 * self.best_accuracy:.1f}%) does no better than corrupting the "
                f"located tokens on every dev question ({100 * self.always_accuracy:.1f}%): the trigger "
                "is not choosing which questions to corrupt."
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
            "always_accuracy": self.always_accuracy,
            "trigger_auc": self.trigger_auc,
            "notes": list(self.notes),
            "remarks": self.remarks,
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DPCCalibration":
        from ..errors import DataError
        from ..validate import check_keys

        needed = ["config", "best_point", "best_accuracy", "pt_accuracy", "best_trigger_rate", "n_examples",
                  "n_no_rationale", "points", "sensitivity", "n_generations", "grid"]
        known = needed + ["corruption_oracle_accuracy", "oracle_accuracy", "n_points", "notes", "remarks",
                          "timings", "always_accuracy", "trigger_auc"]
        check_keys(d, known, "A saved DPC calibration (calibration.json)", required=needed, error=DataError)
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
            always_accuracy=(float(d["always_accuracy"]) if d.get("always_accuracy") is not None
                             else None),
            trigger_auc=d.get("trigger_auc"),
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
    base_correct: Sequence[bool] | None = None,
) -> DPCCalibration:
    """Calibrate on cached detector inputs and correctness tables (no model).

    ``corrupted_correct`` maps ``(instance, sorted rows)`` to correctness for every pair of
    :func:`needed_pairs`; ``sweep`` may be passed when already computed for these inputs.
    ``base_correct`` (per instance, the base model's grade, when known) adds the trigger's dev
    AUC for "PT wrong and base right".
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
    if base_correct is not None and len(base_correct) != len(inputs):
        raise InputError(f"{len(base_correct)} base_correct values for {len(inputs)} instances.")
    always, auc = _always_and_auc(inputs, pt_correct, corrupted_correct, sweep, best, base_correct)
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
        always_accuracy=always,
        trigger_auc=auc,
    )


def always_pairs(sweep: TriggerSweep, point: int) -> list[Pair]:
    """The ``(instance, rows)`` pairs of corrupting grid point ``point``'s located rows on every
    instance that has inputs (what its always-corrupt accuracy needs)."""
    rows = sweep.point_rows(point)
    return [(i, r) for i, r in enumerate(rows) if r]


def _always_and_auc(inputs, pt_correct, corrupted_correct, sweep, best, base_correct=None):
    """Always-corrupt accuracy of the best setting and its trigger's AUC on dev: for "corruption
    helps vs hurts" when the always-corrupted answers were generated, for "PT wrong and base
    right" when ``base_correct`` is given (``None`` where neither)."""
    from .detector import dynamic_trigger
    from .diagnostics import trigger_auc

    cfg = sweep.config(best)
    present = [i for i, x in enumerate(inputs) if x is not None]
    share = {i: dynamic_trigger(inputs[i], cfg).deep_flow.affected_share for i in present}
    auc: dict[str, Any] = {"statistic": "deep_flow.affected_share"}
    always = None
    pairs = always_pairs(sweep, best)
    if all(p in corrupted_correct for p in pairs):
        corrupted = {i: bool(corrupted_correct[(i, r)]) for i, r in pairs}
        n = len(pt_correct)
        always = sum(corrupted.get(i, bool(pt_correct[i])) for i in range(n)) / n
        idx = sorted(corrupted)
        labels = [None if bool(pt_correct[i]) == corrupted[i] else corrupted[i] for i in idx]
        auc["corruption_helps_vs_hurts"] = trigger_auc([share[i] for i in idx], labels)
    if base_correct is not None:
        auc["pt_wrong_base_right"] = trigger_auc(
            [share[i] for i in present], [bool(base_correct[i]) and not bool(pt_correct[i]) for i in present])
    return always, (auc if len(auc) > 1 else None)


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
    progress: bool | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    base_correct: Mapping[Any, bool] | None = None,
) -> DPCCalibration:
    """Grid-search DPC's detector knobs on labelled dev ``examples``, maximising accuracy.

    ``base_correct``: example id -> whether the base model (no soft prompt) answers it right,
    when already known (e.g. the real test bed's ``answers_dev_base.jsonl``); it adds the
    trigger's dev AUC for "PT wrong and base right" at no model cost.

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
    from ..tasks import resolve_task
    from ..validate import as_config

    task = resolve_task(task)  # a name or a task object, checked before any model work
    cfg = as_config(base_config, DPCConfig, "base_config")
    grid = as_config(grid, CalibrationGrid, "grid")
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
    from .pipeline import _check_room, check_config_fits

    check_config_fits(cfg, soft_prompt)
    _check_room(adapter, soft_prompt, cfg)  # no dev question could fit: refuse before any work
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
    with RunLock(out_dir, "calibrate") if out_dir is not None else nullcontext():
        base = None
        if base_correct is not None:
            missing = [i for i in ids if i not in base_correct]
            if missing:
                raise InputError(f"base_correct has no entry for {len(missing)} dev example(s) (e.g. "
                                 f"{missing[0]!r}); give one per example id, or leave it None.")
            base = [bool(base_correct[i]) for i in ids]
        cal = _calibrate_locked(adapter, soft_prompt, examples, ids, task, cfg, grid, progress,
                                out_dir, resume, base)
        if out_dir is not None:
            cal.save(out_dir)
        return cal


def _inputs_json(x: DetectorInputs | None) -> dict[str, Any] | None:
    if x is None:
        return None
    # the sink tensors too when measured, so a resumed calibration can still detect sinks
    return {k: v.tolist() for k, v in x.to_tensors().items()}


def _inputs_from_json(d: Mapping[str, Any] | None) -> DetectorInputs | None:
    if d is None:
        return None
    return DetectorInputs(**{k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()})


def _calibrate_locked(adapter, soft_prompt, examples, ids, task, cfg, grid, progress, out_dir,
                      resume, base_correct=None) -> DPCCalibration:
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
    for s in bar(range(0, len(todo), step), progress=progress, desc="PT generate + saliency", leave=False):
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
    for s in bar(range(0, len(order_todo), step), progress=progress, desc="corrupted generate", leave=False):
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
    # the best point's always-corrupt accuracy, reported beside it, needs its located rows
    # corrupted on every question; the best point is known from the fired pairs alone
    t0 = time.perf_counter()
    n_r = len(sweep.R)
    best = select_best(score_points(sweep.fired, [sweep.rows[p // n_r] for p in range(sweep.n_points)],
                                    pt_correct, table))
    extra = []
    for i, rows in always_pairs(sweep, best):
        key = (examples[i].id, tuple(rows))
        if (i, rows) in table:
            continue
        if key in cached_cor:
            table[(i, rows)] = cached_cor[key]
        else:
            extra.append((i, rows))
    for s in range(0, len(extra), cfg.generation.batch_size):
        chunk = extra[s:s + cfg.generation.batch_size]
        gens = generate(adapter, [prompts[i] for i, _ in chunk],
                        [corrupt_soft_prompt(soft_prompt, rows, cfg.corruption) for _, rows in chunk],
                        cfg.generation, progress=False)
        done_rows = []
        for (i, rows), g in zip(chunk, gens):
            table[(i, rows)] = grade(task, g.text, examples[i])[1]
            done_rows.append({"id": examples[i].id, "rows": list(rows), "correct": table[(i, rows)]})
        if cor_path is not None:
            append_jsonl(cor_path, done_rows)
    timings["always_generate_s"] = time.perf_counter() - t0

    n_gen = {"pt": len(todo), "corrupted": len(order_todo), "total": len(todo) + len(order_todo) + len(extra)}
    if extra:
        n_gen["always"] = len(extra)  # the best point's always-corrupt answers not generated above
    reused = len(examples) - len(todo) + len(order) - len(order_todo)
    if reused:
        n_gen["reused"] = reused
    return calibrate_from_cache(
        inputs, pt_correct, table, grid, cfg,
        sweep=sweep, n_generations=n_gen, timings=timings, base_correct=base_correct,
    )
