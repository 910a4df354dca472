"""The HookedTransformer path (TransformerLens < 4): embeddings input, generation, corruption, DPC.

Run in CI's second environment (transformer-lens 3.x) with ``-m hooked``; on TransformerLens 4,
where HookedTransformer no longer exists, these tests skip.
"""

from __future__ import annotations

import pytest
import torch

from dpc_lens.model import hooked_transformer_class

pytestmark = [
    pytest.mark.hooked,
    pytest.mark.skipif(hooked_transformer_class() is None,
                       reason="HookedTransformer needs transformer-lens < 4"),
]


@pytest.fixture(scope="module", params=["standard", "rotary"])
def ht(request):
    from dpc_lens.testing import hooked_tiny

    return hooked_tiny(positional=request.param, seed=3)


def _greedy_reference(model, tokens, n):
    """Greedy decoding by re-running HookedTransformer on token ids (its own embedding path)."""
    toks = tokens.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(toks)[:, -1].argmax(-1)
            out.append(int(nxt))
            toks = torch.cat([toks, nxt[:, None]], dim=1)
    return out


def test_generation_equals_hooked_transformers_own_greedy(ht):
    from dpc_lens.generation import GenerationConfig, generate

    tok = ht.tokenizer
    prompts = ["ann has 7 pens .", "bob has 3 cats and 4 dogs . how many"]
    gens = generate(ht, prompts, None, GenerationConfig(max_new_tokens=6, stop_at_eos=False), progress=False)
    for p, g in zip(prompts, gens):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        assert list(g.token_ids) == _greedy_reference(ht, ids, 6)


def test_soft_prompt_input_equals_residual_built_by_hand(ht):
    from dpc_lens.model import as_adapter
    from dpc_lens.segments import PromptBatch
    from dpc_lens.soft_prompt import SoftPrompt

    ad = as_adapter(ht)
    soft = SoftPrompt(torch.randn(3, ad.d_model, generator=torch.Generator().manual_seed(0)))
    b = PromptBatch.from_pieces(ad, [[("q", "ann has 7 pens .")]], soft)
    with torch.no_grad():
        got = ad.forward_embeds(b.embeds, b.attention_mask, b.position_ids)
        ids = torch.tensor([ht.tokenizer("ann has 7 pens .", add_special_tokens=False)["input_ids"]])
        emb = torch.cat([soft.embeddings[None], ht.W_E[ids]], dim=1)
        resid = emb
        if ht.cfg.positional_embedding_type == "standard":
            resid = emb + ht.W_pos[: emb.shape[1]][None]
        want = ht(resid, start_at_layer=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_corruption_hook_equals_corrupted_prompt_and_dpc_runs(ht, tmp_path):
    from dpc_lens.dpc import DPCConfig, run_dpc
    from dpc_lens.dpc.detector import DetectorConfig
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.model import as_adapter
    from dpc_lens.patching import corrupt_soft_prompt, soft_row_hooks
    from dpc_lens.segments import PromptBatch
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks.base import Example

    ad = as_adapter(ht)
    soft = SoftPrompt(torch.randn(4, ad.d_model, generator=torch.Generator().manual_seed(1)))
    ex = [[("q", "ann has 7 pens .")], [("q", "bob has 3 cats")]]
    b = PromptBatch.from_pieces(ad, ex, soft)
    bc = PromptBatch.from_pieces(ad, ex, corrupt_soft_prompt(soft, [2]))
    with torch.no_grad():
        want = ad.forward_embeds(bc.embeds, bc.attention_mask, bc.position_ids)
        with ad.hooks(fwd_hooks=soft_row_hooks(b, soft, [2])):
            got = ad.forward_embeds(b.embeds, b.attention_mask, b.position_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    class Echo:
        name = "echo"

        def extract_answer(self, text):
            return text.split()[-1] if text.split() else None

        def is_correct(self, pred, gold):
            return pred == gold

    questions = ["ann has 7 pens .", "bob has 3 cats ."]
    exs = [Example(id=str(i), question=q, answer="7") for i, q in enumerate(questions)]
    cfg = DPCConfig(detector=DetectorConfig(R=0.0),
                    generation=GenerationConfig(max_new_tokens=5, stop_at_eos=False),
                    add_bos=False, baselines=("base",))
    before = soft.embeddings.clone()
    recs, summary = run_dpc(ht, soft, exs, Echo(), cfg, out_dir=tmp_path, progress=False)
    assert summary["n"] == 2 and len(recs) == 2
    assert all(len(r["flows"]["soft->rationale"]) == ht.cfg.n_layers for r in recs)
    assert torch.equal(soft.embeddings, before)
