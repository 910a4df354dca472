"""IAP calibration on cached records: :class:`QuestionRecord` (z-scores and answers of one dev
question in pool order) and :func:`calibrate`, the grid search of lam, tau and m with its
sensitivity table. Model-free: it never generates."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, no_type_check

from torch import Tensor

from dpc_lens.errors import ConfigError, DataError, InputError
from dpc_lens.runs import read_json, write_json

from .pool import _JSON_VERSION
from .score import IAPConfig, _check_lam, _check_m, _check_mu, _check_tau, synthesized_score
from .select import Answer, iap_mv, iap_ss, majority_vote

if TYPE_CHECKING:  # pandas is imported lazily, only by to_dataframe()
    import pandas as pd

__all__ = [
    "QuestionRecord",
    "CalibrationResult",
    "calibrate",
]

# Classes marked ``@no_type_check`` validate and coerce raw user input in ``__post_init__``
# (lists -> tuples, strings -> prompts, ints -> floats) and explain what is wrong and how to fix
# it. The run-time type checker the test suite installs (jaxtyping's import hook) would otherwise
# check the raw ``__init__`` arguments against the *stored* field types and pre-empt those
# messages with a generic TypeCheckError. None of them has a tensor shape to check.


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class QuestionRecord:
    """The cached per-prompt results for one dev question, in pool order.

    Attributes:
        z_qp, z_qr: z-scored question->prompt and question->rationale flows, one per prompt.
        answers: the answer each prompt produced (``None``: none extracted).
        z_pr: z-scored prompt->rationale flows, or ``None`` when not measured (then only mu = 0
            can be used).
    """

    z_qp: tuple[float, ...]
    z_qr: tuple[float, ...]
    answers: tuple[Answer, ...]
    z_pr: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def floats(v, name):
            if isinstance(v, Tensor):
                v = v.detach().cpu().reshape(-1).tolist()
            try:
                t = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise InputError(f"QuestionRecord.{name} must be numbers, got {v!r}.") from None
            if not all(math.isfinite(x) for x in t):
                raise InputError(f"QuestionRecord.{name} has NaN or infinite values: {t!r}.")
            return t

        object.__setattr__(self, "z_qp", floats(self.z_qp, "z_qp"))
        object.__setattr__(self, "z_qr", floats(self.z_qr, "z_qr"))
        if self.z_pr is not None:
            object.__setattr__(self, "z_pr", floats(self.z_pr, "z_pr"))
        if isinstance(self.answers, str):
            raise InputError("QuestionRecord.answers must be a sequence of answers, got a string.")
        object.__setattr__(self, "answers", tuple(self.answers))
        for i, x in enumerate(self.answers):
            if x is not None and not isinstance(x, str):
                raise InputError(f"QuestionRecord.answers[{i}] must be a string or None, got {x!r}.")
        n = len(self.answers)
        lens = {"z_qp": len(self.z_qp), "z_qr": len(self.z_qr), "answers": n}
        if self.z_pr is not None:
            lens["z_pr"] = len(self.z_pr)
        if n == 0 or len(set(lens.values())) != 1:
            raise InputError(
                f"QuestionRecord: every field needs one entry per pool prompt, got lengths {lens}."
            )

    def scores(self, lam: float, mu: float = 0.0) -> list[float]:
        """:func:`synthesized_score` of every prompt, in pool order."""
        if mu != 0.0 and self.z_pr is None:
            raise InputError(
                f"QuestionRecord.scores: mu = {mu} but this record has no z_pr; record "
                "prompt->rationale flows or use mu = 0."
            )
        z_pr = self.z_pr if self.z_pr is not None else (0.0,) * len(self.answers)
        return [synthesized_score(q, r, p, lam=lam, mu=mu)
                for q, r, p in zip(self.z_qp, self.z_qr, z_pr, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "z_qp": list(self.z_qp),
            "z_qr": list(self.z_qr),
            "z_pr": None if self.z_pr is None else list(self.z_pr),
            "answers": list(self.answers),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuestionRecord:
        missing = {"z_qp", "z_qr", "answers"} - set(d)
        if missing:
            raise InputError(
                f"QuestionRecord.from_dict: missing field(s) {sorted(missing)}; expected z_qp, "
                "z_qr, answers and optionally z_pr."
            )
        return cls(z_qp=d["z_qp"], z_qr=d["z_qr"], answers=d["answers"], z_pr=d.get("z_pr"))


@dataclass(frozen=True)
class CalibrationResult:
    """Best IAP settings on a dev split, and how sensitive accuracy is to each.

    Attributes:
        best_ss: ``{"lam", "tau", "accuracy", "mean_tried"}`` — best IAP-ss setting.
        best_mv: ``{"lam", "m", "accuracy"}`` — best IAP-mv setting.
        sensitivity: rows ``{"strategy", "param", "value", "lam", "tau"|"m", "accuracy",
            "mean_tried"}``: accuracy as one parameter sweeps its grid with the other at its
            best value.
        grid: every evaluated setting (same row shape, ``param`` = ``"grid"``).
        baselines: ``{"single": [accuracy of each prompt], "majority": ..., "oracle": ...}``
            (oracle: some prompt's answer is correct; ``single`` is ``None`` when questions
            have pools of different sizes).
        n_questions: dev questions used. mu: the fixed prompt->rationale weight used.
        score_diagnostics: whether each z-scored flow and the chosen scores rank a right answer
            above a wrong one on dev, within a question and pooled, with bootstrap intervals
            (:func:`dpc_lens.iap.diagnostics.score_diagnostics`; keys: the z-scored flows, and
            ``"score"`` when IAP-ss and IAP-mv chose the same lam, else ``"score_ss"`` and
            ``"score_mv"``).
        degenerate: what the chosen settings reduce to on dev, one plain line per case
            (:func:`dpc_lens.iap.diagnostics.degenerate_choices`), or ``None``.
        grids: the lam, tau and m grids searched.
        warnings: plain lines for a score that does not rank prompts on dev.
    """

    best_ss: Mapping[str, float]
    best_mv: Mapping[str, float]
    sensitivity: tuple[Mapping[str, Any], ...]
    grid: tuple[Mapping[str, Any], ...]
    baselines: Mapping[str, Any]
    n_questions: int
    mu: float = 0.0
    score_diagnostics: Mapping[str, Any] | None = None
    degenerate: Mapping[str, str] | None = None
    grids: Mapping[str, Any] | None = None
    warnings: tuple[str, ...] = ()

    def config(self, strategy: Literal["iap_ss", "iap_mv"], base: IAPConfig | None = None) -> IAPConfig:
        """``base`` (default :class:`IAPConfig`) with the best lam and tau (IAP-ss) or lam and
        m (IAP-mv), and this calibration's mu. The two strategies may prefer different lam."""
        base = base or IAPConfig()
        if strategy == "iap_ss":
            return replace(base, lam=self.best_ss["lam"], tau=self.best_ss["tau"], mu=self.mu)
        if strategy == "iap_mv":
            return replace(base, lam=self.best_mv["lam"], m=int(self.best_mv["m"]), mu=self.mu)
        raise InputError(
            f"CalibrationResult.config: strategy must be 'iap_ss' or 'iap_mv', got {strategy!r}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "CalibrationResult",
            "version": _JSON_VERSION,
            "best_ss": dict(self.best_ss),
            "best_mv": dict(self.best_mv),
            "sensitivity": [dict(r) for r in self.sensitivity],
            "grid": [dict(r) for r in self.grid],
            "baselines": dict(self.baselines),
            "n_questions": self.n_questions,
            "mu": self.mu,
            "score_diagnostics": None if self.score_diagnostics is None else dict(self.score_diagnostics),
            "degenerate": None if self.degenerate is None else dict(self.degenerate),
            "grids": None if self.grids is None else dict(self.grids),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationResult:
        try:
            return cls(
                best_ss=dict(d["best_ss"]),
                best_mv=dict(d["best_mv"]),
                sensitivity=tuple(dict(r) for r in d["sensitivity"]),
                grid=tuple(dict(r) for r in d["grid"]),
                baselines=dict(d["baselines"]),
                n_questions=int(d["n_questions"]),
                mu=float(d.get("mu", 0.0)),
                # absent from calibrations saved before these were measured
                score_diagnostics=d.get("score_diagnostics"),
                degenerate=d.get("degenerate"),
                grids=d.get("grids"),
                warnings=tuple(d.get("warnings") or ()),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"CalibrationResult.from_dict: malformed data ({e!r}).") from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CalibrationResult:
        d = read_json(path, "calibration")
        return cls.from_dict(d)

    def to_dataframe(self, which: Literal["sensitivity", "grid"] = "sensitivity") -> pd.DataFrame:
        """The sensitivity table (or the full grid) as a pandas DataFrame."""
        import pandas as pd

        if which not in ("sensitivity", "grid"):
            raise InputError(f"to_dataframe: which must be 'sensitivity' or 'grid', got {which!r}.")
        return pd.DataFrame([dict(r) for r in getattr(self, which)])


def _check_grid(values: Sequence[Any], name: str, check: Callable[[Any, str], Any]) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"calibrate: {name} must be a non-empty sequence, got {values!r}.")
    vals = [check(v, f"calibrate({name})") for v in values]
    if not vals:
        raise ConfigError(f"calibrate: {name} is empty; give at least one value to try.")
    return vals


def calibrate(
    records: Sequence[QuestionRecord | Mapping[str, Any]],
    golds: Sequence[str],
    lam_grid: Sequence[float],
    tau_grid: Sequence[float],
    m_grid: Sequence[int],
    is_correct: Callable[[Answer, str], bool],
    *,
    mu: float = 0.0,
) -> CalibrationResult:
    """Grid-search lam and tau for IAP-ss, and lam and m for IAP-mv, on a labelled dev split.

    For every setting the strategy is applied to every question's cached scores and answers, and
    accuracy is the fraction of questions whose selected answer ``is_correct(answer, gold)``.
    The best setting is the most accurate; ties go to the earliest in grid order (lam first, then
    tau or m), so order the grids with the value you prefer on a tie first. ``mu`` is fixed.

    Args:
        records: one :class:`QuestionRecord` (or its ``to_dict()``) per dev question.
        golds: the gold answer of each question.
        lam_grid, tau_grid, m_grid: values to try.
        is_correct: the task's answer check (e.g. ``task.is_correct``).
        mu: weight of z(prompt->rationale) in every score.
    """
    recs = [r if isinstance(r, QuestionRecord) else QuestionRecord.from_dict(r) for r in records]
    golds = list(golds)
    if not recs:
        raise InputError("calibrate: no records; give one QuestionRecord per dev question.")
    if len(golds) != len(recs):
        raise InputError(f"calibrate: {len(recs)} records but {len(golds)} golds; give one gold per record.")
    if not callable(is_correct):
        raise InputError(
            "calibrate: is_correct must be a function (answer, gold) -> bool, e.g. task.is_correct."
        )
    lams = _check_grid(lam_grid, "lam_grid", _check_lam)
    taus = _check_grid(tau_grid, "tau_grid", _check_tau)
    ms = _check_grid(m_grid, "m_grid", _check_m)
    mu = _check_mu(mu, "calibrate")
    n = len(recs)

    correct_cache: dict[tuple[int, Answer], bool] = {}

    def ok(q: int, ans: Answer) -> bool:
        key = (q, ans)
        if key not in correct_cache:
            correct_cache[key] = bool(is_correct(ans, golds[q]))
        return correct_cache[key]

    scores_by_lam = {lam: [r.scores(lam, mu) for r in recs] for lam in lams}

    ss_rows: list[dict[str, Any]] = []
    for lam in lams:
        for tau in taus:
            picks = [iap_ss(s, r.answers, tau) for s, r in zip(scores_by_lam[lam], recs, strict=True)]
            acc = sum(ok(q, p.answer) for q, p in enumerate(picks)) / n
            ss_rows.append({"strategy": "iap_ss", "param": "grid", "value": None, "lam": lam,
                            "tau": tau, "accuracy": acc,
                            "mean_tried": sum(p.n_tried for p in picks) / n})
    mv_rows: list[dict[str, Any]] = []
    for lam in lams:
        for m in ms:
            picks = [iap_mv(s, r.answers, m) for s, r in zip(scores_by_lam[lam], recs, strict=True)]
            acc = sum(ok(q, p.answer) for q, p in enumerate(picks)) / n
            mv_rows.append({"strategy": "iap_mv", "param": "grid", "value": None, "lam": lam,
                            "m": m, "accuracy": acc,
                            "mean_tried": sum(p.n_tried for p in picks) / n})

    def best(rows):  # first row with the top accuracy (grid order breaks ties)
        top = max(r["accuracy"] for r in rows)
        return next(r for r in rows if r["accuracy"] == top)

    b_ss, b_mv = best(ss_rows), best(mv_rows)
    sens: list[dict[str, Any]] = []
    for rows, b, other in ((ss_rows, b_ss, "tau"), (mv_rows, b_mv, "m")):
        for r in rows:
            if r[other] == b[other]:
                sens.append({**r, "param": "lam", "value": r["lam"]})
        for r in rows:
            if r["lam"] == b["lam"]:
                sens.append({**r, "param": other, "value": r[other]})

    n_prompts = {len(r.answers) for r in recs}
    single: list[float] | None = None
    if len(n_prompts) == 1:
        k = n_prompts.pop()
        single = [sum(ok(q, r.answers[j]) for q, r in enumerate(recs)) / n for j in range(k)]
    baselines = {
        "single": single,
        "majority": sum(ok(q, majority_vote(r.answers)) for q, r in enumerate(recs)) / n,
        "oracle": sum(any(ok(q, a) for a in r.answers) for q, r in enumerate(recs)) / n,
    }
    # Does the score rank prompts on dev, and what do the chosen settings reduce to?
    from .diagnostics import FALLBACK, degenerate_choices, diagnostic_warnings, score_diagnostics

    correct = [[ok(q, a) for a in r.answers] for q, r in enumerate(recs)]
    tables: dict[str, list[list[float]]] = {
        "question->prompt": [list(r.z_qp) for r in recs],
        "question->rationale": [list(r.z_qr) for r in recs],
    }
    if all(r.z_pr is not None for r in recs):
        tables["prompt->rationale"] = [list(r.z_pr) for r in recs]
    if b_ss["lam"] == b_mv["lam"]:  # one score serves both strategies
        score_names = ["score"]
        tables["score"] = scores_by_lam[b_ss["lam"]]
    else:
        score_names = ["score_ss", "score_mv"]
        tables["score_ss"] = scores_by_lam[b_ss["lam"]]
        tables["score_mv"] = scores_by_lam[b_mv["lam"]]
    diag = score_diagnostics(tables, correct)
    k_pool = max(len(r.answers) for r in recs)
    degenerate = degenerate_choices(
        tau=b_ss["tau"], scores_ss=scores_by_lam[b_ss["lam"]], m=b_mv["m"], n_prompts=k_pool,
        chosen={"lam": b_ss["lam"], "tau": b_ss["tau"],
                **({"lam_mv": b_mv["lam"]} if b_mv["lam"] != b_ss["lam"] else {})},
        grids={"lam": lams, "tau": taus, "lam_mv": lams},
    )
    warns = diagnostic_warnings(diag, score_names, FALLBACK)
    return CalibrationResult(
        best_ss={"lam": b_ss["lam"], "tau": b_ss["tau"], "accuracy": b_ss["accuracy"],
                 "mean_tried": b_ss["mean_tried"]},
        best_mv={"lam": b_mv["lam"], "m": b_mv["m"], "accuracy": b_mv["accuracy"]},
        sensitivity=tuple(sens),
        grid=tuple(ss_rows + mv_rows),
        baselines=baselines,
        n_questions=n,
        mu=mu,
        score_diagnostics=diag,
        degenerate=degenerate,
        grids={"lam": lams, "tau": taus, "m": ms},
        warnings=tuple(warns),
    )
