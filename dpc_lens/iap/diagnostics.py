"""Can IAP's score choose a prompt? Model-free diagnostics of a table of per-question scores.

IAP's claim is per question: for *this* question, the information-flow score ranks a prompt that
leads to a right answer above one that does not. This module measures that claim and names the
cases where a calibrated IAP is really something simpler.

* :func:`auc` -- P(score of a right answer > score of a wrong one), ties counting half (the
  Mann-Whitney U statistic divided by ``n_right * n_wrong``).
* :func:`score_diagnostics` -- for every score given (each standardised flow, the synthesised
  score), the **within-question AUC** (over pairs of prompts of the *same* question, one with a
  right answer and one with a wrong answer: what a per-question choice relies on) and the
  **pooled AUC** (over every right and every wrong answer of the split: what a global threshold
  such as tau relies on), each with a 95% percentile interval over bootstrap resamples of the
  questions (the unit a user samples). 0.5 is chance. A score whose within-question interval
  includes 0.5 does not rank prompts, and IAP's choice is then no better than its fallback.
* :func:`degenerate_choices` -- what a chosen configuration reduces to on given scores: IAP-ss
  whose tau is cleared by the first prompt on every question *is* the first prompt; tau cleared
  by no prompt *is* the argmax of the score; IAP-mv with m = 1 is the argmax and with m = the pool
  size is plain majority vote; a calibrated value at the edge of its grid may lie outside it.
* :func:`paired_differences` -- each method's per-question verdicts against a reference prompt's,
  as the paired-bootstrap mean difference with its 95% interval
  (:func:`dpc_lens.evaluation.paired_bootstrap`, the one DPC's summaries use).

Everything here is a function of plain numbers, tested on hand-built tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from dpc_lens.errors import InputError

__all__ = [
    "auc",
    "within_question_auc",
    "score_diagnostics",
    "diagnostic_warnings",
    "degenerate_choices",
    "paired_differences",
    "N_RESAMPLES",
    "FALLBACK",
    "IAPScoreWarning",
]


class IAPScoreWarning(UserWarning):
    """IAP's score does not rank prompts within a question on this run's model and task."""


#: What IAP's choice is no better than when its score does not rank prompts.
FALLBACK = "a fixed prompt: the first of the pool, or the single prompt best on dev"

#: Bootstrap resamples of the questions used for every interval here (as DPC's summaries).
N_RESAMPLES = 2000


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(float(x))


def auc(right: Sequence[float], wrong: Sequence[float]) -> float | None:
    """P(a score of a right answer > a score of a wrong answer), ties counting half.

    ``None`` when either side is empty (no pair to compare).
    """
    right = [float(x) for x in right]
    wrong = [float(x) for x in wrong]
    if not right or not wrong:
        return None
    # rank-based (Mann-Whitney): for each right score, wrong scores below it + half of those equal
    srt = sorted(wrong)
    import bisect

    wins = 0.0
    for x in right:
        lo = bisect.bisect_left(srt, x)
        hi = bisect.bisect_right(srt, x)
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(right) * len(wrong))


def _check_table(scores: Sequence[Sequence[Any]], correct: Sequence[Sequence[Any]], where: str) -> None:
    if len(scores) != len(correct):
        raise InputError(f"{where}: {len(scores)} questions of scores but {len(correct)} of verdicts; "
                         "give one row per question in both, in the same order.")
    for q, (s, c) in enumerate(zip(scores, correct, strict=True)):
        if len(s) != len(c):
            raise InputError(f"{where}: question {q} has {len(s)} scores but {len(c)} verdicts; give one "
                             "per prompt, in pool order.")


def _question_wins(s: Sequence[Any], c: Sequence[Any]) -> tuple[float, int]:
    """(wins, pairs) over (right, wrong) prompt pairs of one question; pairs with a missing score
    are left out."""
    wins, n = 0.0, 0
    for i, ci in enumerate(c):
        if not ci or not _finite(s[i]):
            continue
        for j, cj in enumerate(c):
            if cj or not _finite(s[j]):
                continue
            wins += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
            n += 1
    return wins, n


def within_question_auc(scores: Sequence[Sequence[float | None]],
                        correct: Sequence[Sequence[bool]]) -> tuple[float | None, int]:
    """``(AUC, n_pairs)`` over every pair of prompts of the same question where one answer is right
    and the other wrong (ties half): the pairs of all questions pooled, so a question with more
    such pairs weighs more. ``(None, 0)`` when no question has both a right and a wrong answer.
    Scores that are ``None`` (not measured) leave their pairs out."""
    _check_table(scores, correct, "within_question_auc")
    wins = n = 0.0
    for s, c in zip(scores, correct, strict=True):
        w, k = _question_wins(s, c)
        wins += w
        n += k
    return (wins / n if n else None), int(n)


def _percentile_ci(values: list[float]) -> list[float] | None:
    """95% percentile interval with the same index convention as
    :func:`dpc_lens.evaluation.paired_bootstrap`."""
    v = sorted(x for x in values if math.isfinite(x))
    if len(v) < 40:
        return None
    return [v[int(0.025 * len(v))], v[int(0.975 * len(v)) - 1]]


def _bootstrap(scores: Sequence[Sequence[Any]], correct: Sequence[Sequence[Any]], n_resamples: int,
               seed: int) -> tuple[list[float] | None, list[float] | None]:
    """Percentile intervals of the within-question and pooled AUC over resamples of the questions
    (with replacement). A resample in which an AUC is undefined (no pair) is left out."""
    import torch

    nq = len(scores)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nq, (n_resamples, nq), generator=g)
    mult = torch.zeros(n_resamples, nq, dtype=torch.float64)
    mult.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))  # how often each question is drawn

    # within: sum_q m_q wins_q / sum_q m_q pairs_q
    wq = torch.tensor([_question_wins(s, c) for s, c in zip(scores, correct, strict=True)],
                      dtype=torch.float64).reshape(nq, 2)
    num, den = mult @ wq[:, 0], mult @ wq[:, 1]
    within = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))

    # pooled: weighted Mann-Whitney over every (question, prompt) with a score, weights = m_q
    vals, qid, pos = [], [], []
    for q, (s, c) in enumerate(zip(scores, correct, strict=True)):
        for x, ok in zip(s, c, strict=True):
            if _finite(x):
                vals.append(float(x))
                qid.append(q)
                pos.append(bool(ok))
    if not vals:
        return _percentile_ci(within.tolist()), None
    v = torch.tensor(vals, dtype=torch.float64)
    uniq, inv = torch.unique(v, sorted=True, return_inverse=True)
    w = mult[:, torch.tensor(qid)]  # [B, N]
    is_pos = torch.tensor(pos)
    u = len(uniq)
    posw = torch.zeros(n_resamples, u, dtype=torch.float64).index_add_(1, inv[is_pos], w[:, is_pos])
    negw = torch.zeros(n_resamples, u, dtype=torch.float64).index_add_(1, inv[~is_pos], w[:, ~is_pos])
    neg_below = negw.cumsum(1) - negw
    wins = (posw * (neg_below + 0.5 * negw)).sum(1)
    tot = posw.sum(1) * negw.sum(1)
    pooled = torch.where(tot > 0, wins / tot.clamp_min(1e-300), torch.full_like(wins, float("nan")))
    return _percentile_ci(within.tolist()), _percentile_ci(pooled.tolist())


def _verdict(ci: list[float] | None) -> str | None:
    if ci is None:
        return None
    if ci[0] > 0.5:
        return "ranks"
    if ci[1] < 0.5:
        return "reversed"
    return "chance"


def score_diagnostics(
    scores: Mapping[str, Sequence[Sequence[float | None]]],
    correct: Sequence[Sequence[bool]],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """How well each score tells right answers from wrong ones, within a question and pooled.

    Args:
        scores: name -> one row per question of one score per prompt, in pool order (``None``: not
            measured). Higher must mean "better prompt", as IAP assumes for every flow.
        correct: one row per question of one verdict per prompt.
        n_resamples, seed: the bootstrap over questions.

    Returns, per name: ``within_question_auc`` with ``within_question_ci95`` and
    ``within_question_pairs`` (the (right, wrong) prompt pairs it is taken over) and
    ``questions_with_pairs``; ``pooled_auc`` with ``pooled_ci95``, ``n_right`` and ``n_wrong``;
    and ``verdict``: ``"ranks"`` (within-question interval above 0.5), ``"chance"`` (it includes
    0.5), ``"reversed"`` (below 0.5) or ``None`` (no question has both a right and a wrong answer).
    """
    if n_resamples < 40:
        raise InputError(f"score_diagnostics: n_resamples must be >= 40 for a 95% interval, got "
                         f"{n_resamples}.")
    if not isinstance(scores, Mapping) or not scores:
        raise InputError("score_diagnostics: scores must be a non-empty mapping name -> per-question rows.")
    out: dict[str, dict[str, Any]] = {}
    for name, table in scores.items():
        _check_table(table, correct, f"score_diagnostics({name!r})")
        w_auc, n_pairs = within_question_auc(table, correct)
        right = [float(x) for s, c in zip(table, correct, strict=True) for x, k in zip(s, c, strict=True)
                 if k and _finite(x)]
        wrong = [float(x) for s, c in zip(table, correct, strict=True) for x, k in zip(s, c, strict=True)
                 if not k and _finite(x)]
        w_ci, p_ci = _bootstrap(table, correct, n_resamples, seed) if table else (None, None)
        out[name] = {
            "within_question_auc": w_auc,
            "within_question_ci95": w_ci if w_auc is not None else None,
            "within_question_pairs": n_pairs,
            "questions_with_pairs": sum(1 for s, c in zip(table, correct, strict=True)
                                        if _question_wins(s, c)[1] > 0),
            "pooled_auc": auc(right, wrong),
            "pooled_ci95": p_ci if right and wrong else None,
            "n_right": len(right),
            "n_wrong": len(wrong),
            "verdict": _verdict(w_ci) if w_auc is not None else None,
        }
    return out


def diagnostic_warnings(diagnostics: Mapping[str, Mapping[str, Any]], names: Sequence[str],
                        fallback: str) -> list[str]:
    """One plain line for each score in ``names`` whose within-question AUC interval includes 0.5
    (or lies below it), or that could not be judged at all."""
    labels = {"score": "IAP's score", "score_ss": "IAP-ss's score", "score_mv": "IAP-mv's score"}
    out = []
    for name in names:
        d = diagnostics.get(name)
        label = labels.get(name, name)
        if d is None:
            continue
        if d["verdict"] is None:
            out.append(f"{label}: no question has both a right and a wrong answer among its prompts, so "
                       "whether the score ranks prompts cannot be judged on these questions.")
        elif d["verdict"] in ("chance", "reversed"):
            lo, hi = d["within_question_ci95"]
            how = "includes" if d["verdict"] == "chance" else "lies below"
            out.append(
                f"{label} does not rank prompts within a question on this model and task: its "
                f"within-question AUC is {d['within_question_auc']:.3f} [{lo:.3f}, {hi:.3f}] over "
                f"{d['within_question_pairs']} (right, wrong) pairs, an interval that {how} 0.5, so "
                f"IAP's choice is no better than its fallback ({fallback})."
            )
    return out


def degenerate_choices(
    *,
    tau: float | None = None,
    scores_ss: Sequence[Sequence[float]] | None = None,
    m: int | None = None,
    n_prompts: int | None = None,
    first_prompt: str | None = None,
    chosen: Mapping[str, float] | None = None,
    grids: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, str] | None:
    """What a chosen IAP configuration reduces to, one plain line per case (``None``: nothing).

    * ``"iap_ss"``: with ``tau`` and the per-question IAP-ss scores ``scores_ss``: the first
      prompt's score clears tau (``>=``) on every question, so IAP-ss is the first prompt; or no
      prompt's score clears tau on any question, so IAP-ss always falls back to the argmax.
    * ``"iap_mv"``: ``m == 1`` is the argmax of the score; ``m >= n_prompts`` is a vote over every
      prompt, i.e. plain majority (ties broken by score instead of pool order).
    * ``"<param>_edge"``: a ``chosen`` value (e.g. ``{"lam": 0.0, "tau": -1.0}``) at the lowest or
      highest value of its calibration ``grids`` entry (grids of two or more values): the best
      setting may lie outside the grid.
    """
    out: dict[str, str] = {}
    if tau is not None and scores_ss is not None and len(scores_ss):
        rows = [list(map(float, s)) for s in scores_ss]
        n = len(rows)
        first_clears = sum(1 for s in rows if s and s[0] >= tau)
        any_clears = sum(1 for s in rows if any(x >= tau for x in s))
        lo = min(x for s in rows for x in s)
        hi = max(x for s in rows for x in s)
        name = f" ({first_prompt!r})" if first_prompt else ""
        if first_clears == n:
            where = "below every score" if tau <= lo else "below the first prompt's score on every question"
            out["iap_ss"] = (f"IAP-ss is the first prompt{name}: tau = {tau:g} lies {where} "
                             f"(scores range {lo:.2f} .. {hi:.2f}), so it stops at the first prompt on all "
                             f"{n} questions.")
        elif any_clears == 0:
            out["iap_ss"] = (f"IAP-ss is the argmax of the score: tau = {tau:g} lies above every score "
                             f"(highest {hi:.2f}), so it falls back to the best-scoring prompt on all {n} "
                             "questions.")
    if m is not None and n_prompts is not None:
        if n_prompts > 1 and m >= n_prompts:
            out["iap_mv"] = (f"IAP-mv with m = {m} votes over all {n_prompts} prompts: it is plain majority "
                             "vote (ties broken by score instead of pool order).")
        elif m == 1:
            out["iap_mv"] = "IAP-mv with m = 1 is the argmax of the score (one voter, no vote)."
    for param, value in (chosen or {}).items():
        grid = [float(x) for x in (grids or {}).get(param, ())]
        if value is None or len(set(grid)) < 2 or param == "m":  # m's edges are named above
            continue
        v = float(value)
        if v in (min(grid), max(grid)):
            side = "lowest" if v == min(grid) else "highest"
            knob = param.split("_")[0]  # lam_mv (IAP-mv's lam) comes from lam_grid too
            head = f"{param} = {v:g} is the {side} value of its calibration grid {sorted(set(grid))}"
            if knob == "lam" and v in (0.0, 1.0):  # lam's own range is [0, 1]: nothing to widen
                alone, unused = (("question->rationale", "question->prompt") if v == 0.0
                                 else ("question->prompt", "question->rationale"))
                out[f"{param}_edge"] = (f"{head} and of its range [0, 1]: the score is z({alone}) alone "
                                        f"(plus mu * z(prompt->rationale)); {unused} is not used.")
            else:
                out[f"{param}_edge"] = (f"{head}: the best setting may lie outside the grid; widen "
                                        f"{knob}_grid to check.")
    return out or None


def paired_differences(
    verdicts: Mapping[str, Sequence[bool]],
    references: Mapping[str, Sequence[bool]],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {reference: {"diff", "ci95"}}}``: each method's accuracy minus each reference's
    on the same questions, with the paired-bootstrap 95% interval (fractions, not points)."""
    from dpc_lens.evaluation import paired_bootstrap

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, xs in verdicts.items():
        out[name] = {}
        for ref, ys in references.items():
            d, lo, hi = paired_bootstrap(list(xs), list(ys), n_resamples=n_resamples, seed=seed)
            out[name][ref] = {"diff": d, "ci95": [lo, hi]}
    return out
