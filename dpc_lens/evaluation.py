"""Grading: how a generation becomes an answer and a verdict, and the oracle tables.

Every pipeline (DPC, DPC calibration, IAP, prompt-tuning evaluation, the test bed) grades
through :func:`grade`, so an answer is read and judged the same way everywhere: the task's own
extraction (:func:`dpc_lens.tasks.answer_of`, which gives AQuA its options) and the task's own
``is_correct`` against the example's gold answer.

Two "oracles" are used in the results, with distinct names because they bound different things:

* :func:`base_or_pt_oracle` (DPC runs, ``accuracy["oracle"]``): a question counts when the base
  model or the prompt-tuned model answers it right -- the ceiling of any chooser between them.
* :func:`any_right_oracle` (DPC calibration's ``corruption_oracle_accuracy``, IAP's
  ``oracle``): a question counts when any of its candidate answers (PT and every corrupted
  generation; every prompt of the pool) is right.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import InputError
from .tasks import answer_of
from .tasks.base import Example

__all__ = ["grade", "answer_record", "prompt_text", "fraction_true", "base_or_pt_oracle", "any_right_oracle",
           "paired_bootstrap"]


def grade(task: Any, text: str, example: Example) -> tuple[str | None, bool]:
    """``(answer, correct)`` of a generated ``text`` for ``example`` under ``task``."""
    answer = answer_of(task, text, example)
    return answer, bool(task.is_correct(answer, str(example.answer)))


def answer_record(task: Any, generation: Any, example: Example) -> dict[str, Any]:
    """The JSON record of one graded generation: rationale, answer, correct, stop reason."""
    answer, correct = grade(task, generation.text, example)
    return {"rationale": generation.text, "answer": answer, "correct": correct,
            "stop_reason": generation.stop_reason}


def prompt_text(template: str, question: str) -> str:
    """The prompt a question becomes (``{question}`` in ``template`` replaced)."""
    return template.format(question=question)


def fraction_true(flags: Iterable[Any]) -> float:
    """Share of truthy flags (``nan`` for none)."""
    flags = [bool(x) for x in flags]
    return sum(flags) / len(flags) if flags else float("nan")


def base_or_pt_oracle(records: Sequence[Mapping[str, Any]]) -> float:
    """Share of DPC records right with the base model or with vanilla prompt tuning."""
    return fraction_true(r["base"]["correct"] or r["pt"]["correct"] for r in records)


def any_right_oracle(correct: Sequence[Iterable[Any]]) -> float:
    """Share of questions with at least one right answer among their candidates."""
    return fraction_true(any(bool(x) for x in c) for c in correct)


def paired_bootstrap(a: Sequence[Any], b: Sequence[Any], n_resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """``(mean of a - b, low, high)``: the mean paired difference of two methods' per-question
    scores (``bool`` verdicts or numbers such as a mean over random draws) and its 95% percentile
    interval over ``n_resamples`` resamples of the questions with replacement (the same
    questions for both methods). Deterministic given ``seed``."""
    import torch

    if len(a) != len(b) or not len(a):
        raise InputError(f"paired_bootstrap needs two equally long, non-empty score lists (one per "
                         f"question, same order); got {len(a)} and {len(b)}.")
    if n_resamples < 40:
        raise InputError(f"paired_bootstrap: n_resamples must be >= 40 for a 95% interval, got "
                         f"{n_resamples}.")
    x = torch.tensor([float(v) for v in a], dtype=torch.float64) - \
        torch.tensor([float(v) for v in b], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (n_resamples, len(x)), generator=g)
    means = x[idx].mean(1).sort().values
    return (float(x.mean()), float(means[int(0.025 * n_resamples)]),
            float(means[int(0.975 * n_resamples) - 1]))
