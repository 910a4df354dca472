"""The public API is light to import and complete; the CLI runs DPC end to end via main([...])."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_import_is_light_and_every_export_resolves():
    code = (
        "import sys, dpc_lens\n"
        "assert 'torch' not in sys.modules, 'dpc_lens imports torch at import time'\n"
        "names = [n for n in dpc_lens.__all__ if n != '__version__']\n"
        "missing = [n for n in names if getattr(dpc_lens, n, None) is None]\n"
        "assert not missing, missing\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 40


@pytest.fixture(scope="module")
def arith_setup(tmp_path_factory):
    from conftest import make_arith_bed

    return make_arith_bed(tmp_path_factory.mktemp("cli"))


def test_cli_dpc_writes_records_summary_config_and_resumes(arith_setup, capsys):
    from dpc_lens.cli import main

    root, model_dir, adapter_dir, data = arith_setup
    out = root / "run"
    argv = ["dpc", "--model", str(model_dir), "--soft-prompt", str(adapter_dir), "--data", str(data),
            "--task", "arith", "--out", str(out), "--max-new-tokens", "8", "--no-progress",
            "--baselines", "base"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pt" in printed and "dpc" in printed and "trigger rate" in printed
    recs = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5
    assert summary["accuracy"]["pt"] == sum(r["pt"]["correct"] for r in recs) / 5
    assert json.loads((out / "config.json").read_text())["baselines"] == ["base"]
    # a second run without --resume refuses; with --resume it adds nothing and loses nothing
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    again = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in again] == [r["id"] for r in recs]


def test_cli_reports_missing_files_clearly(arith_setup, capsys):
    from dpc_lens.cli import main

    root, model_dir, adapter_dir, data = arith_setup
    rc = main(["dpc", "--model", str(model_dir), "--soft-prompt", str(root / "nope"), "--data", str(data),
               "--task", "arith", "--out", str(root / "x"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope" in err


def test_cli_calibrate_writes_a_config_dpc_accepts(arith_setup, capsys):
    from dpc_lens.cli import main
    from dpc_lens.dpc import DPCConfig

    root, model_dir, adapter_dir, data = arith_setup
    out = root / "cal"
    rc = main(["calibrate", "--model", str(model_dir), "--soft-prompt", str(adapter_dir), "--data", str(data),
               "--task", "arith", "--out", str(out), "--max-new-tokens", "6", "--limit", "3",
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "best_accuracy" in printed and "n_generations" in printed
    cfg = DPCConfig.load(out / "dpc_config.json")
    assert cfg.generation.max_new_tokens == 6
    run = root / "run_cal"
    assert main(["dpc", "--model", str(model_dir), "--soft-prompt", str(adapter_dir), "--data", str(data),
                 "--task", "arith", "--out", str(run), "--config", str(out / "dpc_config.json"),
                 "--baselines", "", "--no-progress", "--limit", "3"]) == 0
    assert (run / "records.jsonl").read_text().count("\n") == 3


def test_load_model_errors_say_where_and_how_to_fix(monkeypatch, tmp_path):
    from dpc_lens import ModelError, load_model

    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="local directory"):
        load_model("nobody-xyz/not-a-model-123")
