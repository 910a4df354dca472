"""IAP's strategies on hand-given scores and answers: IAP-ss (sequential substitution, with the
prompts it had to try), IAP-mv (majority vote among the top m), and the baselines (plain
majority vote, single prompt). Model-free: every rule is tested with numbers worked out by hand."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from jaxtyping import Float
from torch import Tensor

from dpc_lens.errors import InputError

from .score import _check_m, _check_tau

if TYPE_CHECKING:  # pandas is imported lazily, only by to_dataframe()
    pass

__all__ = [
    "SelectionResult",
    "iap_ss",
    "iap_mv",
    "majority_vote",
    "single_prompt_answers",
]

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

Answer = str | None
Scores = Float[Tensor, " n_prompts"] | Sequence[float]


@dataclass(frozen=True)
class SelectionResult:
    """What a strategy decided for one question.

    Attributes:
        strategy: ``"iap_ss"`` or ``"iap_mv"``.
        index: pool position of the chosen prompt. For IAP-mv: the highest-scoring prompt among
            the voters that gave the winning answer (earliest in pool order on a score tie).
        answer: the final answer (``None`` when the chosen prompt(s) gave no extractable answer).
        n_tried: prompts that had to be generated and scored: for IAP-ss ``index + 1`` when a
            prompt cleared tau, the whole pool when none did; for IAP-mv always the whole pool.
        fallback: IAP-ss only: no prompt cleared tau, so the best-scoring one was taken.
        considered: pool positions the decision looked at, in the order it looked at them
            (IAP-ss: 0..n_tried-1; IAP-mv: the top m by score).
        votes: IAP-mv only: answer -> number of votes among the considered prompts (``None``
            answers do not vote).
    """

    strategy: Literal["iap_ss", "iap_mv"]
    index: int
    answer: Answer
    n_tried: int
    fallback: bool = False
    considered: tuple[int, ...] = ()
    votes: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "index": self.index,
            "answer": self.answer,
            "n_tried": self.n_tried,
            "fallback": self.fallback,
            "considered": list(self.considered),
            "votes": dict(self.votes),
        }


def _check_scores_answers(
    scores: Scores, answers: Sequence[Answer], where: str
) -> tuple[list[float], list[Answer]]:
    if isinstance(scores, Tensor):
        if scores.ndim != 1:
            raise InputError(
                f"{where}: scores must be 1-D (one per prompt of ONE question), got shape "
                f"{tuple(scores.shape)}; call once per question."
            )
        s = [float(x) for x in scores.detach().cpu().tolist()]
    else:
        try:
            s = [float(x) for x in scores]
        except (TypeError, ValueError):
            raise InputError(f"{where}: scores must be numbers, got {scores!r}.") from None
    if isinstance(answers, str):
        raise InputError(f"{where}: answers must be a sequence (one per prompt), got a string.")
    a = list(answers)
    if not s:
        raise InputError(f"{where}: no prompt; scores and answers need one entry per pool prompt.")
    if len(s) != len(a):
        raise InputError(
            f"{where}: {len(s)} scores but {len(a)} answers; both need one entry per pool prompt, "
            "in pool order."
        )
    bad = [i for i, x in enumerate(s) if not math.isfinite(x)]
    if bad:
        raise InputError(
            f"{where}: score(s) at position(s) {bad} are NaN or infinite; fix or drop those "
            "(question, prompt) pairs before selecting."
        )
    for i, x in enumerate(a):
        if x is not None and not isinstance(x, str):
            raise InputError(f"{where}: answer {i} must be a string or None, got {x!r}.")
    return s, a


def _argmax_first(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def iap_ss(scores: Scores, answers: Sequence[Answer], tau: float) -> SelectionResult:
    """IAP-ss (sequential substitution) for one question.

    Walk the pool in order and answer with the first prompt whose score is ``>= tau`` (equal
    counts as clearing). If none clears it, answer with the highest-scoring prompt, the earliest
    in pool order on a tie. The answer is taken as is, ``None`` included.

    Args:
        scores: one score per pool prompt, in pool order (from the pipeline's cache).
        answers: the answer each prompt produced, in pool order (``None``: none extracted).
        tau: the threshold.

    Returns:
        A :class:`SelectionResult`; ``n_tried`` is what IAP-ss really costs on this question.
    """
    s, a = _check_scores_answers(scores, answers, "iap_ss")
    tau = _check_tau(tau, "iap_ss")
    for i, x in enumerate(s):
        if x >= tau:
            return SelectionResult("iap_ss", i, a[i], n_tried=i + 1, fallback=False,
                                   considered=tuple(range(i + 1)))
    best = _argmax_first(s)
    return SelectionResult("iap_ss", best, a[best], n_tried=len(s), fallback=True,
                           considered=tuple(range(len(s))))


def iap_mv(scores: Scores, answers: Sequence[Answer], m: int) -> SelectionResult:
    """IAP-mv (majority vote among the best) for one question.

    1. Rank prompts by score, highest first; equal scores keep pool order. Keep the top ``m``.
       An ``m`` larger than the pool is clamped to the pool size (the vote is then over every
       prompt, with the score tie-breaks below); ``m`` must still be an int >= 1.
    2. Each kept prompt with a non-``None`` answer votes for it; ``None`` answers do not vote.
       If all kept answers are ``None``, the answer is ``None`` (from the top-ranked prompt).
    3. The answer with most votes wins. Ties: the higher summed score of its voters, then the
       higher best single score, then the answer whose best voter comes first in pool order.

    ``index`` is the highest-scoring voter for the winning answer; ``n_tried`` is the pool size
    (IAP-mv scores every prompt).
    """
    s, a = _check_scores_answers(scores, answers, "iap_mv")
    m = _check_m(m, "iap_mv")
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    top = tuple(order[: min(m, len(s))])
    votes: dict[str, int] = {}
    total: dict[str, float] = {}
    best_voter: dict[str, int] = {}  # answer -> its top-ranked voter (top is already ranked)
    for i in top:
        ans = a[i]
        if ans is None:
            continue
        votes[ans] = votes.get(ans, 0) + 1
        total[ans] = total.get(ans, 0.0) + s[i]
        best_voter.setdefault(ans, i)
    if not votes:
        return SelectionResult("iap_mv", top[0], None, n_tried=len(s), considered=top, votes={})
    winner = min(
        votes,
        key=lambda ans: (-votes[ans], -total[ans], -s[best_voter[ans]], best_voter[ans]),
    )
    return SelectionResult("iap_mv", best_voter[winner], winner, n_tried=len(s),
                           considered=top, votes=votes)


def majority_vote(answers: Sequence[Answer]) -> Answer:
    """Baseline: the most frequent answer over all prompts of one question.

    ``None`` answers do not vote; if every answer is ``None`` the result is ``None``. A tie in
    counts goes to the answer that appears first in pool order.
    """
    if isinstance(answers, str):
        raise InputError("majority_vote: answers must be a sequence (one per prompt), got a string.")
    counts: dict[str, int] = {}  # dicts keep insertion order = first occurrence in pool order
    for x in answers:
        if x is None:
            continue
        if not isinstance(x, str):
            raise InputError(f"majority_vote: answers must be strings or None, got {x!r}.")
        counts[x] = counts.get(x, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(ans for ans, c in counts.items() if c == best)


def single_prompt_answers(answers: Sequence[Sequence[Answer]], index: int) -> list[Answer]:
    """Baseline: the answers prompt ``index`` gave, one per question (a column of the
    questions x prompts answer table)."""
    out = []
    for q, row in enumerate(answers):
        if not -len(row) <= index < len(row):
            raise InputError(
                f"single_prompt_answers: question {q} has {len(row)} answers; prompt index {index} "
                "is out of range."
            )
        out.append(row[index])
    return out
