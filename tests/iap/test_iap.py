"""Tests of the model-free IAP core: pool, standardisation, score, strategies, calibration.

Every expected value below is worked out by hand in the comments next to it, never by calling
the code under test a second time.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpc_lens.errors import ConfigError, DataError, InputError
from dpc_lens.iap import (
    DEFAULT_PROMPTS,
    FLOW_PR,
    FLOW_QP,
    FLOW_QR,
    CalibrationResult,
    CandidatePrompt,
    FlowStandardizer,
    IAPConfig,
    PromptPool,
    QuestionRecord,
    calibrate,
    iap_mv,
    iap_ss,
    majority_vote,
    resolve_layers,
    single_prompt_answers,
    synthesized_score,
)

# ---------------------------------------------------------------------------------------------
# Prompt pool
# ---------------------------------------------------------------------------------------------


def test_default_prompts_are_nine_in_three_groups_instructive_first():
    assert len(DEFAULT_PROMPTS) == 9
    groups = [p.group for p in DEFAULT_PROMPTS]
    assert groups == ["instructive"] * 3 + ["misleading"] * 3 + ["irrelevant"] * 3
    assert DEFAULT_PROMPTS[0].text == "Let's think step by step."
    assert "Don't think. Just feel." in [p.text for p in DEFAULT_PROMPTS]
    assert len({p.text for p in DEFAULT_PROMPTS}) == 9
    assert len(PromptPool()) == 9 and PromptPool.default().texts[0] == "Let's think step by step."


def test_pool_accepts_strings_and_rejects_empty_and_duplicates():
    pool = PromptPool(["A.", CandidatePrompt("B.", "misleading")])
    assert pool.texts == ("A.", "B.") and pool.groups == ("custom", "misleading")
    assert pool.index("B.") == 1
    with pytest.raises(InputError, match="empty"):
        PromptPool([])
    with pytest.raises(InputError, match=r"twice \(positions 0 and 2\)"):
        PromptPool(["A.", "B.", "A."])
    with pytest.raises(InputError, match="non-empty string"):
        CandidatePrompt("   ")
    with pytest.raises(InputError, match="Did you mean 'irrelevant'"):
        CandidatePrompt("x", "irelevant")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="not in the prompt pool"):
        pool.index("C.")


def test_pool_from_text_file_skips_blank_and_comment_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my pool\nLet's think.\n\n  Abrakadabra!  \nFirst,\n", encoding="utf-8")
    pool = PromptPool.from_file(f)
    assert pool.texts == ("Let's think.", "Abrakadabra!", "First,")
    assert set(pool.groups) == {"custom"}


def test_pool_from_text_file_duplicate_names_file_and_lines(tmp_path):
    f = tmp_path / "dup.txt"
    f.write_text("one\ntwo\n\none\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        PromptPool.from_file(f)
    msg = str(e.value)
    assert "dup.txt" in msg and "line 4" in msg and "first on line 1" in msg


def test_pool_from_empty_and_missing_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no prompt"):
        PromptPool.from_file(f)
    with pytest.raises(DataError, match="no such prompt file"):
        PromptPool.from_file(tmp_path / "nope.txt")


def test_pool_from_json_and_round_trip(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["Plain.", {"text": "Feel.", "group": "misleading"}]), encoding="utf-8")
    pool = PromptPool.from_file(f)
    assert pool.texts == ("Plain.", "Feel.") and pool.groups == ("custom", "misleading")
    g = tmp_path / "default.json"
    PromptPool.default().save(g)
    back = PromptPool.from_file(g)
    assert back.texts == tuple(p.text for p in DEFAULT_PROMPTS)
    assert back.groups[3] == "misleading"


def test_pool_from_malformed_json_names_file_and_line(tmp_path):
    bad_item = tmp_path / "bad_item.json"
    bad_item.write_text('[\n  "ok",\n  "fine",\n  42\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        PromptPool.from_file(bad_item)
    assert "bad_item.json" in str(e.value) and "line 4" in str(e.value) and "item 2" in str(e.value)

    syntax = tmp_path / "syntax.json"
    syntax.write_text('[\n  "ok",\n  "missing quote\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"syntax\.json, line 3: invalid JSON"):
        PromptPool.from_file(syntax)

    group = tmp_path / "group.json"
    group.write_text('[\n {"text": "a"},\n {"text": "b", "group": "misleding"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: unknown group 'misleding'.*Did you mean 'misleading'"):
        PromptPool.from_file(group)

    not_list = tmp_path / "obj.json"
    not_list.write_text('{"text": "a"}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list"):
        PromptPool.from_file(not_list)


# ---------------------------------------------------------------------------------------------
# Standardisation
# ---------------------------------------------------------------------------------------------


def test_standardizer_fit_and_transform_by_hand():
    # question->prompt: [1, 2, 3, 4] -> mean 2.5; sample variance (2.25+0.25+0.25+2.25)/3 = 5/3.
    # question->rationale: [0, 10] -> mean 5; sample variance (25+25)/1 = 50.
    st = FlowStandardizer.fit({FLOW_QP: [1.0, 2.0, 3.0, 4.0], FLOW_QR: torch.tensor([[0.0], [10.0]])})
    assert st.mean[FLOW_QP] == pytest.approx(2.5)
    assert st.std[FLOW_QP] == pytest.approx(math.sqrt(5 / 3))
    assert st.mean[FLOW_QR] == pytest.approx(5.0)
    assert st.std[FLOW_QR] == pytest.approx(math.sqrt(50))
    assert st.count == {FLOW_QP: 4, FLOW_QR: 2}
    z = st.transform({FLOW_QP: [4.0, 2.5], FLOW_QR: torch.tensor([10.0, 5.0])})
    # (4 - 2.5) / sqrt(5/3) = 1.5 / 1.29099... = 1.161895...
    assert z[FLOW_QP].tolist() == pytest.approx([1.161895003862225, 0.0])
    # (10 - 5) / sqrt(50) = 1 / sqrt(2)
    assert z[FLOW_QR].tolist() == pytest.approx([0.7071067811865476, 0.0])
    assert z[FLOW_QR].dtype == torch.float32  # a float tensor keeps its dtype


def test_standardizer_refuses_too_few_or_constant_values_and_unknown_names():
    with pytest.raises(InputError, match="got 1 value.*at least 2"):
        FlowStandardizer.fit({FLOW_QP: [3.0]})
    with pytest.raises(InputError, match=r"all 3 values equal 2\.0 \(std 0\)"):
        FlowStandardizer.fit({FLOW_QR: [2.0, 2.0, 2.0]})
    with pytest.raises(InputError, match="Did you mean 'question->prompt'"):
        FlowStandardizer.fit({"question->promt": [1.0, 2.0]})
    with pytest.raises(InputError, match="NaN or infinite"):
        FlowStandardizer.fit({FLOW_QP: [1.0, float("nan")]})
    st = FlowStandardizer.fit({FLOW_QP: [0.0, 2.0]})
    with pytest.raises(InputError, match="was not fitted"):
        st.z(FLOW_PR, [1.0])
    with pytest.raises(ConfigError, match="std of 'question->prompt' must be a finite number > 0"):
        FlowStandardizer(mean={FLOW_QP: 0.0}, std={FLOW_QP: 0.0})


def test_standardizer_json_round_trip(tmp_path):
    f = tmp_path / "std.json"
    FlowStandardizer(mean={FLOW_QP: 1.5, FLOW_PR: -2.0}, std={FLOW_QP: 0.5, FLOW_PR: 4.0}).save(f)
    raw = json.loads(f.read_text())
    assert raw["mean"] == {FLOW_QP: 1.5, FLOW_PR: -2.0} and raw["std"][FLOW_PR] == 4.0
    back = FlowStandardizer.load(f)
    # (2.5 - 1.5) / 0.5 = 2; (-2 - -2) / 4 = 0
    assert back.z(FLOW_QP, [2.5]).tolist() == [2.0]
    assert back.z(FLOW_PR, [-2.0]).tolist() == [0.0]
    bad = tmp_path / "bad.json"
    bad.write_text('{"mean": {"question->prompt": 1.0}, "std": {"question->prompt": -1}}')
    with pytest.raises(DataError, match=r"bad\.json.*std of 'question->prompt'"):
        FlowStandardizer.load(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{"mean":\n')
    with pytest.raises(DataError, match=r"broken\.json, line 2: invalid JSON"):
        FlowStandardizer.load(broken)


# ---------------------------------------------------------------------------------------------
# Score and config
# ---------------------------------------------------------------------------------------------


def test_synthesized_score_by_hand():
    # 0.25*2 + 0.75*(-1) + 0.5*4 = 0.5 - 0.75 + 2 = 1.75
    assert synthesized_score(2.0, -1.0, 4.0, lam=0.25, mu=0.5) == pytest.approx(1.75)
    # mu = 0: z_pr is ignored and may be omitted: 0.5*1 + 0.5*3 = 2
    assert synthesized_score(1.0, 3.0, lam=0.5) == pytest.approx(2.0)
    s = synthesized_score(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), lam=1.0)
    assert s.tolist() == [1.0, 0.0]
    with pytest.raises(InputError, match="z_pr was not given"):
        synthesized_score(1.0, 1.0, lam=0.5, mu=1.0)
    with pytest.raises(ConfigError, match=r"lam must be a number in \[0, 1\]"):
        synthesized_score(1.0, 1.0, lam=-0.1)
    # IAPConfig.score uses its own weights: 0.25*2 + 0.75*(-1) + 0.5*4 = 1.75
    assert IAPConfig(lam=0.25, mu=0.5).score(2.0, -1.0, 4.0) == pytest.approx(1.75)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": 1.5}, r"lam must be a number in \[0, 1\].*got 1\.5"),
        ({"mu": -1.0}, r"mu must be a finite number >= 0.*got -1\.0"),
        ({"tau": float("nan")}, r"tau must be a finite number"),
        ({"m": 0}, r"m must be an int >= 1.*got 0"),
        ({"m": 2.0}, r"m must be an int >= 1.*got 2\.0"),
        ({"qp_layers": (0, 0.5, 1)}, r"IAPConfig\.qp_layers=\(0, 0\.5, 1\) mixes floats"),
        ({"qr_layers": (0.8, 0.2)}, r"not a valid fraction pair; expected 0\.0 <= start_frac < end_frac"),
        ({"pr_layers": (1.5, 2.0)}, r"not a valid fraction pair"),
        ({"pr_layers": ()}, r"IAPConfig\.pr_layers is an empty list"),
        ({"pr_layers": "last"}, r"'last' is not a layer-set name"),
        ({"aggregate": "sum"}, r"aggregate must be 'mean', got 'sum'"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        IAPConfig(**kwargs)


def test_config_layers_and_json_round_trip():
    cfg = IAPConfig(lam=0.3, tau=-0.5, m=5, qp_layers=[2, 1], qr_layers=(0.5, 1.0))
    assert cfg.qp_layers == (2, 1)  # list -> tuple (hashable); resolving sorts
    # 12 layers: qp (1, 2); qr l/12 in [0.5, 1) = 6..11; pr default "deep" = 8..11
    assert cfg.layers(12) == {FLOW_QP: (1, 2), FLOW_QR: (6, 7, 8, 9, 10, 11),
                              FLOW_PR: (8, 9, 10, 11)}
    back = IAPConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['lambda'\]"):
        IAPConfig.from_dict({"lambda": 0.5})


def test_resolve_layers_by_hand():
    # the one grammar (dpc_lens.layers): a fraction pair (a, b) takes the layers l with
    # a <= l / n < b. 32 layers: first third 0..10 (10/32 < 1/3 <= 11/32), last third 22..31
    assert resolve_layers((0.0, 1 / 3), 32) == list(range(0, 11))
    assert resolve_layers((2 / 3, 1.0), 32) == list(range(22, 32))
    # 4 layers: last third is [3] (2/3 <= 3/4), first third [0, 1] (1/4 < 1/3)
    assert resolve_layers((2 / 3, 1.0), 4) == [3]
    assert resolve_layers((0.0, 1 / 3), 4) == [0, 1]
    # a boundary exactly on a layer includes it: 5 layers, (0.5, 1.0) -> 3, 4 (2/5 < 0.5 <= 3/5)
    assert resolve_layers((0.5, 1.0), 5) == [3, 4]
    # (0, 1) are ints: layers 0 and 1, not "all layers"; negative indices count from the end
    assert resolve_layers((0, 1), 32) == [0, 1]
    assert resolve_layers((-1, 0), 4) == [0, 3]
    # the IAP defaults on a 2-layer model: qp (0, 1/3) -> [0], "deep" -> [1]
    assert IAPConfig().layers(2) == {FLOW_QP: (0,), FLOW_QR: (1,), FLOW_PR: (1,)}
    with pytest.raises(ConfigError, match=r"layer index 4 is out of range for a 4-layer model"):
        resolve_layers((1, 4), 4)
    with pytest.raises(ConfigError, match=r"selects no layer of a 4-layer model"):
        resolve_layers((0.3, 0.45), 4)


# ---------------------------------------------------------------------------------------------
# IAP-ss
# ---------------------------------------------------------------------------------------------


def test_ss_score_exactly_tau_clears():
    r = iap_ss([0.2, 0.5, 0.9], ["a", "b", "c"], tau=0.5)
    assert (r.index, r.answer, r.n_tried, r.fallback) == (1, "b", 2, False)
    assert r.considered == (0, 1)
    # just above 0.5: prompt 1 no longer clears, prompt 2 does
    r = iap_ss([0.2, 0.5, 0.9], ["a", "b", "c"], tau=0.5000001)
    assert (r.index, r.answer, r.n_tried) == (2, "c", 3)


def test_ss_first_prompt_clears_costs_one():
    r = iap_ss(torch.tensor([3.0, 5.0]), ["x", "y"], tau=1.0)
    assert (r.index, r.answer, r.n_tried, r.fallback) == (0, "x", 1, False)


def test_ss_fallback_to_best_with_earliest_tie():
    # nothing reaches 1.0; best score 0.3 is shared by prompts 1 and 3 -> earliest, prompt 1
    r = iap_ss([0.1, 0.3, -2.0, 0.3], ["a", "b", "c", "d"], tau=1.0)
    assert (r.index, r.answer, r.n_tried, r.fallback) == (1, "b", 4, True)
    assert r.to_dict()["fallback"] is True


def test_ss_returns_none_answer_as_is_and_validates():
    r = iap_ss([1.0, 2.0], [None, "b"], tau=0.0)
    assert r.answer is None and r.index == 0
    with pytest.raises(InputError, match="2 scores but 3 answers"):
        iap_ss([1.0, 2.0], ["a", "b", "c"], tau=0.0)
    with pytest.raises(InputError, match=r"position\(s\) \[1\] are NaN"):
        iap_ss([1.0, float("nan")], ["a", "b"], tau=0.0)
    with pytest.raises(InputError, match="no prompt"):
        iap_ss([], [], tau=0.0)


# ---------------------------------------------------------------------------------------------
# IAP-mv
# ---------------------------------------------------------------------------------------------


def test_mv_majority_among_top_m():
    # top 3 by score: prompts 0 (A), 1 (B), 2 (B) -> B wins 2:1; its best voter is prompt 1
    r = iap_mv([0.9, 0.8, 0.7, 0.1], ["A", "B", "B", "A"], m=3)
    assert (r.answer, r.index, r.n_tried) == ("B", 1, 4)
    assert r.considered == (0, 1, 2) and dict(r.votes) == {"A": 1, "B": 2}


def test_mv_score_ties_in_top_m_follow_pool_order():
    # ranking: prompt 1 (0.9), then 0, 2, 3 all at 0.5 -> pool order keeps 0 and 2.
    # votes Y:1 (0.9), X:1 (0.5), Z:1 (0.5) -> Y by summed score.
    # (Had the tie kept prompt 3 instead of 0, Z would have 2 votes and win.)
    r = iap_mv([0.5, 0.9, 0.5, 0.5], ["X", "Y", "Z", "Z"], m=3)
    assert r.considered == (1, 0, 2)
    assert r.answer == "Y"


def test_mv_vote_tie_broken_by_summed_score():
    # A: prompts 0 and 2 -> 1.0 + 0.2 = 1.2; B: prompts 1 and 3 -> 0.9 + 0.8 = 1.7 -> B,
    # although A holds the single best score.
    r = iap_mv([1.0, 0.9, 0.2, 0.8], ["A", "B", "A", "B"], m=4)
    assert (r.answer, r.index) == ("B", 1)


def test_mv_vote_and_sum_tie_broken_by_best_single_score():
    # B: 0.5 + 0.5 = 1.0, A: 0.0 + 1.0 = 1.0; best single: A 1.0 > B 0.5 -> A, even though
    # B's prompts come first in pool order
    r = iap_mv([0.5, 0.5, 0.0, 1.0], ["B", "B", "A", "A"], m=4)
    assert (r.answer, r.index) == ("A", 3)


def test_mv_full_tie_goes_to_pool_order():
    # identical scores and one vote each: the answer of the earlier prompt wins (not "A" < "B")
    r = iap_mv([0.5, 0.5], ["B", "A"], m=2)
    assert (r.answer, r.index) == ("B", 0)


def test_mv_none_answers_do_not_vote():
    # top prompt says nothing; the only real answer among the top 3 is C
    r = iap_mv([0.9, 0.8, 0.7], [None, None, "C"], m=3)
    assert (r.answer, r.index) == ("C", 2) and dict(r.votes) == {"C": 1}


def test_mv_all_none_gives_none_from_top_prompt():
    r = iap_mv([0.1, 0.9, 0.5], [None, None, None], m=2)
    assert r.answer is None and r.index == 1 and r.considered == (1, 2) and dict(r.votes) == {}


def test_mv_m_larger_than_pool_is_clamped():
    # m = 10 on 3 prompts votes over all 3: Q:2 vs P:1 -> Q
    r = iap_mv([0.3, 0.2, 0.1], ["P", "Q", "Q"], m=10)
    assert r.answer == "Q" and r.considered == (0, 1, 2) and r.n_tried == 3
    with pytest.raises(ConfigError, match=r"m must be an int >= 1.*got 0"):
        iap_mv([0.3], ["P"], m=0)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def test_majority_vote_baseline():
    assert majority_vote(["A", "B", "B", None, None, None]) == "B"  # None does not vote
    assert majority_vote(["B", "A", "A", "B"]) == "B"  # 2:2 -> first seen in pool order
    assert majority_vote([None, None]) is None


def test_single_prompt_answers_is_a_column():
    assert single_prompt_answers([["a", "b"], ["c", None]], 1) == ["b", None]
    with pytest.raises(InputError, match="out of range"):
        single_prompt_answers([["a"]], 2)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def _dev_set():
    # Q1 (gold "1"): scores lam=1 -> [2, 0, -1]; lam=0 -> [-2, 1, 0]; lam=0.5 -> [0, 0.5, -0.5]
    q1 = QuestionRecord(z_qp=[2.0, 0.0, -1.0], z_qr=[-2.0, 1.0, 0.0], answers=["9", "1", "1"])
    # Q2 (gold "2"): lam=1 -> [0, 1, 0]; lam=0 -> [1, -1, 0]; lam=0.5 -> [0.5, 0, 0]
    q2 = {"z_qp": [0.0, 1.0, 0.0], "z_qr": [1.0, -1.0, 0.0], "answers": ["2", "7", "2"]}
    return [q1, q2], ["1", "2"]


def test_calibrate_by_hand(tmp_path):
    records, golds = _dev_set()
    res = calibrate(records, golds, lam_grid=[1.0, 0.0, 0.5], tau_grid=[0.0, 0.75],
                    m_grid=[1, 3], is_correct=lambda a, g: a == g)
    # IAP-ss accuracy (Q1, Q2):
    #   lam=1,  tau=0    : Q1 p0 "9" x, Q2 p0 "2" ok   -> 0.5 (tried 1, 1)
    #   lam=1,  tau=0.75 : Q1 p0 x,     Q2 p1 "7" x    -> 0.0
    #   lam=0,  tau=0    : Q1 p1 "1" ok, Q2 p0 ok      -> 1.0 (tried 2, 1 -> 1.5)
    #   lam=0,  tau=0.75 : Q1 p1 ok,    Q2 p0 ok       -> 1.0
    #   lam=.5, tau=0    : Q1 p0 x,     Q2 p0 ok       -> 0.5
    #   lam=.5, tau=0.75 : none clears; best Q1 p1 ok, Q2 p0 ok -> 1.0 (tried 3, 3)
    # best = first 1.0 in grid order: lam=0, tau=0
    assert res.best_ss == {"lam": 0.0, "tau": 0.0, "accuracy": 1.0, "mean_tried": 1.5}
    # IAP-mv: lam=1, m=1: Q1 p0 x, Q2 p1 x -> 0.0; lam=1, m=3: "1" 2:1 ok, "2" 2:1 ok -> 1.0
    assert res.best_mv == {"lam": 1.0, "m": 3, "accuracy": 1.0}
    sens = {(r["strategy"], r["param"], r["value"]): r["accuracy"] for r in res.sensitivity}
    assert sens == {
        # ss: lam swept at tau=0; tau swept at lam=0
        ("iap_ss", "lam", 1.0): 0.5, ("iap_ss", "lam", 0.0): 1.0, ("iap_ss", "lam", 0.5): 0.5,
        ("iap_ss", "tau", 0.0): 1.0, ("iap_ss", "tau", 0.75): 1.0,
        # mv: lam swept at m=3 (all 1.0); m swept at lam=1
        ("iap_mv", "lam", 1.0): 1.0, ("iap_mv", "lam", 0.0): 1.0, ("iap_mv", "lam", 0.5): 1.0,
        ("iap_mv", "m", 1): 0.0, ("iap_mv", "m", 3): 1.0,
    }
    assert len(res.grid) == 3 * 2 + 3 * 2
    # single prompts: p0 (9 x, 2 ok) 0.5; p1 (1 ok, 7 x) 0.5; p2 (1 ok, 2 ok) 1.0
    assert res.baselines == {"single": [0.5, 0.5, 1.0], "majority": 1.0, "oracle": 1.0}
    assert res.config("iap_ss").lam == 0.0 and res.config("iap_mv").m == 3

    df = res.to_dataframe()
    assert len(df) == 10 and {"strategy", "param", "value", "accuracy"} <= set(df.columns)
    f = tmp_path / "cal.json"
    res.save(f)
    back = CalibrationResult.load(f)
    assert back.best_ss == res.best_ss and back.baselines["single"] == [0.5, 0.5, 1.0]


def test_calibrate_with_mu_uses_prompt_to_rationale():
    # one prompt, scores: 0.25*1 + 0.75*3 + 0.5*2 = 3.5 -> clears tau=3.5 but not tau=3.6
    rec = QuestionRecord(z_qp=[1.0], z_qr=[3.0], z_pr=[2.0], answers=["x"])
    assert rec.scores(0.25, 0.5) == pytest.approx([3.5])
    res = calibrate([rec], ["x"], lam_grid=[0.25], tau_grid=[3.6, 3.5], m_grid=[1],
                    is_correct=lambda a, g: a == g, mu=0.5)
    rows = {r["tau"]: r["mean_tried"] for r in res.grid if r["strategy"] == "iap_ss"}
    assert rows == {3.6: 1.0, 3.5: 1.0}  # one prompt: tried once either way
    assert res.mu == 0.5
    with pytest.raises(InputError, match="has no z_pr"):
        QuestionRecord(z_qp=[1.0], z_qr=[1.0], answers=["x"]).scores(0.5, 1.0)


def test_calibrate_validation_messages():
    records, golds = _dev_set()
    ok = dict(lam_grid=[0.5], tau_grid=[0.0], m_grid=[3], is_correct=lambda a, g: a == g)
    with pytest.raises(ConfigError, match=r"calibrate\(lam_grid\): lam must be a number in \[0, 1\]"):
        calibrate(records, golds, **{**ok, "lam_grid": [0.5, 1.5]})
    with pytest.raises(ConfigError, match="m_grid is empty"):
        calibrate(records, golds, **{**ok, "m_grid": []})
    with pytest.raises(InputError, match="2 records but 1 golds"):
        calibrate(records, golds[:1], **ok)
    with pytest.raises(InputError, match=r"one entry per pool prompt, got lengths"):
        QuestionRecord(z_qp=[1.0, 2.0], z_qr=[1.0], answers=["a", "b"])
    with pytest.raises(InputError, match=r"answers\[1\] must be a string or None, got 3"):
        QuestionRecord(z_qp=[1.0, 2.0], z_qr=[1.0, 0.0], answers=["a", 3])
