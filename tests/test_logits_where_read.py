"""Logits only where they are read: a saliency pass unembeds the scored positions only, a
generation prefill the last position only; results equal the full-logits path (checked against
that path run explicitly, and the unembedded shapes against hand counts)."""

from __future__ import annotations

import pytest
import torch
from test_sliding_window import save_tiny_gemma3

from dpc_lens import saliency as sal
from dpc_lens.generation import GenerationConfig, generate
from dpc_lens.model import ModelAdapter, as_adapter, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency, target_nll
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model

PIECES = [("question", "ann has 3 apples and buys 2 more ."), ("prompt", "let's think"),
          ("rationale", "so 3 + 2 = 5 .")]
SHORT = [("question", "bob buys 2 pens"), ("rationale", "2 pens")]


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    path = (save_tiny_gemma3(d, seed=5) if request.param == "gemma3"
            else save_tiny_hf_model("llama", d, seed=5))
    return load_model(path, device="cpu")


class _Hooks:
    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def _lm_head_shapes(model):
    """Shapes of the unembedding's outputs (the bridge's component and, in the direct decoding
    path, the Hugging Face module it wraps)."""
    shapes = []
    head = as_adapter(model)._hf_model.get_output_embeddings()
    mods = [head] + [m for m in [getattr(head, "original_component", None)] if m is not None]
    return shapes, _Hooks([m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
                           for m in mods])


def test_saliency_unembeds_only_the_scored_positions(model):
    ad = as_adapter(model)
    assert ad.keeps_logits_subset
    soft = SoftPrompt(torch.randn(3, ad.d_model, generator=torch.Generator().manual_seed(0)) * 0.5)
    batch = PromptBatch.from_pieces(model, [PIECES, SHORT], soft)
    cfg = SaliencyConfig(loss_segments=("rationale",), keep_full=True, column_targets=("rationale",),
                         row_sources=("soft",))
    # hand count: positions t-1 for every rationale token t of either example
    want = sorted({t - 1 for lay in batch.layouts for t in range(*lay.spans["rationale"]) if t >= 1})
    shapes, h = _lm_head_shapes(model)
    try:
        fast = compute_saliency(model, batch, cfg)
    finally:
        h.remove()
    V = ad.embedding_weight.shape[0]
    assert set(shapes) == {(2, len(want), V)} and len(want) < batch.seq_len
    # the full-logits path: a loss_fn (custom losses get every position), the same loss maths
    shapes, h = _lm_head_shapes(model)
    try:
        full = compute_saliency(model, batch, cfg, loss_fn=lambda logits, b: target_nll(
            logits, b, ("rationale",), dtype=torch.float64 if cfg.loss_fp64 else None))
    finally:
        h.remove()
    assert set(shapes) == {(2, batch.seq_len, V)}
    torch.testing.assert_close(fast.loss.double(), full.loss.double(), rtol=1e-6, atol=0)
    for name in ("full", "flow_sums", "column_sums", "row_sums"):
        a, b = getattr(fast, name), getattr(full, name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    # the estimate counts the logits at the scored positions only (3 x [B, K, V] float32)
    assert sal.logits_bytes(ad, batch, len(want)) == 3 * 2 * len(want) * V * 4
    assert sal._logit_positions(ad, batch, cfg, None) == len(want)
    assert sal._logit_positions(ad, batch, cfg, lambda lg, b: lg.sum()) is None


def test_prefill_unembeds_the_last_position_and_tokens_are_unchanged(model, monkeypatch):
    tok = as_adapter(model).tokenizer
    prompts = [tok("ann has 3 apples and", add_special_tokens=False)["input_ids"],
               tok("bob", add_special_tokens=False)["input_ids"]]
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    generate(model, prompts, config=cfg, progress=False)  # the once-per-model KV-cache probes
    shapes, h = _lm_head_shapes(model)
    try:
        fast = generate(model, prompts, config=cfg, progress=False)
    finally:
        h.remove()
    assert all(g.kv_cache for g in fast)
    assert shapes[0][:2] == (2, 1)  # the prefill: one position per row
    monkeypatch.setattr(ModelAdapter, "keeps_logits_subset", property(lambda self: False))
    shapes, h = _lm_head_shapes(model)
    try:
        slow = generate(model, prompts, config=cfg, progress=False)
    finally:
        h.remove()
    assert shapes[0][:2] == (2, max(map(len, prompts)))  # the full-logits prefill
    assert [g.token_ids for g in fast] == [g.token_ids for g in slow]


def test_prompt_tuning_loss_unembeds_only_the_targets(model, monkeypatch):
    """The prompt-tuning loss and its gradient on the soft rows equal the full-logits path."""
    from dpc_lens.prompt_tuning import TARGET_SEGMENT, _batch_loss
    from dpc_lens.segments import encode_pieces

    adapter = as_adapter(model)
    enc = [encode_pieces(adapter.tokenizer, [("question", q), (TARGET_SEGMENT, a)])
           for q, a in (("ann has 3 apples", "so 5 ."), ("bob buys 2 pens and 1 more", "3 ."))]
    g = torch.Generator().manual_seed(1)
    soft = (torch.randn(2, adapter.d_model, generator=g) * 0.3).requires_grad_(True)
    shapes = []
    monkeypatch.setattr(type(adapter), "forward_embeds",
                        _recording(type(adapter).forward_embeds, shapes))
    fast = _batch_loss(adapter, enc, soft)
    (g_fast,) = torch.autograd.grad(fast.sum(), soft)
    monkeypatch.setattr(type(adapter), "keeps_logits_subset", property(lambda self: False))
    full = _batch_loss(adapter, enc, soft)
    (g_full,) = torch.autograd.grad(full.sum(), soft)
    # the union of the scored positions, against every position of the padded batch (+2 soft)
    assert shapes[0][1] < shapes[1][1] == max(len(ids) for ids, _ in enc) + 2
    assert torch.allclose(fast, full, rtol=1e-6, atol=1e-7)
    assert torch.allclose(g_fast, g_full, rtol=1e-5, atol=1e-8)


def _recording(fn, shapes):
    def run(self, *a, **kw):
        out = fn(self, *a, **kw)
        shapes.append(tuple(out.shape))
        return out
    return run
