"""Every command's ``testbed`` shorthand names the shipped file that ``--help`` and
``dpc-lens paths`` say it names (``--data testbed``: the test set, the dev set for ``calibrate``;
``--dev testbed``: the dev set; ``--model``, ``--soft-prompt``, ``--config``), and ``dpc-lens iap
--data testbed --dev testbed`` runs end to end on the shipped reasoner."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from dpc_lens import cli
from dpc_lens.iap.diagnostics import IAPScoreWarning
from dpc_lens.tasks import get_task, load_examples
from dpc_lens.testbed import data_dir

DATA = data_dir()


def _ids(path):
    return [e.id for e in load_examples(path, get_task("arith"))]


def _args(*argv):
    args = cli.build_parser().parse_args(list(argv))
    return args


@pytest.mark.parametrize("command, extra, expected", [
    ("dpc", ["--soft-prompt", "testbed", "--out", "x"], "test.jsonl"),
    ("calibrate", ["--soft-prompt", "testbed", "--out", "x"], "dev.jsonl"),
    ("iap", ["--out", "x"], "test.jsonl"),
    ("train-prompt", ["--out", "x"], "test.jsonl"),
])
def test_data_testbed_names_the_shipped_split(command, extra, expected):
    args = _args(command, "--model", "testbed", "--data", "testbed", "--task", "arith", *extra)
    _, exs = cli._examples(args)
    assert [e.id for e in exs] == _ids(os.path.join(DATA, expected))


@pytest.mark.parametrize("command", ["iap", "train-prompt"])
def test_dev_testbed_is_the_shipped_dev_set(command):
    args = _args(command, "--model", "testbed", "--data", "testbed", "--dev", "testbed", "--task", "arith",
                 "--out", "x")
    _, dev = cli._examples(args, args.dev)
    assert [e.id for e in dev] == _ids(os.path.join(DATA, "dev.jsonl"))
    assert _ids(os.path.join(DATA, "dev.jsonl")) != _ids(os.path.join(DATA, "test.jsonl"))


def test_model_soft_prompt_and_config_testbed_name_the_shipped_files():
    assert cli._testbed("testbed", "model") == os.path.join(DATA, "reasoner")
    assert cli._testbed("testbed", "soft_prompt") == os.path.join(DATA, "soft_prompt")
    assert cli._testbed("testbed", "config") == os.path.join(DATA, "dpc_config.json")
    assert cli._testbed("my/dir", "model") == "my/dir"  # anything else is a path, unchanged


def test_iap_runs_on_the_shipped_test_and_dev_sets(tmp_path, capsys):
    out = tmp_path / "iap"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(["iap", "--model", "testbed", "--data", "testbed", "--dev", "testbed",
                       "--task", "arith", "--limit", "3", "--dev-limit", "3",
                       "--prompts", str(_pool(tmp_path)), "--out", str(out), "--no-progress"])
    assert rc == 0
    # the CLI prints the score warnings as lines instead of also raising them as Python warnings
    assert not [w for w in caught if w.category is IAPScoreWarning]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_questions"] == 3 and summary["dev"]["n_questions"] == 3
    for key in ("score_diagnostics", "degenerate", "paired_differences", "reference_prompts", "warnings"):
        assert key in summary
    dev_ids = [json.loads(line)["id"] for line in (out / "dev" / "pairs.jsonl").read_text().splitlines()]
    assert dev_ids[::2] == _ids(os.path.join(DATA, "dev.jsonl"))[:3]
    printed = capsys.readouterr().out
    assert "dev calibration (3 questions)" in printed and "vs first prompt [95% CI]" in printed
    for line in summary["warnings"]:
        assert f"warning: {line}" in printed


def _pool(tmp_path):
    p = tmp_path / "pool.txt"
    p.write_text("Let's think step by step.\nAnswer:\n", encoding="utf-8")
    return p
