"""The public saliency capture, ``saliency_hooks(...) -> (store, hooks)`` (STYLE item 1).

One forward + backward that carries the saliency hooks *and* other hooks -- a user's own
recording hook, or :func:`~dpc_lens.patching.soft_row_hooks` corrupting a soft token -- gives
exactly what two separate passes give: :func:`compute_saliency` on the corrupted prompt, and a
plain forward with the other hooks alone. Also: every public entry point takes the model as the
user holds it (a ``TransformerBridge``), not only its adapter.
"""

from __future__ import annotations

import pytest
import torch

import dpc_lens as dl
from dpc_lens import hook_names
from dpc_lens.model import as_adapter
from dpc_lens.patching import corrupt_soft_prompt, soft_row_hooks
from dpc_lens.saliency import SaliencyConfig, compute_saliency, saliency_hooks, target_nll
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt

IDS = [[5, 9, 12, 30, 31, 7], [40, 8, 11, 13]]
CFG = SaliencyConfig(loss_segments=("r",), column_targets=("q", "r"), row_sources=("soft",))


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model(request):
    return request.getfixturevalue(request.param)


def _soft(model) -> SoftPrompt:
    g = torch.Generator().manual_seed(0)
    return SoftPrompt(torch.randn(4, model.cfg.d_model, generator=g) * 0.5)


def _batch(model, soft) -> PromptBatch:
    lays = [SegmentLayout({"q": (0, 3), "r": (3, len(s))}, len(s)) for s in IDS]
    return PromptBatch.build(model, IDS, lays, soft)  # the bridge itself, not as_adapter(model)


def _one_pass(model, batch, extra_hooks):
    """Saliency hooks + ``extra_hooks`` in one forward + backward, as the docstring shows."""
    adapter = as_adapter(model)
    store, hooks = saliency_hooks(model, batch, CFG)
    with adapter.hooks(fwd_hooks=hooks + list(extra_hooks)), torch.enable_grad():
        embeds = batch.embeds.detach().requires_grad_(True)
        logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids)
        loss = target_nll(logits, batch, CFG.loss_segments)
        loss.sum().backward()
    return store.result(loss), logits.detach()


def _same(a, b):
    for key in ("flow_sums", "column_sums", "column_shares", "row_sums", "row_totals", "loss"):
        x, y = getattr(a, key), getattr(b, key)
        # the two routes (a hook adding a delta to the residual, or the corrupted embedding; a
        # float32 or a float64-accumulated loss) differ by float32 rounding: a few ulps of the
        # largest entry, which for the row-normalised shares (up to ~1.4) is ~4e-7
        atol = 1e-6 * float(y.abs().max()) if key == "column_shares" else 1e-9
        torch.testing.assert_close(x, y, rtol=1e-5, atol=atol, msg=key)


def test_composes_with_soft_row_hooks_in_one_pass(model):
    soft = _soft(model)
    clean = _batch(model, soft)
    got, got_logits = _one_pass(model, clean, soft_row_hooks(clean, soft, [2]))
    # two separate passes: saliency on the corrupted prompt; the hooked forward alone
    corrupted = _batch(model, corrupt_soft_prompt(soft, [2]))
    _same(got, compute_saliency(model, corrupted, CFG))
    adapter = as_adapter(model)
    with torch.no_grad(), adapter.hooks(fwd_hooks=soft_row_hooks(clean, soft, [2])):
        ref_logits = adapter.forward_embeds(clean.embeds, clean.attention_mask, clean.position_ids)
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-6)
    # and the corruption did change something (the test can fail)
    assert not torch.allclose(got.flow_sums, compute_saliency(model, clean, CFG).flow_sums)


def test_composes_with_a_users_own_hook(model):
    soft = _soft(model)
    batch = _batch(model, soft)
    seen: list[torch.Tensor] = []

    def record(resid, hook):
        seen.append(resid.detach().clone())

    got, _ = _one_pass(model, batch, [(hook_names.resid_pre(1), record)])
    _same(got, compute_saliency(model, batch, CFG))
    alone: list[torch.Tensor] = []
    adapter = as_adapter(model)
    mine = [(hook_names.resid_pre(1), lambda r, hook: alone.append(r.clone()))]
    with torch.no_grad(), adapter.hooks(fwd_hooks=mine):
        adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
    assert len(seen) == 1 and len(alone) == 1
    torch.testing.assert_close(seen[0], alone[0], rtol=1e-5, atol=1e-6)


def test_no_backward_means_no_result(tiny_llama):
    soft = _soft(tiny_llama)
    batch = _batch(tiny_llama, soft)
    store, hooks = saliency_hooks(tiny_llama, batch, CFG)
    adapter = as_adapter(tiny_llama)
    with adapter.hooks(fwd_hooks=hooks), torch.enable_grad():
        embeds = batch.embeds.detach().requires_grad_(True)
        adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids)
    with pytest.raises(dl.SaliencyError, match=r"delivered no attention gradient"):
        store.result()


def test_from_pieces_takes_the_bridge_itself(tiny_llama):
    tok = tiny_llama.tokenizer
    pieces = [[("bos", [tok.bos_token_id]), ("question", "a b"), ("rationale", " c d")]]
    via_model = dl.PromptBatch.from_pieces(tiny_llama, pieces)
    via_adapter = dl.PromptBatch.from_pieces(as_adapter(tiny_llama), pieces)
    assert torch.equal(via_model.embeds, via_adapter.embeds)
    assert via_model.layouts == via_adapter.layouts
