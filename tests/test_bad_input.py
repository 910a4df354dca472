"""Every bad or unusual input gets a clear dpc_lens error (what was wrong, what was expected, how
to fix it), never a traceback from deep inside or a silent wrong result (issue 13).

CLI cases go through ``dpc_lens.cli.main([...])``: exit code 2 and one stderr line naming the
error class, the problem and the fix. API cases assert the error class and the message.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dpc_lens.errors import ConfigError, DataError, InputError, RunError


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """A tiny Llama with the arith tokenizer (n_ctx 256), a 4-token adapter and 5 arith questions."""
    from conftest import make_arith_bed

    return make_arith_bed(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def model(bed):
    from dpc_lens.model import load_model

    return load_model(str(bed[1]), device="cpu")


def cli(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``main(argv)``."""
    from dpc_lens.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def dpc_argv(bed, out, *extra, data=None, task="arith"):
    root, model_dir, adapter, d = bed
    return ["dpc", "--model", model_dir, "--soft-prompt", adapter, "--data", data or d, "--task", task,
            "--out", out, "--max-new-tokens", "6", "--no-progress", "--baselines", "", *extra]


def cli_error(argv, capsys, cls):
    rc, out, err = cli(argv, capsys)
    assert rc == 2, (out, err)
    assert f": {cls.__name__}: " in err, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------- silent results


def test_empty_data_set_is_an_error(bed, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = cli_error(dpc_argv(bed, tmp_path / "o", data=empty), capsys, DataError)
    assert "empty" in err and "at least one question" in err
    assert not (tmp_path / "o" / "records.jsonl").exists()


def test_empty_example_list_is_an_error_in_the_api(model, bed):
    from dpc_lens.dpc import run_dpc
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task

    with pytest.raises(DataError, match="empty"):
        run_dpc(model, SoftPrompt.from_peft(bed[2]), [], get_task("arith"), progress=False)


def test_gsm8k_file_with_task_arith_is_refused_naming_the_task_it_looks_like(bed, tmp_path, capsys):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Ann has 7 pens and buys 5. How many?",
                               "answer": "7+5=<<7+5=12>>12\n#### 12"}) + "\n")
    err = cli_error(dpc_argv(bed, tmp_path / "o", data=gsm), capsys, DataError)
    assert "not a plain number" in err and "--task gsm8k" in err and "Fields present: answer, question" in err
    # and the other way round: an arith file read as gsm8k
    err = cli_error(dpc_argv(bed, tmp_path / "o2", task="gsm8k"), capsys, DataError)
    assert "####" in err


def test_a_math_file_with_task_gsm8k_names_math(tmp_path):
    from dpc_lens.tasks import load_examples

    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"problem": "1+1?", "solution": "\\boxed{2}"}) + "\n")
    with pytest.raises(DataError, match="--task math"):
        load_examples(f, "gsm8k")


@pytest.mark.parametrize("extra", [["--limit", "0"], ["--limit", "-1"], ["--max-new-tokens", "0"],
                                   ["--random-draws", "0"]])
def test_zero_or_negative_counts_are_refused(bed, tmp_path, capsys, extra):
    argv = dpc_argv(bed, tmp_path / "o")
    i = argv.index("--max-new-tokens")
    argv = argv[:i] + argv[i + 2:] + extra
    err = cli_error(argv, capsys, InputError)
    assert extra[0] in err and ">= 1" in err and "Leave" in err


@pytest.mark.parametrize("extra", [["--batch-size", "0"], ["--dev-limit", "0"]])
def test_iap_zero_counts_are_refused(bed, tmp_path, capsys, extra):
    root, model_dir, adapter, data = bed
    err = cli_error(["iap", "--model", model_dir, "--data", data, "--task", "arith", "--out", tmp_path / "o",
                     "--dev", data, *extra], capsys, InputError)
    assert extra[0] in err and ">= 1" in err


def test_demo_limit_zero_is_refused(tmp_path, capsys):
    err = cli_error(["demo", "--out", tmp_path / "d", "--limit", "0"], capsys, InputError)
    assert "--limit" in err and ">= 1" in err


def test_top_k_larger_than_the_soft_prompt_is_refused_before_the_run(bed, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"detector": {"top_k": 1000}}))
    err = cli_error(dpc_argv(bed, tmp_path / "o", "--config", cfg), capsys, ConfigError)
    assert "top_k=1000" in err and "4 tokens" in err and "at most 4" in err
    assert not (tmp_path / "o" / "records.jsonl").exists()


def test_a_swallowed_trigger_failure_is_counted_in_the_summary(model, bed, monkeypatch):
    import dpc_lens.dpc.pipeline as dpc_mod
    from dpc_lens.dpc import DPCConfig, run_dpc
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples

    def broken(inputs, cfg):
        raise InputError("every counted soft column is exactly zero")

    monkeypatch.setattr(dpc_mod, "dynamic_trigger", broken)
    task = get_task("arith")
    exs = load_examples(bed[3], task)[:3]
    cfg = DPCConfig(generation=GenerationConfig(max_new_tokens=6), baselines=())
    recs, summary = run_dpc(model, SoftPrompt.from_peft(bed[2]), exs, task, cfg, progress=False)
    scored = [r for r in recs if r["pt"]["rationale"]]
    assert all(r["trigger_error"] == "every counted soft column is exactly zero" for r in scored)
    assert summary["trigger_errors"]["n"] == len(scored) > 0


def test_demo_refuses_to_overwrite_a_finished_dpc_run(bed, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(dpc_argv(bed, out, "--limit", "2"), capsys)
    assert rc == 0, err
    before = (out / "records.jsonl").read_text()
    err = cli_error(["demo", "--out", out, "--limit", "1", "--no-progress"], capsys, RunError)
    assert "records.jsonl" in err and "another --out" in err
    assert (out / "records.jsonl").read_text() == before


def test_calibrate_remarks_when_the_dev_split_is_too_small(bed, tmp_path, capsys):
    root, model_dir, adapter, data = bed
    rc, out, err = cli(["calibrate", "--model", model_dir, "--soft-prompt", adapter, "--data", data,
                        "--task", "arith", "--out", tmp_path / "cal", "--max-new-tokens", "6", "--limit", "3",
                        "--no-progress"], capsys)
    assert rc == 0, err
    assert "remark: Only 3 dev examples" in out and "not separable" in out
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert any("Only 3 dev examples" in r for r in saved["remarks"])
    # the same calibration again: refused without --resume, reused with it
    err = cli_error(["calibrate", "--model", model_dir, "--soft-prompt", adapter, "--data", data, "--task",
                     "arith", "--out", tmp_path / "cal", "--max-new-tokens", "6", "--limit", "3",
                     "--no-progress"], capsys, InputError)
    assert "--resume" in err and "resume=True" not in err
    rc, out2, err = cli(["calibrate", "--model", model_dir, "--soft-prompt", adapter, "--data", data,
                         "--task", "arith", "--out", tmp_path / "cal", "--max-new-tokens", "6",
                         "--limit", "3",
                         "--no-progress", "--resume"], capsys)
    assert rc == 0, err
    again = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert again["n_generations"]["pt"] == 0 and again["n_generations"]["reused"] >= 3
    assert again["best_point"] == saved["best_point"] and again["points"] == saved["points"]


def test_calibration_remarks_a_point_that_never_fires():
    from dpc_lens.dpc import DPCConfig
    from dpc_lens.dpc.calibration import CalibrationGrid, DPCCalibration

    cal = DPCCalibration(DPCConfig(), {}, 0.5, 0.5, 0.6, 0.0, 200, 0, ({},), (0.5,), (0.0,), (0,), (0,), {},
                         {"pt": 1}, CalibrationGrid())
    assert any("never fires" in r for r in cal.remarks)


def test_aqua_option_matching_is_exact_or_nothing():
    from dpc_lens.tasks.aqua import AquaTask

    t = AquaTask()
    opts = {"A": "4 and 2", "B": "6", "C": "5 and 1", "D": "7", "E": "8"}
    assert t.extract_answer("so ... The answer is 5. 5", options=opts) is None  # not C
    assert t.extract_answer("The answer is 6.", options=opts) == "B"
    assert t.extract_answer("The answer is 12.", options={"A": "12 km/hr", "B": "13 km/hr"}) == "A"
    assert t.extract_answer("The answer is 3.", options={"A": "3", "B": "3.0"}) is None  # ambiguous


# ---------------------------------------------------------------------------------- tracebacks


def test_device_cuda_without_cuda_and_a_bad_device_name(bed, tmp_path, capsys):
    from dpc_lens.model import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the cuda case is only an error without one
    err = cli_error(dpc_argv(bed, tmp_path / "o", "--device", "cuda"), capsys, InputError)
    assert "no usable CUDA" in err and "--device cpu" in err
    with pytest.raises(InputError, match="not a device name.*Expected cpu, cuda"):
        load_model(str(bed[1]), device="banana")


def test_bad_device_name_through_the_cli(bed, tmp_path, capsys):
    err = cli_error(dpc_argv(bed, tmp_path / "o", "--device", "gpu0"), capsys, InputError)
    assert "--device gpu0 is not a device name" in err and "cpu, cuda" in err


def test_load_model_given_a_number():
    from dpc_lens.model import load_model

    with pytest.raises(InputError, match="got int 123.*load_model\\('path/to/model'\\)"):
        load_model(123)


def _adapter_dir(tmp_path, bed, name):
    import shutil

    d = tmp_path / name
    shutil.copytree(bed[2], d)
    os.remove(d / "adapter_model.safetensors")
    return d


def test_garbage_and_truncated_safetensors(bed, tmp_path):
    from dpc_lens.soft_prompt import SoftPrompt

    d = _adapter_dir(tmp_path, bed, "garbage")
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="not a readable safetensors file.*save_peft"):
        SoftPrompt.from_peft(d)
    d2 = _adapter_dir(tmp_path, bed, "truncated")
    full = (bed[2] / "adapter_model.safetensors").read_bytes()
    (d2 / "adapter_model.safetensors").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="truncated"):
        SoftPrompt.from_peft(d2)


def test_bin_with_a_bare_tensor(bed, tmp_path):
    from dpc_lens.soft_prompt import SoftPrompt

    d = _adapter_dir(tmp_path, bed, "bare")
    torch.save(torch.zeros(4, 32), d / "adapter_model.bin")
    with pytest.raises(DataError, match="are a Tensor, not a mapping.*prompt_embeddings.*save_peft"):
        SoftPrompt.from_peft(d)


class Payload:  # an arbitrary object: weights_only=True refuses to unpickle it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_a_pickle_is_refused_without_advising_to_switch_protection_off(bed, tmp_path, capsys):
    from dpc_lens.soft_prompt import SoftPrompt

    d = _adapter_dir(tmp_path, bed, "pickle")
    torch.save({"prompt_embeddings": torch.zeros(4, 32), "x": Payload()}, d / "adapter_model.bin")
    with pytest.raises(DataError) as e:
        SoftPrompt.from_peft(d)
    msg = str(e.value)
    assert "non-tensor Python objects" in msg and "safetensors" in msg and "weights_only=False" not in msg
    assert "this must never run" not in capsys.readouterr().out
    err = cli_error(dpc_argv(bed, tmp_path / "o")[:4] + [d] + dpc_argv(bed, tmp_path / "o")[5:], capsys,
                    DataError)
    assert "non-tensor" in err and "weights_only=False" not in err


@pytest.mark.parametrize("kind", ["file", "under_file", "unwritable"])
@pytest.mark.parametrize("command", ["dpc", "calibrate"])
def test_bad_out_is_refused_before_any_work(bed, tmp_path, capsys, kind, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = {"file": afile, "under_file": afile / "sub", "unwritable": "/proc/dpc_lens_cannot_write"}[kind]
    argv = dpc_argv(bed, out)
    argv[argv.index("--model") + 1] = tmp_path / "no-model-here"  # the model would fail: --out first
    if command == "calibrate":
        argv = ["calibrate"] + argv[1:argv.index("--baselines")] + ["--no-progress"]
    err = cli_error(argv, capsys, RunError)
    assert str(out) in err
    assert {"file": "is an existing file", "under_file": "which is a file",
            "unwritable": "cannot be written"}[kind] in err


def test_task_and_data_are_checked_before_the_model_loads(bed, tmp_path, capsys):
    argv = dpc_argv(bed, tmp_path / "o", task="gsm9k")
    argv[argv.index("--model") + 1] = tmp_path / "no-model-here"
    err = cli_error(argv, capsys, ConfigError)
    assert "unknown task 'gsm9k'" in err and "gsm8k" in err
    argv = dpc_argv(bed, tmp_path / "o", data=tmp_path / "missing.jsonl")
    argv[argv.index("--model") + 1] = tmp_path / "no-model-here"
    err = cli_error(argv, capsys, DataError)
    assert "missing.jsonl" in err and "no-model-here" not in err


def test_compute_saliency_given_a_string_or_a_dict(model):
    from dpc_lens.saliency import compute_saliency

    # (text is an input since issue 18: the one-segment batch, tested in test_compose.py)
    for bad in ({"question": "x"}, 3.5):
        with pytest.raises(InputError, match="needs a PromptBatch.*PromptBatch.from_pieces"):
            compute_saliency(model, bad)


def test_malformed_pieces(model):
    from dpc_lens.model import as_adapter
    from dpc_lens.segments import PromptBatch, encode_pieces

    tok = as_adapter(model).tokenizer
    with pytest.raises(InputError, match="Piece 'bos' is a int.*\\[1\\]"):
        encode_pieces(tok, [("bos", 1), ("question", "how many")])
    with pytest.raises(InputError, match="outer list"):
        PromptBatch.from_pieces(as_adapter(model), [("bos", [1]), ("question", "how many")])


def test_token_id_outside_the_vocabulary(model):
    from dpc_lens.model import as_adapter
    from dpc_lens.segments import PromptBatch

    with pytest.raises(InputError, match="outside the model's vocabulary.*same tokenizer"):
        PromptBatch.from_pieces(as_adapter(model), [[("question", [1, 2, 10**6])]])


def test_saliency_save_under_a_file(model, tmp_path):
    from dpc_lens.model import as_adapter
    from dpc_lens.saliency import SaliencyConfig, compute_saliency
    from dpc_lens.segments import PromptBatch

    batch = PromptBatch.from_pieces(as_adapter(model), [[("question", [5, 6, 7]), ("rationale", [8, 9])]])
    res = compute_saliency(model, batch, SaliencyConfig(loss_segments=("rationale",)))
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunError, match="which is a file"):
        res.save(tmp_path / "f" / "sal")


# ---------------------------------------------------------------------------------- runs


def test_over_long_question_is_skipped_with_a_record_and_counted(model, bed, tmp_path):
    from dataclasses import replace

    from dpc_lens.dpc import DPCConfig, read_records, run_dpc
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples

    task = get_task("arith")
    exs = load_examples(bed[3], task)[:3]
    exs[1] = replace(exs[1], question=" ".join(["5"] * 300))
    cfg = DPCConfig(generation=GenerationConfig(max_new_tokens=6), baselines=())
    recs, summary = run_dpc(model, SoftPrompt.from_peft(bed[2]), exs, task, cfg, out_dir=tmp_path / "o",
                            progress=False)
    assert [r["id"] for r in recs] == [e.id for e in exs]
    assert "n_ctx=256" in recs[1]["skipped"] and "pt" not in recs[1]
    assert summary["skipped"]["n"] == 1 and summary["skipped"]["ids"] == [exs[1].id] and summary["n"] == 2
    assert len(read_records(tmp_path / "o" / "records.jsonl")) == 3


def test_corrupt_middle_line_resume_moves_it_aside_and_redoes_it(bed, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(dpc_argv(bed, out), capsys)
    assert rc == 0, err
    path = out / "records.jsonl"
    full = path.read_text().splitlines()
    path.write_text("\n".join([full[0], '{"id": "broken', *full[2:]]) + "\n")
    from dpc_lens.dpc import read_records

    with pytest.raises(DataError, match="line 2 is not valid JSON.*--resume.*rejected"):
        read_records(path)
    rc, printed, err = cli(dpc_argv(bed, out, "--resume"), capsys)
    assert rc == 0, err
    assert "moved 1 corrupt line(s) (line 2)" in err
    rejected = [json.loads(x) for x in (out / "records.jsonl.rejected").read_text().splitlines()]
    assert rejected == [{"line": 2, "text": '{"id": "broken'}]
    again = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in again] == [json.loads(x)["id"] for x in full]


def test_readers_count_a_duplicated_id_once(tmp_path):
    from dpc_lens.dpc import read_records, summarize

    rec = {"id": "a", "pt": {"correct": True}, "dpc": {"correct": True, "fired": False}}
    other = {"id": "b", "pt": {"correct": False}, "dpc": {"correct": False, "fired": False}}
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rec, other, rec)))
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    s = summarize([rec, other, rec])
    assert s["n"] == 2 and s["accuracy"]["pt"] == 0.5 and s["duplicates_dropped"] == 1


# ---------------------------------------------------------------------------------- the CLI


def test_help_shows_every_default_and_the_files_each_command_writes(capsys):
    import argparse

    from dpc_lens.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.dest == "help":
                continue
            assert a.help, f"{name} {a.option_strings} has no help text"
            if not a.required:
                assert "default" in a.help, f"{name} {a.option_strings}: help does not say its default"
        if name != "paths":
            assert "files written into --out" in (p.epilog or ""), name
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "``" not in top and ":class:" not in top and "paths" in top
    assert main(["dpc", "--help"]) == 0
    text = capsys.readouterr().out
    assert "built-in 64" in text and "records.jsonl" in text and "base,always,random" in text


def test_dpc_without_config_says_which_config_and_paths_prints_the_testbed(bed, tmp_path, capsys):
    rc, out, err = cli(dpc_argv(bed, tmp_path / "o", "--limit", "1"), capsys)
    assert rc == 0, err
    assert "detector config: built-in DPCConfig defaults" in err and "--config testbed" in err
    rc, out, _ = cli(["paths"], capsys)
    assert rc == 0
    assert "reasoner" in out and "soft_prompt" in out and "dpc_config.json" in out
    assert "--model testbed" in out


def test_demo_explains_its_rows():
    from dpc_lens.testbed.demo import explain_summary

    s = {"n": 10, "accuracy": {"base": 0.5, "pt": 0.6, "dpc": 0.7, "random": 0.55, "oracle": 0.8},
         "random_draws": {"n": 5, "std": 0.02}, "trigger_rate": 0.2, "ceiling": 1}
    text = "\n".join(explain_summary(s, model="M", config="C"))
    for word in ("base", "pt", "dpc", "random", "oracle", "mean of 5", "ceiling", "flips", "model: M",
                 "DPC config: C", "DPC beat PT (70.0% vs 60.0%, +10.0 points"):
        assert word in text
    s["accuracy"]["dpc"] = 0.5
    assert "DPC did not beat PT" in "\n".join(explain_summary(s, model="M", config="C"))
