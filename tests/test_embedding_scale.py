"""Soft-prompt initialisation at the model's own embedding scale (Gemma multiplies its input
embeddings by sqrt(d_model)), on a tiny random Gemma 3; the expected values are computed by hand
from the raw embedding matrix and sqrt(d_model)."""

from __future__ import annotations

import math

import pytest
import torch
from test_sliding_window import D_MODEL, save_tiny_gemma3

from dpc_lens.model import as_adapter, load_model
from dpc_lens.prompt_tuning import PromptTuningConfig, initial_soft_prompt, input_embedding_rms
from dpc_lens.soft_prompt import SoftPrompt


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return load_model(save_tiny_gemma3(tmp_path_factory.mktemp("gemma3_scale"), seed=3), device="cpu")


def test_inits_carry_the_sqrt_d_model_scale(gemma):
    ad = as_adapter(gemma)
    W = ad.embedding_weight.detach().double()
    scale = math.sqrt(D_MODEL)
    raw_rms = float(W.pow(2).mean().sqrt())
    assert float(input_embedding_rms(gemma)) == pytest.approx(scale * raw_rms, rel=1e-5)

    rnd = initial_soft_prompt(gemma, PromptTuningConfig(n_tokens=64, init="random", seed=0))
    got = float(rnd.embeddings.double().pow(2).mean().sqrt())
    assert got == pytest.approx(scale * raw_rms, rel=0.1)  # 64 x 32 normal draws
    assert got > 3 * raw_rms  # the unscaled init (the old bug) was sqrt(32) ~ 5.7x too small

    tok = ad.tokenizer
    ids = tok("ann has 3 apples", add_special_tokens=False)["input_ids"]
    text = SoftPrompt.from_text(ad, "ann has 3 apples", n_tokens=len(ids))
    torch.testing.assert_close(text.embeddings.double(), scale * W[ids], rtol=1e-6, atol=1e-7)
    txt = initial_soft_prompt(gemma, PromptTuningConfig(n_tokens=len(ids), init="text",
                                                        init_text="ann has 3 apples"))
    torch.testing.assert_close(txt.embeddings.double(), scale * W[ids], rtol=1e-6, atol=1e-7)

    voc = initial_soft_prompt(gemma, PromptTuningConfig(n_tokens=5, init="vocab", seed=1))
    dist = torch.cdist(voc.embeddings.double(), scale * W)  # each row is a scaled vocabulary row
    assert float(dist.min(1).values.max()) < 1e-5
