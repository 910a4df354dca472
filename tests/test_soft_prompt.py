"""SoftPrompt construction and immutability (PEFT file io is in test_peft_parity.py)."""

from __future__ import annotations

import pytest
import torch

from dpc_lens.errors import InputError
from dpc_lens.model import as_adapter
from dpc_lens.soft_prompt import SoftPrompt


def test_from_tokens_and_from_text_use_vocabulary_rows(tiny_llama):
    ad = as_adapter(tiny_llama)
    W = ad.embedding_weight
    sp = SoftPrompt.from_tokens(ad, [5, 9, 5])
    assert torch.equal(sp.embeddings, W[[5, 9, 5]])
    ids = ad.tokenizer("think step", add_special_tokens=False)["input_ids"]
    st = SoftPrompt.from_text(ad, "think step", n_tokens=5)  # PEFT repeats then cuts
    assert torch.equal(st.embeddings, W[(ids * 3)[:5]])
    assert st.config["prompt_tuning_init_text"] == "think step"
    with pytest.raises(InputError, match="tokenises to nothing"):
        SoftPrompt.from_text(ad, "", n_tokens=2)


def test_new_objects_never_alias_the_callers_tensor():
    t = torch.randn(3, 8)
    sp = SoftPrompt(t, {"num_virtual_tokens": 3})
    c = sp.clone()
    c.embeddings.zero_()
    assert torch.equal(sp.embeddings, t) and t.abs().sum() > 0
    h = sp.to(dtype=torch.float16)
    assert h.embeddings.dtype == torch.float16 and sp.embeddings.dtype == torch.float32
    w = sp.with_embeddings(torch.ones(3, 8))
    assert w.config == sp.config and w.config is not sp.config
    assert len(sp) == 3 and sp.n_tokens == 3 and sp.d_model == 8


@pytest.mark.parametrize("bad, message", [
    (torch.randn(8), r"2-D tensor \[n_tokens, d_model\]; got \(8,\)"),
    (torch.zeros(0, 8), "at least one token"),
    (torch.ones(2, 8, dtype=torch.long), "floating point"),
    ([[1.0]], r"2-D tensor \[n_tokens, d_model\]; got list"),
])
def test_bad_embeddings(bad, message):
    with pytest.raises(InputError, match=message):
        SoftPrompt(bad)
