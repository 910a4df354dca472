"""Issue 19 item 7: the demo samples its questions at random (seeded) and closes with the
committed full evidence and a verdict drawn from it, never from the slice."""

from __future__ import annotations

import json
import os

import pytest

from dpc_lens.testbed.demo import full_evidence, full_evidence_lines, sample_indices


def test_sample_is_seeded_random_not_the_first_rows():
    a = sample_indices(600, 40)
    assert a == sample_indices(600, 40)  # seeded: the same questions every run
    assert len(a) == 40 == len(set(a)) and a == sorted(a) and 0 <= a[0] and a[-1] < 600
    assert a != list(range(40))
    assert a != sample_indices(600, 40, seed=1)
    assert sample_indices(600, None) == list(range(600)) == sample_indices(600, 900)


def _evidence(tmp_path, dpc_ci):
    table = [
        {"method": "base (no soft prompt)", "accuracy": 0.313, "diff_vs_pt": -0.099,
         "ci95": [-0.142, -0.055]},
        {"method": "vanilla PT", "accuracy": 0.412, "diff_vs_pt": 0.0, "ci95": [0.0, 0.0]},
        {"method": "DPC, calibrated trigger", "accuracy": 0.435, "diff_vs_pt": 0.023, "ci95": dpc_ci},
        {"method": "DPC raw, k=2", "accuracy": 0.9, "diff_vs_pt": 0.5, "ci95": [0.4, 0.6]},  # not a demo row
        {"method": "random corruption (1 token, mean of 5 draws)", "accuracy": 0.448, "diff_vs_pt": 0.037,
         "ci95": [0.006, 0.067]},
        {"method": "random corruption from the candidates (detected sinks excluded; 1 token, mean of 5 "
                   "draws)", "accuracy": 0.477, "diff_vs_pt": 0.066, "ci95": [0.038, 0.094]},
    ]
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps({"n": 600, "table": table}))
    return full_evidence("real", str(path))


def test_full_evidence_line_and_verdict_by_hand(tmp_path):
    ev = _evidence(tmp_path, [-0.015, 0.058])
    assert ev["n"] == 600 and list(ev["rows"]) == ["base", "pt", "dpc", "random", "random*"]
    lines = full_evidence_lines(ev, {"n": 40, "accuracy": {"dpc": 0.575, "pt": 0.35}})
    assert lines[0].startswith("full evidence (n = 600 test questions")
    assert lines[0].endswith("base 31.3 (-9.9 [-14.2, -5.5]); pt 41.2; dpc 43.5 (+2.3 [-1.5, +5.8]); "
                             "random 44.8 (+3.7 [+0.6, +6.7]); random* 47.7 (+6.6 [+3.8, +9.4])")
    assert lines[1] == ("verdict, from the full evidence: no evidence that DPC beats PT (DPC 43.5% vs PT "
                        "41.2%, +2.3 points, 95% [-1.5, +5.8] over 600 questions; the interval includes 0); "
                        "corrupting a random soft token did as well or better (44.8%, +3.7 [+0.6, +6.7]); "
                        "corrupting a random soft token that is not a detected sink did as well or better "
                        "(47.7%, +6.6 [+3.8, +9.4])")
    # the lucky slice (57.5 vs 35.0) is named as overruled, never headlined
    assert lines[2] == ("this slice of 40 questions points another way than the full evidence; the "
                        "slice is too small to overrule it")
    sure = _evidence(tmp_path, [0.005, 0.04])
    assert "verdict, from the full evidence: DPC beat PT (" in full_evidence_lines(sure)[1]
    assert len(full_evidence_lines(sure, {"n": 5, "accuracy": {"dpc": 0.6, "pt": 0.4}})) == 2  # agrees
    assert full_evidence("real", str(tmp_path / "absent.json")) is None


def test_committed_real_evidence_is_read():
    ev = full_evidence("real")
    if ev is None:
        pytest.skip("benchmarks/results is not in this checkout")
    assert ev["n"] >= 600 and {"pt", "dpc", "random", "random*"} <= set(ev["rows"])
    raw = json.load(open(ev["path"]))
    dpc = next(r for r in raw["table"] if r["method"] == "DPC, calibrated trigger")
    assert ev["rows"]["dpc"]["ci95"] == dpc["ci95"]


def test_demo_limit_5_prints_the_full_evidence_line(tmp_path, capsys):
    from dpc_lens.cli import main
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts

    art = shipped_artefacts()
    if art is None:
        pytest.skip("the shipped reasoner is not installed")
    assert main(["demo", "--out", str(tmp_path), "--limit", "5", "--testbed", "reasoner",
                 "--no-progress", "--no-plots", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "a random sample of 5 of the 600 test questions" in out
    assert "full evidence (n = 600 test questions" in out and "verdict, from the full evidence:" in out
    assert "figures" not in out.split("verdict, from the full evidence:")[1]  # --no-plots
    assert not os.path.exists(tmp_path / "figures")
    exs = load_examples(art["test"], get_task("arith"))
    ids = [json.loads(line)["id"] for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert ids == [exs[i].id for i in sample_indices(len(exs), 5)]
