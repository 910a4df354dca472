"""The shipped test bed loads offline and ``dpc-lens demo`` runs end to end (reduced set)."""

from __future__ import annotations

import json

import pytest


def test_shipped_artefacts_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from dpc_lens.dpc import DPCConfig
    from dpc_lens.model import as_adapter, load_model
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts

    art = shipped_artefacts()
    assert art is not None, "dpc_lens/data must ship reasoner/, soft_prompt/ and test.jsonl"
    model = load_model(art["model"], device="cpu")
    ad = as_adapter(model)
    assert (ad.n_layers, ad.d_model) == (4, 128)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    assert soft.n_tokens == 16 and soft.d_model == ad.d_model
    task = get_task("arith")
    assert len(load_examples(art["test"], task)) >= 500
    assert len(load_examples(art["dev"], task)) >= 100
    cfg = DPCConfig.load(art["config"])
    assert cfg.generation.max_new_tokens >= 32


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_reduced_set(tmp_path, capsys):
    from dpc_lens.cli import main

    assert main(["demo", "--out", str(tmp_path), "--limit", "12", "--testbed", "reasoner",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    for word in ("base", "pt", "dpc", "oracle", "trigger rate"):
        assert word in out
    recs = [json.loads(l) for l in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 12
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 12
    assert summary["accuracy"]["base"] == sum(r["base"]["correct"] for r in recs) / 12
    assert summary["accuracy"]["dpc"] == sum(r["dpc"]["correct"] for r in recs) / 12
    # the shipped prompt-tuned reasoner answers at least some of them (a real model, not random)
    assert summary["accuracy"]["oracle"] > 0
    # how sure the run is, printed with the verdict (12 questions: the interval is wide)
    lo, hi = summary["dpc_minus_pt"]["ci95"]
    assert f"95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]" in out
    assert ("it includes 0" in out) == (lo <= 0 <= hi)
    # the report is written by default and its path is the last line printed (issue 20)
    assert out.strip().splitlines()[-1] == f"report: {tmp_path / 'report.html'}"
    assert "<h1>dpc-lens report: DPC run</h1>" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "provenance.json").read_text())["command"] == "dpc-lens demo"
    assert main(["demo", "--out", str(tmp_path), "--limit", "2", "--testbed", "reasoner",
                 "--no-progress", "--no-report"]) == 0
    assert "report:" not in capsys.readouterr().out
    assert not (tmp_path / "report.html").exists()  # the previous demo's page is not left behind


def test_default_model_prefers_the_users_checkpoint(monkeypatch, tmp_path):
    from dpc_lens.testbed import default_model
    from dpc_lens.testing import save_tiny_hf_model

    d = save_tiny_hf_model("gpt2", tmp_path / "m", d_model=48)
    monkeypatch.setenv("DPC_LENS_MODEL", str(d))
    monkeypatch.delenv("DPC_LENS_SOFT_PROMPT", raising=False)
    model, soft = default_model()
    assert model.cfg.d_model == 48  # the user's model, not the shipped 128-wide reasoner
    assert soft.n_tokens == 8 and soft.d_model == 48  # vocabulary-initialised, no shipped adapter
    model2, none = default_model(with_soft_prompt=False)
    assert none is None and model2.cfg.d_model == 48
    monkeypatch.delenv("DPC_LENS_MODEL")
    shipped, shipped_soft = default_model()
    assert shipped.cfg.d_model == 128 and shipped_soft.n_tokens == 16
