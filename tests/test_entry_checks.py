"""Issue 18, items 5 and 6: every entry point checks what it is given before any model work, and
says so in dpc_lens's words (Python words to Python callers, CLI words to the CLI); long work is
quiet in logs and readable at scale.

* a task name is resolved (or refused) before generation, by one resolver;
* a device is checked in one place (``load_model``, ``SoftPrompt.to``, ``SoftPrompt.from_peft``);
* a config given as a dict goes through its ``from_dict`` (with "did you mean");
* ``analyse(model, None, ...)`` says DPC needs a soft prompt;
* a model directory whose ``pytorch_model.bin`` is a malicious pickle is refused;
* a run where no question can fit, or nothing was evaluated, fails loudly;
* progress bars are off in logs by default, layer axes stay readable, adapters are portable.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from dpc_lens.errors import ConfigError, DataError, InputError, ModelError


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """A tiny Llama with the arith tokenizer (n_ctx 256), a 4-token adapter and 5 arith questions."""
    from conftest import make_arith_bed

    return make_arith_bed(tmp_path_factory.mktemp("entry"))


@pytest.fixture(scope="module")
def model(bed):
    from dpc_lens.model import load_model

    return load_model(str(bed[1]), device="cpu", progress=False)


def cli(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``main(argv)``."""
    from dpc_lens.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def dpc_argv(bed, out, *extra, model=None):
    root, model_dir, adapter, data = bed
    return ["dpc", "--model", model or model_dir, "--soft-prompt", adapter, "--data", data, "--task",
            "arith", "--out", out, "--max-new-tokens", "6", "--no-progress", "--baselines", "", *extra]


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda cases are errors only without CUDA")


# ------------------------------------------------------------------------------------ devices


@no_cuda
def test_soft_prompt_to_cuda_on_a_cpu_machine_is_a_dpc_lens_error_in_python_words(bed):
    from dpc_lens.soft_prompt import SoftPrompt

    soft = SoftPrompt.from_peft(bed[2])
    before = soft.embeddings.clone()
    with pytest.raises(InputError) as e:
        soft.to("cuda")
    msg = str(e.value)
    assert "device='cuda' asks for CUDA" in msg and "no usable CUDA GPU" in msg
    assert "device='cpu'" in msg and "--device" not in msg
    assert torch.equal(soft.embeddings, before) and soft.embeddings.device.type == "cpu"
    with pytest.raises(InputError, match=r"device='gpu0' is not a device name.*cpu, cuda, cuda:N or mps"):
        soft.to("gpu0")
    with pytest.raises(InputError, match=r"device=3\.5 is a float, not a device"):
        soft.to(3.5)
    assert soft.to("cpu", torch.float64).embeddings.dtype == torch.float64  # a good device still works


@no_cuda
def test_from_peft_with_a_missing_device_is_refused_before_reading(bed, tmp_path):
    from dpc_lens.soft_prompt import SoftPrompt

    with pytest.raises(InputError, match=r"device='cuda:0' asks for CUDA.*device='cpu'"):
        SoftPrompt.from_peft(bed[2], device="cuda:0")
    # checked first: even a directory that is not there gets the device error, not a file error
    with pytest.raises(InputError, match="device='banana' is not a device name"):
        SoftPrompt.from_peft(tmp_path / "nothing-here", device="banana")


@no_cuda
def test_load_model_speaks_python_and_the_cli_speaks_flags(bed, tmp_path, capsys):
    from dpc_lens.model import load_model

    with pytest.raises(InputError) as e:
        load_model(str(bed[1]), device="cuda")
    assert "device='cuda'" in str(e.value) and "device='cpu'" in str(e.value)
    assert "--device" not in str(e.value)
    with pytest.raises(InputError, match=r"device_map\['model.layers.0'\]='cuda:1' asks for CUDA"):
        load_model(str(bed[1]), device_map={"model.embed_tokens": "cpu", "model.layers.0": "cuda:1"})
    rc, _, err = cli(dpc_argv(bed, tmp_path / "o", "--device", "cuda"), capsys)
    assert rc == 2 and ": InputError: " in err
    assert "--device cuda asks for CUDA" in err and "Use --device cpu" in err
    assert "leave --device out" in err and "device='" not in err
    rc, _, err = cli(dpc_argv(bed, tmp_path / "o", "--device", "gpu0"), capsys)
    assert rc == 2 and "--device gpu0 is not a device name" in err and "device='" not in err


# ------------------------------------------------------------------------- malicious weights


class _Payload:
    """Unpickling this would create a directory: harmless, but detectable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def pickled_model_dir(bed, tmp_path):
    """The bed's model with its weights as a ``pytorch_model.bin`` that also holds a payload."""
    from safetensors.torch import load_file

    d = tmp_path / "pickled-model"
    shutil.copytree(bed[1], d)
    state = load_file(str(d / "model.safetensors"))
    os.remove(d / "model.safetensors")
    marker = tmp_path / "payload-ran"
    torch.save({**state, "extra": _Payload(marker)}, d / "pytorch_model.bin")
    assert not marker.exists()
    return d, marker


def test_a_malicious_pytorch_model_bin_is_refused_and_never_runs(pickled_model_dir, capsys):
    from dpc_lens.model import load_model

    d, marker = pickled_model_dir
    with pytest.raises(ModelError) as e:
        load_model(str(d), device="cpu", progress=False)
    msg = str(e.value)
    assert not marker.exists(), "the pickle's payload ran"
    assert msg.startswith(f"Refused to load {d / 'pytorch_model.bin'}")
    assert "can run arbitrary code" in msg and "safetensors" in msg
    assert "weights_only" not in msg and "Traceback" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # torch's advice is not chained


def test_the_cli_refuses_a_malicious_model_with_exit_2(bed, pickled_model_dir, tmp_path, capsys):
    d, marker = pickled_model_dir
    rc, out, err = cli(dpc_argv(bed, tmp_path / "o", model=d), capsys)
    assert rc == 2 and ": ModelError: Refused to load" in err and "safetensors" in err
    assert "weights_only" not in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "o" / "records.jsonl").exists()


def test_a_bare_pickle_error_elsewhere_is_not_mistaken_for_a_refusal():
    from dpc_lens.model import _refused_pickle

    assert _refused_pickle(OSError("disk full"), None) is None
    assert _refused_pickle(ValueError("bad config.json"), None) is None


# ------------------------------------------------------------------------------ progress bars


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def test_progress_rule(monkeypatch):
    from dpc_lens.progress import progress_on

    monkeypatch.setattr(sys, "stderr", _Stream(False))
    assert progress_on(None) is False
    assert progress_on(True) is True and progress_on(False) is False
    monkeypatch.setattr(sys, "stderr", _Stream(True))
    assert progress_on(None) is True and progress_on(False) is False
    with pytest.raises(InputError, match="progress='yes' is not allowed.*True.*False.*None"):
        progress_on("yes")


def test_generate_is_quiet_in_a_log_unless_forced(model, capsys):
    from dpc_lens.generation import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=2, batch_size=1)
    prompts = ["1 + 2 =", "3 + 4 =", "5 + 6 ="]
    capsys.readouterr()
    generate(model, prompts, None, cfg)  # default: stderr is captured here, not a terminal
    assert "generate" not in capsys.readouterr().err
    generate(model, prompts, None, cfg, progress=True)
    err = capsys.readouterr().err
    assert "generate:" in err and "/3" in err


def test_transformers_loading_bars_follow_dpc_lens_progress(bed, capsys):
    from transformers.utils import logging as hf_logging

    from dpc_lens.model import load_model

    was = hf_logging.is_progress_bar_enabled()
    capsys.readouterr()
    load_model(str(bed[1]), device="cpu", progress=False)
    assert "Loading weights" not in capsys.readouterr().err
    load_model(str(bed[1]), device="cpu")  # None: stderr is not a terminal under capsys
    assert "Loading weights" not in capsys.readouterr().err
    load_model(str(bed[1]), device="cpu", progress=True)
    assert "Loading weights" in capsys.readouterr().err  # the check above can fail
    assert hf_logging.is_progress_bar_enabled() == was  # transformers' own switch restored


# ------------------------------------------------------------------- no model work on bad input


@pytest.fixture
def no_model_work(monkeypatch):
    """Counts generation batches and saliency passes; a test asserts none ran."""
    import dpc_lens.generation as generation
    import dpc_lens.saliency as saliency

    calls = {"generate": 0, "saliency": 0}
    real_gen, real_sal = generation._generate_batch, saliency.compute_saliency

    def gen(*a, **k):
        calls["generate"] += 1
        return real_gen(*a, **k)

    def sal(*a, **k):
        calls["saliency"] += 1
        return real_sal(*a, **k)

    monkeypatch.setattr(generation, "_generate_batch", gen)
    monkeypatch.setattr(saliency, "compute_saliency", sal)
    return calls


def _examples(bed, n=2):
    from dpc_lens.tasks import load_examples

    return load_examples(bed[3], "arith")[:n]


def _soft(bed):
    from dpc_lens.soft_prompt import SoftPrompt

    return SoftPrompt.from_peft(bed[2])


def test_run_dpc_takes_a_task_name_like_evaluate_accuracy(model, bed, no_model_work):
    from dpc_lens.dpc import DPCConfig, run_dpc
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.tasks import get_task

    cfg = DPCConfig(generation=GenerationConfig(max_new_tokens=4), baselines=())
    exs = _examples(bed)
    by_name = run_dpc(model, _soft(bed), exs, "arith", cfg, progress=False)[0]
    by_object = run_dpc(model, _soft(bed), exs, get_task("arith"), cfg, progress=False)[0]
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert [strip(r) for r in by_name] == [strip(r) for r in by_object]
    assert no_model_work["generate"] > 0  # the counter sees real work


@pytest.mark.parametrize("runner", ["run_dpc", "calibrate_dpc", "run_iap", "calibrate_iap",
                                    "run_dpc_distributed", "evaluate_accuracy"])
def test_a_bad_task_fails_before_any_model_work(runner, model, bed, tmp_path, no_model_work):
    from dpc_lens import distributed
    from dpc_lens.dpc import calibrate_dpc, run_dpc
    from dpc_lens.iap import calibrate_iap, run_iap
    from dpc_lens.prompt_tuning import evaluate_accuracy

    exs = _examples(bed)
    call = {
        "run_dpc": lambda t: run_dpc(model, _soft(bed), exs, t, progress=False),
        "calibrate_dpc": lambda t: calibrate_dpc(model, _soft(bed), exs, t, progress=False),
        "run_iap": lambda t: run_iap(model, exs, t, ["Let's think."], progress=False),
        "calibrate_iap": lambda t: calibrate_iap(model, exs, t, ["Let's think."], progress=False),
        "run_dpc_distributed": lambda t: distributed.run_dpc_distributed(
            model, _soft(bed), exs, t, out_dir=tmp_path / "d", progress=False),
        "evaluate_accuracy": lambda t: evaluate_accuracy(model, None, exs, t, progress=False),
    }[runner]
    with pytest.raises(ConfigError, match=r"unknown task 'arihtm'.*Did you mean 'arith'\?"):
        call("arihtm")
    with pytest.raises(InputError, match=r"task must be a task name \(gsm8k, math, aqua, arith, or "
                                         r"gym:<name>\) or a task object.*got int 3"):
        call(3)
    assert no_model_work == {"generate": 0, "saliency": 0}
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------ dict configs


def test_configs_given_as_dicts_go_through_from_dict(model, bed, no_model_work):
    from dpc_lens.dpc import DPCConfig, run_dpc
    from dpc_lens.generation import GenerationConfig, generate

    exs = _examples(bed, 1)
    as_dict = {"generation": {"max_new_tokens": 3}, "baselines": []}
    recs, _ = run_dpc(model, _soft(bed), exs, "arith", as_dict, progress=False)
    ref, _ = run_dpc(model, _soft(bed), exs, "arith",
                     DPCConfig(generation=GenerationConfig(max_new_tokens=3), baselines=()), progress=False)
    assert recs[0]["pt"] == ref[0]["pt"] and len(recs[0]["pt"]["rationale"]) > 0
    g = generate(model, ["1 + 2 ="], None, {"max_new_tokens": 2}, progress=False)[0]
    assert len(g.token_ids) <= 2
    n = no_model_work["generate"]
    with pytest.raises(ConfigError, match=r"config \(a dict for DPCConfig\) has an unknown key 'baseline' "
                                          r"\(did you mean 'baselines'\?\)"):
        run_dpc(model, _soft(bed), exs, "arith", {"baseline": []}, progress=False)
    with pytest.raises(ConfigError, match=r"GenerationConfig has an unknown key 'max_new_token' "
                                          r"\(did you mean 'max_new_tokens'\?\)"):
        run_dpc(model, _soft(bed), exs, "arith", {"generation": {"max_new_token": 3}}, progress=False)
    with pytest.raises(ConfigError, match=r"config must be a DPCConfig or a dict of its fields.*got list"):
        run_dpc(model, _soft(bed), exs, "arith", [("seed", 1)], progress=False)
    with pytest.raises(ConfigError, match=r"config \(a dict for GenerationConfig\) has an unknown key "
                                          r"'max_tokens'"):
        generate(model, ["1 + 2 ="], None, {"max_tokens": 2})
    assert no_model_work["generate"] == n  # every refusal came before generation


def test_iap_calibration_and_training_configs_as_dicts(model, bed, no_model_work):
    from dpc_lens.dpc import calibrate_dpc
    from dpc_lens.iap import IAPRunConfig, run_iap
    from dpc_lens.prompt_tuning import train_soft_prompt

    exs = _examples(bed, 1)
    saved = IAPRunConfig().to_dict()  # what config.json holds, "kind" and "version" included
    saved["generation"]["max_new_tokens"] = 2
    pairs, summary = run_iap(model, _examples(bed, 2), "arith", ["Let's think."], saved, progress=False)
    assert summary["config"]["generation"]["max_new_tokens"] == 2 and len(pairs) == 2
    with pytest.raises(ConfigError, match=r"IAPRunConfig\) has an unknown key 'per_heads' \(did you mean "
                                          r"'per_head'\?\)"):
        run_iap(model, exs, "arith", ["Let's think."], {"per_heads": True}, progress=False)
    with pytest.raises(ConfigError, match=r"grid \(a dict for CalibrationGrid\) has an unknown key 'topk' "
                                          r"\(did you mean 'top_k'\?\)"):
        calibrate_dpc(model, _soft(bed), exs, "arith", grid={"topk": [1]}, progress=False)
    with pytest.raises(ConfigError, match=r"base_config must be a DPCConfig or a dict.*got str"):
        calibrate_dpc(model, _soft(bed), exs, "arith", "dpc_config.json", progress=False)
    with pytest.raises(ConfigError, match=r"PromptTuningConfig\) has an unknown key 'step' \(did you mean "
                                          r"'steps'\?\)"):
        train_soft_prompt(model, exs, {"step": 3}, progress=False)


# --------------------------------------------------------------------------------- analyse


def test_analyse_without_a_soft_prompt_says_dpc_needs_one(model, no_model_work):
    from dpc_lens.dpc import analyse, run_dpc

    with pytest.raises(InputError) as e:
        analyse(model, None, ["1 + 2 ="])
    msg = str(e.value)
    assert msg.startswith("analyse needs a soft prompt") and "SoftPrompt.from_peft" in msg
    assert "compute_saliency" in msg and "segment" not in msg
    with pytest.raises(InputError, match="run_dpc needs a soft prompt"):
        run_dpc(model, None, [], "arith")
    with pytest.raises(InputError, match="analyse: soft_prompt must be a SoftPrompt.*got str"):
        analyse(model, "path/to/adapter", ["1 + 2 ="])
    assert no_model_work == {"generate": 0, "saliency": 0}


# ------------------------------------------------------------------- nothing could be evaluated


def test_max_new_tokens_beyond_the_context_is_refused_up_front(model, bed, tmp_path, no_model_work):
    from dpc_lens.dpc import DPCConfig, calibrate_dpc, run_dpc
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.iap import IAPRunConfig, run_iap

    exs = _examples(bed)
    gen = GenerationConfig(max_new_tokens=100000)
    # the bed: n_ctx 256, 4 soft tokens, BOS; template "{question}" adds nothing
    with pytest.raises(ConfigError) as e:
        run_dpc(model, _soft(bed), exs, "arith", DPCConfig(generation=gen), out_dir=tmp_path / "o")
    msg = str(e.value)
    assert "No question can fit this model's context: n_ctx=256" in msg
    assert "5 fixed token(s) + at least 1 question token + max_new_tokens=100000 = 100006" in msg
    assert "Lower max_new_tokens to at most 250" in msg
    assert not (tmp_path / "o" / "records.jsonl").exists()
    with pytest.raises(ConfigError, match="No question can fit.*at most 250"):
        calibrate_dpc(model, _soft(bed), exs, "arith", DPCConfig(generation=gen))
    with pytest.raises(ConfigError, match=r"No question can fit.*1 fixed token\(s\).*at most 254"):
        run_iap(model, exs, "arith", ["Let's think."], IAPRunConfig(generation=gen))
    # the largest that fits one question token is accepted by the up-front check
    assert no_model_work == {"generate": 0, "saliency": 0}


def test_a_run_with_every_question_skipped_raises_and_the_cli_exits_nonzero(model, bed, tmp_path, capsys):
    from dataclasses import replace

    from dpc_lens.dpc import DPCConfig, read_records, run_dpc
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.tasks.io import write_jsonl

    long_q = " ".join(["5"] * 300)  # 300 tokens > n_ctx 256 on its own
    exs = [replace(e, question=long_q) for e in _examples(bed)]
    cfg = DPCConfig(generation=GenerationConfig(max_new_tokens=4), baselines=())
    with pytest.raises(DataError) as e:
        run_dpc(model, _soft(bed), exs, "arith", cfg, out_dir=tmp_path / "o", progress=False)
    msg = str(e.value)
    assert msg.startswith("Nothing was evaluated: all 2 question(s) were skipped (too long for the model's "
                          "context")
    assert str(tmp_path / "o") in msg
    assert [r["skipped"] is not None for r in read_records(tmp_path / "o" / "records.jsonl")] == [True, True]
    data = tmp_path / "long.jsonl"
    write_jsonl(data, exs)
    argv = dpc_argv(bed, tmp_path / "cli")
    argv[argv.index("--data") + 1] = data
    rc, out, err = cli(argv, capsys)
    assert rc == 2 and ": DataError: Nothing was evaluated: all 2 question(s) were skipped" in err
    rc, out, err = cli(dpc_argv(bed, tmp_path / "cli2", "--max-new-tokens", "100000"), capsys)
    assert rc == 2 and ": ConfigError: No question can fit this model's context: n_ctx=256" in err
    assert "--max-new-tokens" in err and not (tmp_path / "cli2" / "records.jsonl").exists()


# ------------------------------------------------------------------------- portable adapters


def _no_local_path_in(directory, *paths):
    text = "".join(p.read_text(encoding="utf-8") for p in directory.iterdir() if p.suffix == ".json")
    return not any(str(p) in text for p in paths)


def test_a_saved_adapter_names_its_base_model_without_the_local_path(bed, tmp_path):
    import json

    import peft

    from dpc_lens.checkpoints import portable_model_name

    model_dir = bed[1].resolve()
    soft = _soft(bed)
    out = tmp_path / "adapter"
    soft.save_peft(out, base_model_name_or_path=str(model_dir))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "model"  # the directory's own name
    assert _no_local_path_in(out, model_dir, tmp_path)
    # PEFT reads the same field back, and dpc_lens loads the adapter as before
    assert peft.PeftConfig.from_pretrained(str(out)).base_model_name_or_path == "model"
    assert torch.equal(type(soft).from_peft(out).embeddings, soft.embeddings)
    # a hub id is kept; a Hugging Face cache snapshot and a config.json that names its hub id give it
    assert portable_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snap = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    assert portable_model_name(snap) == "acme/tiny-llama"
    named = tmp_path / "copied"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "acme/named-model"}))
    assert portable_model_name(named) == "acme/named-model"
    (named / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    assert portable_model_name(named) == "copied"  # a path in config.json is not a hub id


def test_trained_prompts_record_a_portable_base_model(model, bed, tmp_path):
    import json

    from dpc_lens.prompt_tuning import train_soft_prompt

    res = train_soft_prompt(model, _examples(bed, 2), {"steps": 1, "n_tokens": 2, "batch_size": 2},
                            progress=False)
    assert res.meta["base_model_name_or_path"] == "model"
    out = res.save_adapter(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "model"
    assert _no_local_path_in(tmp_path / "trained", bed[1].resolve(), bed[0].resolve())
    assert os.path.isdir(out)


def test_the_shipped_adapters_carry_no_absolute_path():
    import glob
    import json

    import dpc_lens

    root = os.path.dirname(dpc_lens.__file__)
    files = glob.glob(os.path.join(root, "data", "**", "soft_prompt", "*.json"), recursive=True)
    assert len(files) >= 4
    for f in files:
        d = json.load(open(f, encoding="utf-8"))
        d = {**d, **d.get("meta", {})}
        for key in ("base_model_name_or_path", "tokenizer_name_or_path"):
            v = d.get(key)
            assert v is None or not os.path.isabs(v), (f, key, v)


def test_the_cli_is_quiet_in_a_log_by_default(bed, tmp_path, capsys):
    argv = [a for a in dpc_argv(bed, tmp_path / "o", "--limit", "2") if a != "--no-progress"]
    rc, out, err = cli(argv, capsys)
    assert rc == 0, err
    assert "it/s" not in err and "DPC:" not in err and "Loading weights" not in err
    assert "n = 2" in out  # the run itself happened and reported


def test_a_shard_with_every_question_skipped_is_judged_on_the_merged_run(model, bed, tmp_path, monkeypatch):
    """Two ranks, run one after the other in this process (no process group): rank 1's only
    question is too long, rank 0's fits; the shard does not fail the run, the merge counts n = 1.
    With every question too long the merged run raises."""
    from dataclasses import replace

    from dpc_lens import distributed
    from dpc_lens.distributed import RankInfo, run_dpc_distributed, shard
    from dpc_lens.dpc import DPCConfig

    monkeypatch.setattr(distributed, "_init", lambda info: False)
    monkeypatch.setattr(distributed, "_barrier", lambda: None)
    exs = _examples(bed, 5)
    r1 = shard(exs, RankInfo(1, 2))
    assert r1 and len(r1) < len(exs)
    long_q = " ".join(["5"] * 300)
    exs = [replace(e, question=long_q) if e in r1 else e for e in exs]
    cfg = DPCConfig(generation=replace(DPCConfig().generation, max_new_tokens=3), baselines=())
    assert run_dpc_distributed(model, _soft(bed), exs, "arith", cfg, out_dir=tmp_path / "a",
                               info=RankInfo(1, 2), progress=False) is None
    _, summary = run_dpc_distributed(model, _soft(bed), exs, "arith", cfg, out_dir=tmp_path / "a",
                                     info=RankInfo(0, 2), progress=False)
    assert summary["n"] == len(exs) - len(r1) and summary["skipped"]["n"] == len(r1)
    every = [replace(e, question=long_q) for e in exs]
    run_dpc_distributed(model, _soft(bed), every, "arith", cfg, out_dir=tmp_path / "b", info=RankInfo(1, 2),
                        progress=False)
    with pytest.raises(DataError, match=f"Nothing was evaluated: all {len(exs)} question"):
        run_dpc_distributed(model, _soft(bed), every, "arith", cfg, out_dir=tmp_path / "b",
                            info=RankInfo(0, 2), progress=False)


@no_cuda
def test_boot_in_memory_checks_its_device_before_moving_the_model():
    from dpc_lens.checkpoints import boot_in_memory
    from dpc_lens.testing import tiny_tokenizer

    class Unmovable:  # a model that must not be touched when the device is refused
        def to(self, *a, **k):
            raise AssertionError("moved")

    with pytest.raises(InputError, match=r"device='cuda:0' asks for CUDA.*device='cpu'"):
        boot_in_memory(Unmovable(), tiny_tokenizer(), device="cuda:0")


def test_corruption_configs_as_dicts(bed):
    from dpc_lens.patching import corrupt_soft_prompt

    soft = _soft(bed)
    out = corrupt_soft_prompt(soft, [1], {"mode": "scale", "scale": 0.5})
    expected = soft.embeddings.clone()
    expected[1] *= 0.5  # by hand: row 1 halved, the others untouched
    assert torch.equal(out.embeddings, expected)
    with pytest.raises(ConfigError, match=r"CorruptionConfig\) has an unknown key 'mod' "
                                          r"\(did you mean 'mode'\?\)"):
        corrupt_soft_prompt(soft, [1], {"mod": "zero"})
