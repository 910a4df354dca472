"""``dpc-lens flows`` (issue 20): the tidy table against ``compute_saliency``, pair counts by
hand, the bad inputs, resume and ``--help``. Runs on the shipped 0.62 M reasoner with its soft
prompt (a few seconds)."""

from __future__ import annotations

import html
import json
import os
import re

import pandas as pd
import pytest
import torch

from dpc_lens.cli import main

PROMPTS = [
    [["question", " a cart holds 4 books . a reader brings back 5 books ."],
     ["rationale", " 4 + 5 = 9 . the answer is 9 ."]],
    [["question", " ann has 7 pens . she buys 5 more ."], ["rationale", " 7 + 5 = 12 ."],
     ["answer", " 12"]],
]
KEY = ["layer", "example", "source", "target"]


def _write(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("flows")
    prompts = _write(d / "prompts.jsonl", PROMPTS)
    out = d / "out"
    assert main(["flows", "--model", "testbed", "--soft-prompt", "testbed", "--prompts", prompts,
                 "--out", str(out), "--no-progress"]) == 0
    return d, out


def _reference():
    from dpc_lens.model import as_adapter, load_model
    from dpc_lens.saliency import SaliencyConfig, compute_saliency
    from dpc_lens.segments import PromptBatch
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.testbed import shipped_path

    model = load_model(shipped_path("testbed", "model"))
    soft = SoftPrompt.from_peft(shipped_path("testbed", "soft_prompt"))
    tok = as_adapter(model).tokenizer
    examples = [[("bos", [tok.bos_token_id])] + [tuple(p) for p in ex] for ex in PROMPTS]
    batch = PromptBatch.from_pieces(model, examples, soft)
    cfg = SaliencyConfig(loss_segments=("rationale", "answer"))
    return compute_saliency(model, batch, cfg), tok


def test_table_round_trips_against_compute_saliency(run):
    d, out = run
    res, tok = _reference()
    ref = res.to_dataframe().drop(columns=["flow"]).sort_values(KEY).reset_index(drop=True)
    for name, read in (("flows.parquet", pd.read_parquet), ("flows.csv", pd.read_csv)):
        got = read(out / name)
        assert list(got.columns) == ["layer", "example", "source", "target", "sum", "count", "mean"]
        got = got.sort_values(KEY).reset_index(drop=True)
        assert got[KEY].values.tolist() == ref[KEY].values.tolist()
        for c in ("sum", "count", "mean"):
            assert got[c].to_numpy() == pytest.approx(ref[c].to_numpy(), rel=1e-6, abs=1e-12), (name, c)
    # counts by hand: pairs (i in target, j in source, j < i), the diagonal left out
    got = pd.read_parquet(out / "flows.parquet")
    n = [{"soft": 16, "bos": 1, **{s: len(tok(t, add_special_tokens=False)["input_ids"]) for s, t in ex}}
         for ex in PROMPTS]
    order = ["soft", "bos", "question", "rationale", "answer"]
    for _, row in got.iterrows():
        ns, nt = n[row["example"]][row["source"]], n[row["example"]][row["target"]]
        want = ns * (ns - 1) / 2 if row["source"] == row["target"] else ns * nt
        assert order.index(row["source"]) <= order.index(row["target"])  # only causal pairs listed
        assert row["count"] == want
        assert row["mean"] == pytest.approx(row["sum"] / row["count"], rel=1e-12)
    assert sorted(got["layer"].unique()) == [0, 1, 2, 3]
    assert os.path.getsize(out / "flow_curves.png") > 1000
    page = (out / "tokens.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", "", page)).replace("\u200b", "")
    assert "the answer is 9" in text and page.count('class="toks"') == 2


def test_resume_refuses_to_overwrite_and_continues(run, capsys):
    d, out = run
    prompts = str(d / "prompts.jsonl")
    before = pd.read_parquet(out / "flows.parquet")
    assert main(["flows", "--model", "testbed", "--soft-prompt", "testbed", "--prompts", prompts,
                 "--out", str(out), "--no-progress"]) == 2
    assert "already exists. Pass --resume" in capsys.readouterr().err
    lines = (out / "flows.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "flows.jsonl").write_text(lines[0] + "\n", encoding="utf-8")  # as if killed after one
    assert main(["flows", "--model", "testbed", "--soft-prompt", "testbed", "--prompts", prompts,
                 "--out", str(out), "--resume", "--no-progress"]) == 0
    after = pd.read_parquet(out / "flows.parquet")
    assert after[KEY].values.tolist() == before[KEY].values.tolist()
    assert after["sum"].to_numpy() == pytest.approx(before["sum"].to_numpy(), rel=1e-5)
    # other settings: refused, naming what differs
    assert main(["flows", "--model", "testbed", "--soft-prompt", "testbed", "--prompts", prompts,
                 "--out", str(out), "--resume", "--layers", "deep", "--no-progress"]) == 2
    assert "differs in ['layers']" in capsys.readouterr().err


def test_layers_and_per_head(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", PROMPTS[:1])
    assert main(["flows", "--model", "testbed", "--prompts", prompts, "--out", str(tmp_path / "o"),
                 "--layers", "deep", "--per-head", "--no-progress"]) == 0
    got = pd.read_parquet(tmp_path / "o" / "flows.parquet")
    assert list(got.columns) == ["layer", "example", "head", "source", "target", "sum", "count", "mean"]
    assert sorted(got["layer"].unique()) == [3]  # "deep" of 4 layers: the last third
    assert sorted(got["head"].unique()) == [0, 1, 2, 3]
    assert "soft" not in set(got["source"])  # no --soft-prompt, no soft segment


@pytest.mark.parametrize("line, words", [
    ("not json", ["line 2 is not JSON"]),
    ('{"question": "x"}', ["line 2 is a dict", "[name, text]"]),
    ('[["question"]]', ["line 2, piece 0", "expected [name, text]"]),
    ('[["question", "a"], ["question", "b"]]', ["line 2 names the segment 'question' twice"]),
    ('[["question", 3]]', ["line 2, piece 0"]),
])
def test_malformed_lines_are_refused_before_any_work(tmp_path, capsys, line, words):
    prompts = _write(tmp_path / "p.jsonl", [PROMPTS[0], line])
    out = tmp_path / "out"
    assert main(["flows", "--model", "testbed", "--prompts", prompts, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert not out.exists() or not os.listdir(out)


def test_unknown_loss_segment_is_refused_with_a_suggestion(tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    assert main(["flows", "--model", "testbed", "--prompts", prompts, "--out", str(out),
                 "--loss-segments", "answr"]) == 2
    err = capsys.readouterr().err
    assert "'answr'" in err and "did you mean 'answer'" in err
    assert "['question', 'rationale', 'answer']" in err
    assert not os.listdir(out)
    assert main(["flows", "--model", "testbed", "--prompts", prompts, "--out", str(out),
                 "--loss-segments", "answer"]) == 2  # the first prompt has no answer
    assert "prompts [0] (0-based lines) have none of the loss segments ['answer']" in capsys.readouterr().err
    assert not os.listdir(out)


def test_soft_prompt_for_another_model_is_refused(tmp_path, capsys):
    from dpc_lens.soft_prompt import SoftPrompt

    other = SoftPrompt(torch.randn(4, 64))  # the reasoner is 128 wide
    adapter = other.save_peft(str(tmp_path / "adapter"), base_model_name_or_path="other-model")
    prompts = _write(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    assert main(["flows", "--model", "testbed", "--prompts", prompts, "--out", str(out),
                 "--soft-prompt", adapter]) == 2
    err = capsys.readouterr().err
    assert "InputError" in err and "64" in err and "128" in err
    assert not os.listdir(out)


def test_help_shows_the_defaults(capsys):
    assert main(["flows", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for want in ("(default: all)", "(default: 8)", "(default: rationale,answer, those the prompts have)",
                 "(default: none)", "(default: off)", "layer, example, source, target, sum, count, mean",
                 "--device", "--resume"):
        assert want in text, want


def test_a_locked_out_dir_is_refused(tmp_path, capsys):
    import socket

    prompts = _write(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    out.mkdir()
    lock = {"pid": 1, "host": socket.gethostname(), "started": 0, "command": "dpc"}  # pid 1 lives
    (out / ".dpc_lens.lock").write_text(json.dumps(lock), encoding="utf-8")
    assert main(["flows", "--model", "testbed", "--prompts", prompts, "--out", str(out)]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".dpc_lens.lock"]  # nothing written, the lock left alone
