"""DPC's per-question record, typed: :class:`DPCRecord` (and one graded answer, :class:`AnswerRecord`).

:func:`~dpc_lens.dpc.run_dpc` builds one :class:`DPCRecord` per question and writes its
:meth:`~DPCRecord.to_dict` as one line of ``records.jsonl`` (through :mod:`dpc_lens.runs`); the
JSON is the same as before the record was typed, so old runs resume and load. Readers (plotting,
notebooks) go back with :meth:`DPCRecord.from_dict` or :func:`read_dpc_records`, which name an
unknown or misspelt key instead of failing later on a missing one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import DataError
from ..runs import read_records
from ..validate import check_keys

__all__ = ["AnswerRecord", "DPCRecord", "ANSWER_KINDS", "read_dpc_records"]


def _unknown_keys(d: Mapping[str, Any], known: Sequence[str], what: str) -> None:
    check_keys(d, known, what, error=DataError)


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DataError(f"{what} is a {type(value).__name__}; expected a JSON object (a dict).")
    return value


@dataclass(frozen=True)
class AnswerRecord:
    """One graded generation of a question.

    Attributes:
        answer: the extracted answer (``None`` when none was found); ``correct`` its grade.
        rationale: the generated text; ``stop_reason`` why generation stopped.
        fired: DPC's answer only: whether the trigger fired (its answer is then regenerated).
        corrupted_rows: the soft rows corrupted for this answer (DPC, always, random).
    """

    answer: str | None
    correct: bool
    rationale: str | None = None
    stop_reason: str | None = None
    fired: bool | None = None
    corrupted_rows: tuple[int, ...] | None = None

    _ORDER = ("rationale", "answer", "correct", "stop_reason", "fired", "corrupted_rows")

    def to_dict(self) -> dict[str, Any]:
        """The JSON of the answer (the keys the pipeline wrote; absent optional ones left out)."""
        out: dict[str, Any] = {}
        for k in self._ORDER:
            v = getattr(self, k)
            if k in ("answer", "correct") or v is not None:
                out[k] = list(v) if k == "corrupted_rows" else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "answer") -> AnswerRecord:
        d = _mapping(d, what)
        _unknown_keys(d, cls._ORDER, what)
        if "correct" not in d:
            raise DataError(f"{what} has no 'correct' key; it has {sorted(d)}.")
        rows = d.get("corrupted_rows")
        return cls(answer=d.get("answer"), correct=bool(d["correct"]), rationale=d.get("rationale"),
                   stop_reason=d.get("stop_reason"), fired=d.get("fired"),
                   corrupted_rows=tuple(int(r) for r in rows) if rows is not None else None)


ANSWER_KINDS = ("pt", "dpc", "base", "always", "random", "modal")


@dataclass(frozen=True)
class DPCRecord:
    """One question of a DPC run.

    Attributes:
        id, question, gold: the example.
        pt, dpc: vanilla prompt tuning's answer and DPC's (PT's unless the trigger fired).
        final_answer, final_correct: DPC's answer and grade.
        trigger: the trigger decision (:meth:`~dpc_lens.dpc.TriggerDecision.to_dict`), ``None``
            for an empty rationale; :attr:`decision` rebuilds it.
        located_rows: the soft rows the accumulation located (fired or not).
        flows: flow name -> per-layer flow of the PT generation (``{}`` when its rationale is
            empty); ``loss``: its teacher-forced loss.
        timings: seconds per phase.
        trigger_error: why the trigger could not be computed, if it could not.
        modal: the answer with the run's modal located rows corrupted (the ``modal`` baseline).
        base, always, random: the baselines asked for; ``random_draws``: every random draw when
            there are several (``random`` is the first).
        skipped: why the question was not run (too long for the model, ...); such a record has
            no answers and counts in no accuracy.
        random_candidates: the random draws restricted to the soft positions the locator may
            choose (sinks excluded), when that set is smaller than the whole soft prompt; absent,
            the restricted draws are the unrestricted ones (``random_draws`` / ``random``).
        rationale_tokens: the text of each token of the PT rationale, in the order of the
            trigger's per-token deep flow ``f_i`` (the report shades them); ``None`` in runs
            made before it was recorded.
    """

    id: Any = None
    question: str | None = None
    gold: str | None = None
    pt: AnswerRecord | None = None
    dpc: AnswerRecord | None = None
    final_answer: str | None = None
    final_correct: bool = False
    trigger: Mapping[str, Any] | None = None
    located_rows: tuple[int, ...] = ()
    flows: Mapping[str, list[float]] = field(default_factory=dict)
    loss: float | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    trigger_error: str | None = None
    base: AnswerRecord | None = None
    always: AnswerRecord | None = None
    random: AnswerRecord | None = None
    modal: AnswerRecord | None = None
    random_draws: tuple[AnswerRecord, ...] | None = None
    skipped: str | None = None
    rationale_tokens: tuple[str, ...] | None = None
    random_candidates: tuple[AnswerRecord, ...] | None = None

    @property
    def decision(self) -> Any:
        """The :class:`~dpc_lens.dpc.TriggerDecision` of :attr:`trigger` (``None`` without one)."""
        from .detector import TriggerDecision

        return TriggerDecision.from_dict(self.trigger) if self.trigger else None

    def _repr_html_(self) -> str:
        """The question as the run report shows it (:func:`dpc_lens.plotting.html.dpc_question`):
        PT and DPC side by side, the rationale's tokens shaded by their deep flow, the located
        soft rows; notebooks display it."""
        from ..plotting.html import dpc_question, fragment

        return fragment(dpc_question(self, open_=True))

    def answer(self, method: str) -> AnswerRecord | None:
        """The answer of ``method`` (``"pt"``, ``"dpc"``, ``"base"``, ``"always"``, ``"random"``),
        ``None`` when the run did not make it."""
        if method not in ANSWER_KINDS:
            raise DataError(f"no answer kind {method!r}; expected one of {list(ANSWER_KINDS)}.")
        return getattr(self, method)

    # ---------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The record's JSON, key for key what :func:`~dpc_lens.dpc.run_dpc` writes."""
        head = {"id": self.id, "question": self.question, "gold": self.gold}
        if self.skipped is not None:
            return {**head, "skipped": self.skipped, "final_answer": self.final_answer,
                    "final_correct": self.final_correct}
        out: dict[str, Any] = {
            **head,
            "pt": self.pt.to_dict() if self.pt is not None else None,
            "dpc": self.dpc.to_dict() if self.dpc is not None else None,
            "final_answer": self.final_answer,
            "final_correct": self.final_correct,
            "trigger": dict(self.trigger) if self.trigger is not None else None,
            "located_rows": list(self.located_rows),
            "flows": {k: list(v) for k, v in self.flows.items()},
            "loss": self.loss,
            "timings": dict(self.timings),
        }
        if self.trigger_error is not None:
            out["trigger_error"] = self.trigger_error
        for k in ("base", "always", "random", "modal"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k).to_dict()
        if self.random_draws is not None:
            out["random_draws"] = [a.to_dict() for a in self.random_draws]
        if self.rationale_tokens is not None:
            out["rationale_tokens"] = list(self.rationale_tokens)
        if self.random_candidates is not None:
            out["random_candidates"] = [a.to_dict() for a in self.random_candidates]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | DPCRecord) -> DPCRecord:
        """A record from its JSON (a line of ``records.jsonl``; a record itself is returned
        as is). Keys may be missing (hand-made records); an unknown one raises
        :class:`~dpc_lens.errors.DataError` naming it, with the closest known key."""
        if isinstance(d, DPCRecord):
            return d
        d = _mapping(d, "a DPC record")
        who = f"DPC record {d.get('id')!r}"
        _unknown_keys(d, [f.name for f in fields(cls)], who)
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in ANSWER_KINDS:
                kw[k] = AnswerRecord.from_dict(v, f"{who}, answer {k!r}") if v is not None else None
            elif k in ("random_draws", "random_candidates"):
                kw[k] = tuple(AnswerRecord.from_dict(a, f"{who}, random draw {j}") for j, a in enumerate(v))
            elif k == "located_rows":
                kw[k] = tuple(int(r) for r in (v or ()))
            elif k == "rationale_tokens":
                kw[k] = tuple(str(t) for t in v) if v is not None else None
            elif k in ("flows", "timings"):
                kw[k] = dict(_mapping(v, f"{who}, {k!r}")) if v is not None else {}
            elif k == "trigger":
                kw[k] = dict(_mapping(v, f"{who}, 'trigger'")) if v else None
            elif k == "final_correct":
                kw[k] = bool(v)
            else:
                kw[k] = v
        return cls(**kw)

    @staticmethod
    def to_dataframe(records: Iterable[Mapping[str, Any] | DPCRecord]) -> Any:
        """One row per record: ``id``, ``gold``, ``skipped``, ``fired``, ``n_located``,
        ``final_answer``, ``final_correct``, ``loss`` and ``<method>_answer`` /
        ``<method>_correct`` for every answer kind present."""
        import pandas as pd

        rows = []
        for r in map(DPCRecord.from_dict, records):
            row: dict[str, Any] = {"id": r.id, "gold": r.gold, "skipped": r.skipped,
                                   "fired": bool(r.dpc.fired) if r.dpc is not None else None,
                                   "n_located": len(r.located_rows),
                                   "final_answer": r.final_answer, "final_correct": r.final_correct,
                                   "loss": r.loss}
            for m in ANSWER_KINDS:
                a = getattr(r, m)
                if a is not None:
                    row[f"{m}_answer"], row[f"{m}_correct"] = a.answer, a.correct
            rows.append(row)
        return pd.DataFrame(rows)


def read_dpc_records(path: str | os.PathLike) -> list[DPCRecord]:
    """The records of a ``records.jsonl`` (:func:`dpc_lens.runs.read_records`: a torn last line
    dropped, a repeated id kept once), typed."""
    return [DPCRecord.from_dict(d) for d in read_records(path)]
