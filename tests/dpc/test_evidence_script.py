"""benchmarks/evidence_table.py's issue-19 options: the locator rows, both random baselines, the
modal pass and the diagnostics, checked on hand-made records and as a dry run on the reasoner."""

from __future__ import annotations

import importlib.util
import os

import pytest

from dpc_lens.dpc import DPCConfig, LocatorProfile
from dpc_lens.testbed import shipped_artefacts

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "evidence_table.py")


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("evidence_table", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_locator_configs(ev):
    cfg = DPCConfig()
    prof = LocatorProfile("normalized", "shallow", (0.5, 0.5), (0.1, 0.1), 5)
    dets = ev.locator_configs(cfg, ["paper", "sink_excluded", "z"], prof)
    assert dets["paper"] == cfg.detector  # the paper's argmax is the default detector
    assert (dets["sink_excluded"].sink, dets["sink_excluded"].sink_source) == ("exclude", "detected")
    assert dets["z"].locator == "z" and dets["z"].locator_profile == prof
    with pytest.raises(SystemExit, match="dev profile"):
        ev.locator_configs(cfg, ["z"])
    with pytest.raises(SystemExit, match="unknown locator"):
        ev.locator_configs(cfg, ["argmin"])


def test_modal_rows_band_sinks_and_aucs_by_hand(ev):
    recs = [{"located": [2]}, {"located": [2]}, {"located": [5]}, {"located": []}, {"located": [5]}]
    assert ev.modal_rows(recs, lambda r: r["located"]) == (2,)  # 2 and 5 tie: the lower
    bands = [{"early": [2], "late": []}, {"early": [2, 3], "late": [1]}, {"early": [], "late": []}]
    # a position counts when detected on at least half (1.5) of the 3 questions
    assert ev._band_sinks([{"sink_bands": b} for b in bands]) == {"early": [2], "late": []}
    recs = [{"share": 0.9, "pt": False, "always": True, "base": True},   # helps; base right
            {"share": 0.2, "pt": True, "always": False, "base": True},   # hurts
            {"share": 0.5, "pt": False, "always": True, "base": False},  # helps
            {"share": 0.4, "pt": True, "always": True, "base": True},    # neither (left out)
            {"share": None, "pt": False, "always": False, "base": False}]  # no trigger: left out
    aucs = ev._trigger_aucs(recs)
    h = aucs["corruption_helps_vs_hurts"]
    assert (h["n_pos"], h["n_neg"], h["auc"]) == (2, 1, 1.0)  # 0.9 and 0.5 both above 0.2
    b = aucs["pt_wrong_base_right"]
    # positive: share 0.9; negatives 0.2, 0.5, 0.4 -> all below -> 1.0
    assert (b["n_pos"], b["n_neg"], b["auc"]) == (1, 3, 1.0)


@pytest.mark.skipif(shipped_artefacts() is None, reason="the shipped reasoner is not installed")
def test_dry_run_on_the_reasoner(ev, tmp_path, capsys):
    out = str(tmp_path / "e.json")
    assert ev.main(["--testbed", "reasoner", "--limit", "3", "--locators", "paper,sink_excluded,z",
                    "--modal", "--dry-run", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "would run 3 test questions" in text and "'sink_excluded'" in text
    assert "5 unrestricted + 5 from the sink-excluded candidates" in text
    assert not os.path.exists(out + ".records.jsonl")  # a dry run writes nothing


def test_sink_survey_is_gathered_per_prompt(ev, tmp_path):
    import json

    for variant, training in (("shipped", None), ("paper", {"model": "smollm2", "steps_done": 143,
                                                           "settings": {"n_tokens": 100}, "extra": 1})):
        d = tmp_path / variant
        d.mkdir()
        (d / "survey_dev.json").write_text(json.dumps({"variant": variant, "n_dev": 150}))
        if training:
            (d / "training.json").write_text(json.dumps(training))
    (tmp_path / "unfinished").mkdir()  # trained, not yet surveyed: left out
    got = ev.sink_survey(str(tmp_path))
    assert sorted(got) == ["paper", "shipped"] and "training" not in got["shipped"]
    assert got["paper"]["training"] == {"model": "smollm2", "settings": {"n_tokens": 100},
                                        "best_step": None, "steps_done": 143, "wall_s": None}
    assert ev.sink_survey(str(tmp_path / "absent")) == {}
