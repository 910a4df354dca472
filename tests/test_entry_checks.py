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

from dpc_lens.errors import InputError, ModelError


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
