"""What every task shares: one example, and the interface a task implements.

A task knows how to read its data file into :class:`Example` records, how to pull a final
answer out of a free-form rationale, and how to compare it with the gold answer. Pipelines
(DPC, IAP) only talk to this interface, so a new data set is one new module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dpc_lens.errors import InputError

__all__ = ["Example", "Task", "accuracy"]


@dataclass(frozen=True)
class Example:
    """One question with its gold answer.

    Attributes:
        id: stable identifier (the line number in the source file when it has none).
        question: the text the model sees (for multiple choice: question plus the options).
        answer: the gold final answer, already normalised by the task.
        rationale: the gold worked solution, when the data set has one (used for gold-label
            saliency and for prompt tuning), else ``None``.
        meta: anything else the data set carries (options, level, template, number of steps).
    """

    id: str
    question: str
    answer: str
    rationale: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "rationale": self.rationale,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Example":
        return cls(
            id=str(d["id"]),
            question=d["question"],
            answer=str(d["answer"]),
            rationale=d.get("rationale"),
            meta=dict(d.get("meta") or {}),
        )


class Task(Protocol):
    """The interface a task module's task object implements."""

    name: str

    def load(self, path: str) -> list[Example]:
        """Read a local data file; raise :class:`dpc_lens.errors.DataError` naming the line
        and field when it is missing or malformed."""

    def extract_answer(self, text: str) -> str | None:
        """The final answer in a generated rationale, normalised; ``None`` when none is found."""

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Whether a normalised prediction matches the gold answer."""

    def accuracy(self, predictions: Sequence[str | None], golds: Sequence[str]) -> float:
        """Fraction of predictions that are correct."""


def accuracy(
    is_correct: Callable[[str | None, str], bool],
    predictions: Sequence[str | None],
    golds: Sequence[str],
) -> float:
    """Fraction of ``predictions`` that ``is_correct`` accepts against the matching gold answer.

    Shared by the task modules so every task counts the same way: a ``None`` prediction (no
    answer found) counts as wrong.

    Raises:
        InputError: the two sequences differ in length, or are empty (accuracy is undefined).
    """
    if len(predictions) != len(golds):
        raise InputError(
            f"accuracy needs one prediction per gold answer; got {len(predictions)} predictions "
            f"and {len(golds)} gold answers. Pass the two lists in the same order and length."
        )
    if not golds:
        raise InputError(
            "accuracy of zero examples is undefined; pass at least one prediction and gold answer."
        )
    hits = sum(1 for pred, gold in zip(predictions, golds, strict=True) if is_correct(pred, gold))
    return hits / len(golds)
