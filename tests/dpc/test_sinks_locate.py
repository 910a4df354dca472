"""Issue 19: sinks found wherever they sit, the locators, instance-adaptivity, the trigger's AUC and
the random baseline's candidate set. Every expected number is worked out by hand in the comments
(or by an obviously-correct slow loop kept here), never taken from the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from dpc_lens.dpc import DetectorConfig, DetectorInputs, accumulation, dynamic_trigger, random_rows_for
from dpc_lens.dpc.diagnostics import (
    adaptivity_warning,
    fit_sink_scale,
    instance_adaptivity,
    locating_vs_modal,
    trigger_auc,
)
from dpc_lens.dpc.locate import (
    LocatorProfile,
    apply_sink_policy,
    argmax_locate,
    candidate_positions,
    z_locate,
)
from dpc_lens.dpc.sinks import (
    attention_received,
    detect_sinks,
    relative_to_typical,
    residual_multiple,
    sinks_by_band,
)
from dpc_lens.errors import ConfigError, DataError, InputError

# ------------------------------------------------------------------------------------- sinks


def _sink_pattern() -> torch.Tensor:
    """One layer, one head, 6 positions; queries 3, 4, 5 each give 0.9 to key 2 and spread 0.1
    evenly over their other visible keys (a sink at position 2, not 0)."""
    a = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    for i in range(6):
        others = [j for j in range(i + 1) if j != 2]
        if i < 2:
            a[0, 0, i, : i + 1] = 1.0 / (i + 1)
            continue
        a[0, 0, i, 2] = 0.9
        for j in others:
            a[0, 0, i, j] = 0.1 / len(others)
    return a


def test_attention_received_and_multiple_by_hand():
    got = attention_received(_sink_pattern(), [3, 4, 5])
    # row 3 gives 0.1/3 to keys 0,1,3; row 4 0.1/4 to 0,1,3,4; row 5 0.1/5 to 0,1,3,4,5
    k0 = (0.1 / 3 + 0.1 / 4 + 0.1 / 5) / 3  # keys 0, 1: seen by queries 3, 4, 5
    k3 = (0.1 / 4 + 0.1 / 5) / 2  # key 3: seen (strictly later) by queries 4, 5
    k4 = 0.1 / 5
    expected = [k0, k0, 0.9, k3, k4]
    assert got[0, :5].tolist() == pytest.approx(expected)
    assert math.isnan(float(got[0, 5]))  # no counted query comes after the last key
    mult = relative_to_typical(got)
    typical = sorted(expected)[2]  # median of 5 values = k0
    assert typical == pytest.approx(k0)
    assert float(mult[0, 2]) == pytest.approx(0.9 / k0)  # about 34x a typical token
    assert float(mult[0, 0]) == pytest.approx(1.0)


def test_sink_detected_away_from_position_0():
    mult = relative_to_typical(attention_received(_sink_pattern(), [3, 4, 5]))[:, :4]  # soft = 0..3
    assert detect_sinks(mult, [0], threshold=10.0) == (2,)
    assert detect_sinks(mult, [0], threshold=40.0) == ()  # 34x is below a 40x bar
    # residual norms: position 1 is 4x the median (1.0) -> a sink by norm alone when asked
    res = residual_multiple(torch.tensor([[1.0, 4.0, 1.0, 1.0, 1.0]], dtype=torch.float64))[:, :4]
    assert res.tolist() == [[1.0, 4.0, 1.0, 1.0]]
    assert detect_sinks(mult, [0], 10.0, res, 3.0) == (1, 2)
    assert detect_sinks(mult, [0], 10.0, res, None) == (2,)


def test_sinks_by_band():
    a = torch.ones(3, 4, dtype=torch.float64)
    a[0, 1] = 30.0  # a sink in the first layer only
    a[2, 3] = 12.0
    bands = sinks_by_band(a, threshold=10.0)
    assert [b["band"] for b in bands] == ["early", "middle", "late"]
    assert [b["layers"] for b in bands] == [[0], [1], [2]]
    assert [b["sinks"] for b in bands] == [[1], [], [3]]
    assert bands[0]["multiple"] == {"1": 30.0}


# ------------------------------------------------------------------------------------- locators

COLS = torch.tensor([[1.0, 2.0, 10.0, 3.0], [1.0, 1.0, 10.0, 2.0]], dtype=torch.float64)  # c = [2, 3, 20, 5]


def test_argmax_and_sink_policies_by_hand():
    c = COLS.sum(0)
    assert argmax_locate(c, 1) == (2,)
    assert argmax_locate(c, 2) == (2, 3)
    assert argmax_locate(torch.tensor([1.0, 5.0, 5.0], dtype=torch.float64), 1) == (1,)  # tie: lower
    s, counted = apply_sink_policy(c, (2,), "exclude")
    assert s.tolist() == [2.0, 3.0, 0.0, 5.0] and counted.tolist() == [True, True, False, True]
    assert argmax_locate(s, 1, counted) == (3,)
    s, _ = apply_sink_policy(c, (2,), "normalize", 10.0)  # 20 / 10 = 2 < 5
    assert s.tolist() == [2.0, 3.0, 2.0, 5.0] and argmax_locate(s, 1) == (3,)
    s, _ = apply_sink_policy(c, (2,), "normalize", 2.0)  # 20 / 2 = 10 > 5
    assert argmax_locate(s, 1) == (2,)


def test_accumulation_with_a_sink_at_position_2():
    acc = accumulation(COLS, [0, 1], sink="exclude", sink_positions=(2,))
    # counted scores [2, 3, 5], total 10: max share 0.5, max/mean = 3 * 0.5
    assert acc.top_indices == (3,) and acc.sink_positions == (2,)
    assert acc.max_share == pytest.approx(0.5) and acc.max_over_mean == pytest.approx(1.5)
    paper = accumulation(COLS, [0, 1])  # the paper's argmax finds the sink
    assert paper.top_indices == (2,)


def test_z_locator_by_hand():
    # shares p = c / 30 = [2/30, 3/30, 20/30, 5/30]
    prof = LocatorProfile("normalized", [0, 1], (0.05, 0.1, 0.7, 0.15), (0.01, 0.05, 0.1, 0.02), 10)
    top, z = z_locate(COLS.sum(0), prof, 1)
    expected = [(2 / 30 - 0.05) / 0.01, 0.0, (20 / 30 - 0.7) / 0.1, (5 / 30 - 0.15) / 0.02]
    assert z.tolist() == pytest.approx(expected)  # [1.667, 0, -0.333, 0.833]
    assert top == (0,)
    # the sink (position 2) is large on every dev question, so it is not unusual here
    det = DetectorConfig(shallow_layers=[0, 1], locator="z", locator_profile=prof, R=0.0)
    inputs = _inputs(COLS)
    assert dynamic_trigger(inputs, det).accumulation.top_indices == (0,)


def test_locator_profile_fit_and_json(tmp_path):
    xs = [_inputs(torch.tensor([c], dtype=torch.float64)) for c in ([1.0, 1, 2], [2.0, 1, 1], [1.0, 2, 1])]
    prof = LocatorProfile.fit(xs, "normalized", [0])
    # shares: [.25,.25,.5], [.5,.25,.25], [.25,.5,.25] -> each position's mean 1/3 and sample std
    # sqrt(((1/12)^2 * 2 + (1/6)^2) / 2) = sqrt(1/48)
    assert prof.mean == pytest.approx((1 / 3,) * 3)
    assert prof.std == pytest.approx((math.sqrt(1 / 48),) * 3)
    path = tmp_path / "profile.json"
    prof.save(path)
    assert LocatorProfile.load(path) == prof
    cfg = DetectorConfig(shallow_layers=[0], locator="z", locator_profile=prof)
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="refit the profile"):
        DetectorConfig(shallow_layers=[0], statistic="raw", locator="z", locator_profile=prof)
    with pytest.raises(ConfigError, match="needs locator_profile"):
        DetectorConfig(locator="z")
    with pytest.raises(InputError, match="std 0"):
        LocatorProfile.fit([xs[0], xs[0]], "normalized", [0])
    with pytest.raises(DataError):
        LocatorProfile.from_dict({"mean": [1.0]})


def test_default_config_json_is_unchanged():
    # configs saved before issue 19 hold no sink or locator keys; the defaults add none
    assert set(DetectorConfig().to_dict()) == {
        "shallow_layers", "deep_layers", "statistic", "beta_mode", "beta_value", "R", "sink",
        "sink_scale", "top_k", "require_accumulation", "accumulation_measure", "accumulation_threshold"}


def _inputs(cols, att=None):
    n_layers = cols.shape[0]
    rows = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * n_layers, dtype=torch.float64)
    return DetectorInputs(cols, cols, rows, rows, soft_attention=att)


def test_detected_sinks_drive_the_policy_in_the_trigger():
    att = torch.ones(2, 4, dtype=torch.float64)
    att[:, 2] = 30.0  # position 2 receives 30x a typical token's attention
    x = _inputs(COLS, att)
    det = DetectorConfig(shallow_layers=[0, 1], deep_layers=[1], sink="exclude", sink_source="detected")
    d = dynamic_trigger(x, det)
    assert d.accumulation.sink_positions == (2,) and d.accumulation.top_indices == (3,)
    assert d.sinks is not None and d.to_dict()["sinks"] == d.sinks
    # position 0 handling is one case: exclude position 0 -> the argmax stays on the sink
    old = dynamic_trigger(x, DetectorConfig(shallow_layers=[0, 1], deep_layers=[1], sink="exclude"))
    assert old.accumulation.top_indices == (2,)
    with pytest.raises(InputError, match="soft_attention is None"):
        dynamic_trigger(_inputs(COLS), det)
    # normalize: scale = median over instances of (mean sink column / mean of the others);
    # layer 0 only: x has c = [1, 2, 10, 3] -> 10 / 2 = 5, y has [1, 1, 4, 1] -> 4; median 4.5
    y = _inputs(torch.tensor([[1.0, 1.0, 4.0, 1.0]], dtype=torch.float64), att[:1])
    ref = DetectorConfig(shallow_layers=[0], sink_source="detected")
    assert fit_sink_scale([x, y], ref) == pytest.approx(4.5)


# ------------------------------------------------------------------------------------- diagnostics


def test_instance_adaptivity_by_hand():
    got = instance_adaptivity([2, 2, 2, 0, None, 5])
    h = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))  # 0.9503 nats
    assert got["n"] == 5 and got["histogram"] == {"0": 1, "2": 3, "5": 1}
    assert got["distinct_positions"] == 3 and got["modal_position"] == 2 and got["modal_share"] == 0.6
    assert got["entropy"] == pytest.approx(h) and got["normalized_entropy"] == pytest.approx(h / math.log(3))
    assert adaptivity_warning(got) is None  # 60% is not > 80%
    flat = instance_adaptivity([2] * 9 + [1])
    line = adaptivity_warning(flat, sinks=[2])
    assert line.startswith("warning: the detector is not instance-adaptive here")
    assert "soft position 2 on 90% of 10 questions" in line and "detected attention sink" in line
    assert "sink_source='detected'" in line
    # the locator already excludes the detected sinks: never advise what is in use
    line = adaptivity_warning(flat, sinks=[0, 5], sinks_excluded=True)
    assert "soft position 2 is not a detected sink (detected sinks 0, 5 are excluded)" in line
    assert "sink_source='detected'" not in line and "locator='z'" in line
    assert "not a detected sink (no detected sink)" in adaptivity_warning(flat, sinks=[])
    line = adaptivity_warning(flat, sinks=[2], locator="z")
    assert "even against the dev profile" in line and "Try" not in line
    assert "sinks were not measured" in adaptivity_warning(flat, sinks=None)
    assert instance_adaptivity([3, 1, 1, 3])["modal_position"] == 1  # tie: lower position


def test_locating_vs_modal_by_hand():
    got = locating_vs_modal([1, 1, 0, 1], [0, 1, 0, 0])
    assert got["diff"] == pytest.approx(0.5) and got["located"] == 0.75 and got["modal"] == 0.25
    assert got["ci95"][0] <= 0.5 <= got["ci95"][1]


def _slow_auc(pos, neg):
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (len(pos) * len(neg))


def test_trigger_auc_by_hand_ties_half():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9]
    labels = [False, False, True, True, True, None]  # the last is left out
    got = trigger_auc(scores, labels)
    # pos {.35,.8,.4} vs neg {.1,.4}: 1+0 + 1+1 + 1+0.5 = 4.5 of 6 pairs
    assert got["auc"] == pytest.approx(0.75) and (got["n_pos"], got["n_neg"]) == (3, 2)
    # the interval against a slow loop over the same resamples
    n_res = 200
    got = trigger_auc(scores, labels, n_resamples=n_res, seed=4)
    kept = [(s, y) for s, y in zip(scores, labels) if y is not None]
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, len(kept), (n_res, len(kept)), generator=g)
    aucs = []
    for row in idx.tolist():
        pos = [kept[i][0] for i in row if kept[i][1]]
        neg = [kept[i][0] for i in row if not kept[i][1]]
        if pos and neg:
            aucs.append(_slow_auc(pos, neg))
    aucs.sort()
    m = len(aucs)
    assert got["ci95"] == pytest.approx([aucs[int(0.025 * m)], aucs[int(0.975 * m) - 1]])
    assert trigger_auc([0.1, 0.2], [True, True])["auc"] is None  # no negative


# ------------------------------------------------------------------------------------- random baseline


def test_random_baseline_candidate_set():
    assert candidate_positions(5, (2,), "exclude") == [0, 1, 3, 4]
    assert candidate_positions(5, (2,), "keep") == [0, 1, 2, 3, 4]
    assert candidate_positions(5, (2,), "normalize") == [0, 1, 2, 3, 4]
    seen = set()
    for seed in range(60):
        rows = random_rows_for("q7", 5, 1, seed, [0, 1, 3, 4])
        assert rows[0] != 2
        seen.update(rows)
        # every position as candidates: the very draw of the unrestricted baseline
        assert random_rows_for("q7", 5, 2, seed, range(5)) == random_rows_for("q7", 5, 2, seed)
    assert seen == {0, 1, 3, 4}
    with pytest.raises(InputError):
        random_rows_for("q7", 5, 3, 0, [0, 1])


# ------------------------------------------------------------------------------------- on a model


def _ref_multiples(attn, hidden, n_soft, queries):
    """Slow reference from Hugging Face's own attentions and hidden states of ONE sequence."""
    n_layers, T = len(attn), attn[0].shape[-1]
    att = torch.zeros(n_layers, n_soft, dtype=torch.float64)
    res = torch.zeros(n_layers, n_soft, dtype=torch.float64)
    for layer in range(n_layers):
        a = attn[layer][0].double().mean(0)  # [query, key]
        recv = []
        for j in range(T):
            qs = [i for i in queries if i > j]
            recv.append(sum(float(a[i, j]) for i in qs) / len(qs) if qs else None)
        defined = sorted(v for v in recv if v is not None)
        m = len(defined)
        typical = defined[m // 2] if m % 2 else defined[m // 2 - 1]  # torch's lower median
        norms = [float(hidden[layer][0, j].double().norm()) for j in range(T)]
        ns = sorted(norms)
        med = ns[(T - 1) // 2]
        for j in range(n_soft):
            att[layer, j] = recv[j] / typical
            res[layer, j] = norms[j] / med
    return att, res


def test_measure_sink_inputs_matches_hugging_face(tmp_path):
    import transformers

    from dpc_lens.dpc.sinks import measure_sink_inputs
    from dpc_lens.model import as_adapter, load_model
    from dpc_lens.segments import SegmentLayout
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.testing import save_tiny_hf_model

    d = save_tiny_hf_model("llama", tmp_path / "m", seed=2)
    adapter = as_adapter(load_model(d, device="cpu"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    rows = torch.randn(3, adapter.d_model, generator=torch.Generator().manual_seed(0))
    soft = SoftPrompt(rows)
    seqs = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 14]]  # different lengths: one is left-padded
    lays = [SegmentLayout({"bos": (0, 1), "question": (1, 4), "rationale": (4, 7)}, 7),
            SegmentLayout({"bos": (0, 1), "question": (1, 3), "rationale": (3, 5)}, 5)]
    got = measure_sink_inputs(adapter, seqs, lays, soft, batch_size=2)
    for (att, res), seq, lay in zip(got, seqs, lays):
        with torch.no_grad():
            emb = torch.cat([rows[None], hf.get_input_embeddings()(torch.tensor([seq]))], 1)
            out = hf(inputs_embeds=emb, output_attentions=True, output_hidden_states=True)
        q0, q1 = lay.spans["question"][0] + 3, lay.spans["rationale"][1] + 3
        ref_att, ref_res = _ref_multiples(out.attentions, out.hidden_states, 3, range(q0, q1))
        torch.testing.assert_close(att, ref_att, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res, ref_res, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- calibration


def _cal_inputs():
    """Three instances, 2 layers, 3 soft rows; deep layer 1's rationale rows give affected shares
    1.0, 0.5 and 0.0 (first-half mean 1); layer 0's columns locate rows 1, 0 and 2."""
    out = []
    for col, second in (([1.0, 5.0, 1.0], [2.0, 2.0]), ([5.0, 1.0, 1.0], [2.0, 0.0]),
                        ([1.0, 1.0, 5.0], [0.0, 0.0])):
        cols = torch.tensor([col, [1.0, 1.0, 1.0]], dtype=torch.float64)
        rows = torch.tensor([[1.0] * 4, [1.0, 1.0, *second]], dtype=torch.float64)
        att = torch.ones(2, 3, dtype=torch.float64)
        att[:, 1] = 50.0  # soft row 1 is a sink on every instance
        out.append(DetectorInputs(cols, cols / 10, rows, rows / 10, soft_attention=att))
    return out


def test_calibration_reports_always_corrupt_and_trigger_auc_by_hand():
    from dpc_lens.dpc.calibration import CalibrationGrid, DPCCalibration, calibrate_from_cache

    grid = CalibrationGrid(R=(0.25,), statistic=("raw",), top_k=(1,), shallow_layers=([0],),
                           deep_layers=([1],), sink=("keep",))
    pt = [False, True, False]
    corrupted = {(0, (1,)): True, (1, (0,)): False, (2, (2,)): True}
    cal = calibrate_from_cache(_cal_inputs(), pt, corrupted, grid)
    # fires on shares 1.0 and 0.5 (> 0.25): instance 0 -> right, 1 -> wrong; 2 keeps PT (wrong)
    assert cal.best_accuracy == pytest.approx(1 / 3)
    assert cal.always_accuracy == pytest.approx(2 / 3)  # every located row corrupted: T, F, T
    # helps: instances 0 and 2 (shares 1.0, 0.0); hurts: instance 1 (0.5) -> (1 + 0) / 2
    auc = cal.trigger_auc["corruption_helps_vs_hurts"]
    assert auc["auc"] == pytest.approx(0.5) and (auc["n_pos"], auc["n_neg"]) == (2, 1)
    assert any("does no better than corrupting" in r for r in cal.remarks)
    again = DPCCalibration.from_dict(cal.to_dict())
    assert again.always_accuracy == cal.always_accuracy and again.trigger_auc == cal.trigger_auc
    # with the base model's grades: PT wrong and base right = instances 0 and 2 (shares 1.0, 0.0)
    # against instance 1 (0.5) -> (1 + 0) / 2
    with_base = calibrate_from_cache(_cal_inputs(), pt, corrupted, grid, base_correct=[True, True, True])
    b = with_base.trigger_auc["pt_wrong_base_right"]
    assert b["auc"] == pytest.approx(0.5) and (b["n_pos"], b["n_neg"]) == (2, 1)
    # without the always-corrupted answer of instance 2 there is nothing to report
    part = calibrate_from_cache(_cal_inputs(), pt, {k: v for k, v in corrupted.items() if k[0] != 2}, grid)
    assert part.always_accuracy is None and part.trigger_auc is None


def test_calibration_grid_tries_locators_and_detected_sinks():
    from dpc_lens.dpc.calibration import CalibrationGrid, sweep_triggers

    grid = CalibrationGrid(R=(0.25,), statistic=("raw",), top_k=(1,), shallow_layers=([0],),
                           deep_layers=([1],), sink=("keep", "exclude"), locator=("argmax", "z"),
                           sink_source=("position0", "detected"))
    assert CalibrationGrid.from_dict(grid.to_dict()) == grid
    sweep = sweep_triggers(_cal_inputs(), grid)
    assert {(p["sink"], p["locator"], p["sink_source"]) for p in sweep.points} == {
        (s, loc, src) for s in ("keep", "exclude") for loc in ("argmax", "z")
        for src in ("position0", "detected")}
    by = {(p["sink"], p["locator"], p["sink_source"]): sweep.point_rows(i)
          for i, p in enumerate(sweep.points)}
    assert by[("keep", "argmax", "position0")] == ((1,), (0,), (2,))  # the paper's argmax
    assert by[("exclude", "argmax", "position0")] == ((1,), (1,), (2,))  # 0 excluded: next best
    assert by[("exclude", "argmax", "detected")] == ((0,), (0,), (2,))  # the sink (row 1) excluded
    assert any("locator profile" in n for n in sweep.notes)
    # the default grid names neither knob, so older calibration files keep their points
    assert "locator" not in CalibrationGrid().to_dict() and "locator" not in CalibrationGrid().knobs


# ------------------------------------------------------------------------------------- run summary


def _record(i, located, share, pt, always, base):
    sinks = [{"band": "early", "layers": [0], "sinks": [2]}, {"band": "late", "layers": [1], "sinks": []}]
    return {"id": f"q{i}", "pt": {"answer": "1", "correct": pt},
            "dpc": {"answer": "1", "correct": pt, "fired": False},
            "always": {"answer": "1", "correct": always}, "base": {"answer": "1", "correct": base},
            "located_rows": [located], "trigger": {"deep_flow": {"affected_share": share}, "sinks": sinks}}


def test_run_summary_warns_once_and_names_the_sink(capsys):
    from dpc_lens.dpc import print_summary, summarize

    recs = [_record(i, 2, 0.1 * i, i % 2 == 0, i % 3 == 0, i < 5) for i in range(9)]
    recs.append(_record(9, 4, 0.95, False, True, True))
    s = summarize(recs)
    lt = s["located_token"]
    assert (lt["modal_position"], lt["modal_share"], lt["distinct_positions"]) == (2, 0.9, 2)
    assert lt["sinks"] == {"early": {"layers": [0], "sinks": [2]}, "late": {"layers": [1], "sinks": []}}
    # helps (PT wrong, always right): i = 3, 9 -> shares .3, .95; hurts (PT right, always wrong):
    # i = 2, 4, 8 -> .2, .4, .8; pairs won: .3 > .2 (1); .95 > all (3) -> 4 of 6
    auc = s["trigger_auc"]["corruption_helps_vs_hurts"]
    assert (auc["n_pos"], auc["n_neg"]) == (2, 3) and auc["auc"] == pytest.approx(4 / 6)
    print_summary(s)
    out = capsys.readouterr().out.splitlines()
    warn = [line for line in out if line.startswith("warning: the detector is not instance-adaptive")]
    assert len(warn) == 1 and "soft position 2 on 90% of 10 questions" in warn[0]
    assert "detected attention sink" in warn[0]
    recs[0]["located_rows"] = [4]
    recs[1]["located_rows"] = [5]  # 2 now on 70%: no warning
    assert summarize(recs)["located_token"]["warning"] is None


def test_calibration_cache_keeps_the_sink_tensors():
    from dpc_lens.dpc.calibration import _inputs_from_json, _inputs_json

    x = _cal_inputs()[0]
    back = _inputs_from_json(_inputs_json(x))
    assert back.soft_attention.tolist() == x.soft_attention.tolist() and back.soft_residual is None
    assert back.soft_columns.tolist() == x.soft_columns.tolist()
    old = {k: v for k, v in _inputs_json(x).items() if k != "soft_attention"}  # a cache from before
    assert _inputs_from_json(old).soft_attention is None
