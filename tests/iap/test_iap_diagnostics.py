"""Tests of IAP's score diagnostics: AUCs, degenerate calibrations, paired intervals.

Every expected value is worked out by hand in the comments next to it (or by a slow, obviously
correct loop written here), never by calling the code under test a second time.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dpc_lens.errors import InputError
from dpc_lens.iap import QuestionRecord, calibrate
from dpc_lens.iap.diagnostics import (
    IAPScoreWarning,
    auc,
    degenerate_choices,
    diagnostic_warnings,
    paired_differences,
    score_diagnostics,
    within_question_auc,
)

# A hand-built table: 5 questions, scores per prompt and verdicts per prompt.
SCORES = [
    [0.9, 0.1, 0.5],   # Q1 right = p0: (p0,p1) win, (p0,p2) win                    -> 2 of 2
    [0.2, 0.2, 0.8],   # Q2 right = p0, p1: (p0,p2) loss, (p1,p2) loss                -> 0 of 2
    [0.3, 0.3],        # Q3 right = p0: (p0,p1) tie                                   -> 0.5 of 1
    [1.0, 0.0],        # Q4 all right: no pair
    [None, 0.1],       # Q5 p0 right but unscored: no pair
]
CORRECT = [
    [True, False, False],
    [True, True, False],
    [True, False],
    [True, True],
    [True, False],
]


def test_auc_counts_ties_as_half():
    # right [3, 1] vs wrong [2, 1, 0]: 3 beats all three (3); 1 loses to 2 (0), ties 1 (0.5),
    # beats 0 (1) -> 4.5 of 6 pairs
    assert auc([3, 1], [2, 1, 0]) == pytest.approx(0.75)
    assert auc([1, 1], [1]) == pytest.approx(0.5)
    assert auc([], [1.0]) is None and auc([1.0], []) is None


def test_within_question_auc_by_hand():
    # (2 + 0 + 0.5) wins over 5 pairs
    value, n = within_question_auc(SCORES, CORRECT)
    assert n == 5 and value == pytest.approx(0.5)
    assert within_question_auc([[1.0, 2.0]], [[True, True]]) == (None, 0)
    with pytest.raises(InputError, match="question 0 has 2 scores but 1 verdicts"):
        within_question_auc([[1.0, 2.0]], [[True]])


def _slow_within(scores, correct):
    wins = n = 0.0
    for s, c in zip(scores, correct):
        for i in range(len(s)):
            for j in range(len(s)):
                if c[i] and not c[j] and s[i] is not None and s[j] is not None:
                    wins += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
                    n += 1
    return wins / n if n else None


def _slow_pooled(scores, correct):
    right = [x for s, c in zip(scores, correct) for x, k in zip(s, c) if k and x is not None]
    wrong = [x for s, c in zip(scores, correct) for x, k in zip(s, c) if not k and x is not None]
    if not right or not wrong:
        return None
    wins = sum(1.0 if r > w else 0.5 if r == w else 0.0 for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def test_score_diagnostics_point_values_and_intervals_against_a_slow_bootstrap():
    d = score_diagnostics({"s": SCORES}, CORRECT, n_resamples=200, seed=3)["s"]
    assert d["within_question_auc"] == pytest.approx(0.5) and d["within_question_pairs"] == 5
    assert d["questions_with_pairs"] == 3
    # pooled: right [0.9, 0.2, 0.2, 0.3, 1.0, 0.0] (Q5's unscored p0 left out),
    # wrong [0.1, 0.5, 0.8, 0.3, 0.1]: 0.9 beats all 5; each 0.2 beats the two 0.1s (2 + 2);
    # 0.3 beats the two 0.1s and ties 0.3 (2.5); 1.0 beats all 5; 0.0 none -> 16.5 of 30 pairs
    assert d["n_right"] == 6 and d["n_wrong"] == 5
    assert d["pooled_auc"] == pytest.approx(16.5 / 30)
    # the interval: the same question resamples (seed 3), each AUC by the slow loops above
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(SCORES), (200, len(SCORES)), generator=g)
    within, pooled = [], []
    for row in idx.tolist():
        s = [SCORES[q] for q in row]
        c = [CORRECT[q] for q in row]
        w, p = _slow_within(s, c), _slow_pooled(s, c)
        if w is not None:
            within.append(w)
        if p is not None:
            pooled.append(p)
    within.sort()
    pooled.sort()
    assert d["within_question_ci95"] == pytest.approx([within[int(0.025 * len(within))],
                                                       within[int(0.975 * len(within)) - 1]])
    assert d["pooled_ci95"] == pytest.approx([pooled[int(0.025 * len(pooled))],
                                              pooled[int(0.975 * len(pooled)) - 1]])
    assert d["verdict"] == "chance"


def test_verdicts_ranks_reversed_and_undecidable():
    good = [[2.0, 1.0, 0.0]] * 30       # the right prompt always scores highest
    corr = [[True, False, False]] * 30
    d = score_diagnostics({"good": good, "bad": [s[::-1] for s in good]}, corr, n_resamples=100)
    assert d["good"]["within_question_auc"] == 1.0 and d["good"]["within_question_ci95"] == [1.0, 1.0]
    assert d["good"]["verdict"] == "ranks" and d["bad"]["verdict"] == "reversed"
    none = score_diagnostics({"s": [[1.0, 2.0]]}, [[True, True]], n_resamples=100)["s"]
    assert none["within_question_auc"] is None and none["verdict"] is None and none["pooled_ci95"] is None
    lines = diagnostic_warnings({**d, "none": none}, ["good", "bad", "none"], "the first prompt")
    assert len(lines) == 2
    assert lines[0].startswith("bad does not rank prompts within a question") and "lies below 0.5" in lines[0]
    assert "the first prompt" in lines[0]
    assert "cannot be judged" in lines[1]
    with pytest.raises(InputError, match="n_resamples must be >= 40"):
        score_diagnostics({"s": good}, corr, n_resamples=10)


def test_degenerate_iap_ss_first_prompt_argmax_or_neither():
    scores = [[0.1, 0.5], [0.0, -0.2]]
    below_all = degenerate_choices(tau=-1.0, scores_ss=scores, first_prompt="A.")["iap_ss"]
    assert below_all.startswith("IAP-ss is the first prompt ('A.')") and "below every score" in below_all
    assert "all 2 questions" in below_all
    # tau 0: both first prompts (0.1, 0.0) clear it, though -0.2 does not
    first = degenerate_choices(tau=0.0, scores_ss=scores)["iap_ss"]
    assert "below the first prompt's score on every question" in first
    assert degenerate_choices(tau=0.6, scores_ss=scores)["iap_ss"].startswith("IAP-ss is the argmax")
    assert degenerate_choices(tau=0.3, scores_ss=scores) is None  # Q1 stops at p1, Q2 falls back


def test_degenerate_iap_mv_and_grid_edges():
    assert "argmax" in degenerate_choices(m=1, n_prompts=4)["iap_mv"]
    assert "plain majority" in degenerate_choices(m=4, n_prompts=4)["iap_mv"]
    assert "plain majority" in degenerate_choices(m=9, n_prompts=4)["iap_mv"]
    assert degenerate_choices(m=3, n_prompts=4) is None
    grids = {"lam": [0.0, 0.5, 1.0], "tau": [-1.0, 0.0, 1.0]}
    d = degenerate_choices(chosen={"lam": 0.0, "tau": -1.0}, grids=grids)
    assert "z(question->rationale) alone" in d["lam_edge"] and "question->prompt is not used" in d["lam_edge"]
    assert "lowest value" in d["tau_edge"] and "widen tau_grid" in d["tau_edge"]
    d = degenerate_choices(chosen={"lam": 1.0, "tau": 1.0}, grids=grids)
    assert "z(question->prompt) alone" in d["lam_edge"] and "highest value" in d["tau_edge"]
    d = degenerate_choices(chosen={"lam": 0.5, "lam_mv": 0.5},
                           grids={"lam": [0.25, 0.5], "lam_mv": [0.25, 0.5]})
    assert "widen lam_grid" in d["lam_edge"] and "widen lam_grid" in d["lam_mv_edge"]
    assert degenerate_choices(chosen={"lam": 0.5, "tau": 0.0}, grids=grids) is None
    assert degenerate_choices(chosen={"tau": 0.0}, grids={"tau": [0.0]}) is None  # one-value grid: no edge


def test_paired_differences_against_the_exact_bootstrap_on_small_tables():
    # two questions, differences [1, 0]: a resample's mean is 0, 0.5 or 1 with probabilities
    # 1/4, 1/2, 1/4, so over 2000 resamples the 2.5% and 97.5% quantiles are 0 and 1
    d = paired_differences({"m": [True, True]}, {"ref": [False, True]})["m"]["ref"]
    assert d["diff"] == pytest.approx(0.5) and d["ci95"] == [0.0, 1.0]
    # a constant difference has a zero-width interval
    d = paired_differences({"m": [True] * 3}, {"ref": [False] * 3})["m"]["ref"]
    assert d == {"diff": 1.0, "ci95": [1.0, 1.0]}


def test_calibration_names_its_degenerate_choices_and_diagnoses_dev():
    # Q1 (gold "1"): lam=0 scores = z_qr = [-2, 1, 0]; Q2 (gold "2"): [1, -1, 0]
    q1 = QuestionRecord(z_qp=[2.0, 0.0, -1.0], z_qr=[-2.0, 1.0, 0.0], answers=["9", "1", "1"])
    q2 = QuestionRecord(z_qp=[0.0, 1.0, 0.0], z_qr=[1.0, -1.0, 0.0], answers=["2", "7", "2"])
    res = calibrate([q1, q2], ["1", "2"], lam_grid=[1.0, 0.0, 0.5], tau_grid=[0.0, 0.75],
                    m_grid=[1, 3], is_correct=lambda a, g: a == g)
    # chosen (see tests/iap/test_iap.py::test_calibrate_by_hand): IAP-ss lam 0, tau 0; IAP-mv lam 1, m 3
    deg = res.degenerate
    assert "plain majority" in deg["iap_mv"]                         # m = 3 = pool size
    assert "iap_ss" not in deg                                        # Q1's first prompt (-2) misses tau 0
    assert "z(question->rationale) alone" in deg["lam_edge"]          # lam 0: lowest of [0, 0.5, 1]
    assert "widen tau_grid" in deg["tau_edge"]                        # tau 0: lowest of [0, 0.75]
    assert "z(question->prompt) alone" in deg["lam_mv_edge"]          # IAP-mv's lam 1: highest
    # dev diagnostics: verdicts Q1 [x, ok, ok], Q2 [ok, x, ok]
    # z_qr within: Q1 (1 vs -2) win, (0 vs -2) win; Q2 (1 vs -1) win, (0 vs -1) win -> 1.0 over 4 pairs
    # z_qp within: Q1 (0 vs 2) loss, (-1 vs 2) loss; Q2 (0 vs 1) loss, (0 vs 1) loss -> 0.0
    diag = res.score_diagnostics
    assert diag["question->rationale"]["within_question_auc"] == 1.0
    assert diag["question->prompt"]["within_question_auc"] == 0.0
    assert diag["score_ss"]["within_question_auc"] == 1.0 and diag["score_mv"]["within_question_auc"] == 0.0
    assert res.grids == {"lam": [1.0, 0.0, 0.5], "tau": [0.0, 0.75], "m": [1, 3]}
    back = type(res).from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.degenerate == deg and back.score_diagnostics == diag and back.warnings == res.warnings
    # calibrations saved before these fields existed still load
    old = {k: v for k, v in res.to_dict().items() if k not in ("score_diagnostics", "degenerate", "grids",
                                                               "warnings")}
    assert type(res).from_dict(old).degenerate is None


def test_iap_score_warning_is_a_user_warning_category():
    assert issubclass(IAPScoreWarning, UserWarning)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        warnings.warn("x", IAPScoreWarning, stacklevel=1)
    assert w[0].category is IAPScoreWarning
