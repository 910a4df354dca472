"""bf16 saliency without float32 accumulation warns once per process (issue 21)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpc_lens.errors import DpcLensWarning
from dpc_lens.model import load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.saliency import config as sal_config
from dpc_lens.testing import save_tiny_hf_model


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    return load_model(save_tiny_hf_model("llama", tmp_path_factory.mktemp("bf16"), seed=4),
                      device="cpu", dtype="bfloat16")


def _run(model, **kw):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        compute_saliency(model, "the cat sat on the mat", SaliencyConfig(**kw))
    return [w for w in got
            if issubclass(w.category, DpcLensWarning) and "float32 accumulation" in str(w.message)]


def test_bf16_without_fp32_accumulation_warns_once(bf16_model, monkeypatch):
    monkeypatch.setattr(sal_config, "_LOW_PRECISION_WARNED", set())
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    assert _run(bf16_model) == []  # fp32 accumulation (the default): no warning
    first = _run(bf16_model, fp32=False)
    assert len(first) == 1 and "bfloat16" in str(first[0].message) and "2.6x" in str(first[0].message)
    assert _run(bf16_model, fp32=False) == []  # once per process


def test_float32_models_never_warn(monkeypatch, tmp_path):
    monkeypatch.setattr(sal_config, "_LOW_PRECISION_WARNED", set())
    model = load_model(save_tiny_hf_model("llama", tmp_path / "f32", seed=4), device="cpu")
    assert _run(model, fp32=False) == []
