"""Memory-lean saliency: every block recomputed during the backward (activation checkpointing).

The normal pass is the reference (itself checked against an independent Hugging Face
implementation in test_saliency_reference.py). Lean mode must give the same saliency, really
recompute (each layer's pattern hook fires twice, one gradient hook per layer), keep no
attention-sized tensor alive for the backward outside the block being recomputed, and leave the
model exactly as found, also after an exception.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dpc_lens import saliency as sal
from dpc_lens.errors import ConfigError, SaliencyError
from dpc_lens.model import load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency, saliency_hooks
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import boot_native, save_tiny_hf_model

PIECES = [
    [("question", "ann has 3 apples"), ("rationale", " bob gives 2 more . how many")],
    [("question", "the cat"), ("rationale", " has 3 pens and 2 books")],
]
FULL = dict(keep_full=True, column_targets=("rationale",), row_sources=("question",))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch in ("llama", "gpt2"):
        d = save_tiny_hf_model(arch, tmp_path_factory.mktemp(arch), seed=3, n_layers=3)
        out[arch] = load_model(d, device="cpu")
        out[arch + "-bf16"] = load_model(d, device="cpu", dtype="bfloat16")
    out["native"] = boot_native(n_layers=3)
    return out


def _batch(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    soft = SoftPrompt((torch.randn(3, model.cfg.d_model, generator=g) * 0.3).to(dtype))
    return PromptBatch.from_pieces(model, PIECES, soft)


def _fields(res):
    return {k: getattr(res, k) for k in ("flow_sums", "full", "column_sums", "column_shares",
                                          "row_sums", "row_totals", "loss")}


@pytest.mark.parametrize("which", ["llama", "gpt2", "native", "llama-bf16", "gpt2-bf16"])
@pytest.mark.parametrize("per_head", [False, True])
def test_lean_equals_normal(models, which, per_head):
    model = models[which]
    batch = _batch(model, torch.bfloat16 if which.endswith("bf16") else torch.float32)
    normal = compute_saliency(model, batch, SaliencyConfig(memory="normal", per_head=per_head, **FULL))
    lean = compute_saliency(model, batch, SaliencyConfig(memory="lean", per_head=per_head, **FULL))
    for k, v in _fields(normal).items():
        torch.testing.assert_close(_fields(lean)[k], v, rtol=0, atol=0, msg=k)
    assert normal.flow_sums.abs().sum() > 0


def _count_firings(model, batch, memory):
    fired: list[str] = []
    counter = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: fired.append(hook.name))
               for l in range(model.cfg.n_layers)]
    real_hooks = model.hooks

    def hooks_with_counter(fwd_hooks=(), bwd_hooks=(), **kw):
        return real_hooks(fwd_hooks=list(fwd_hooks) + counter, bwd_hooks=bwd_hooks, **kw)

    model.hooks = hooks_with_counter
    try:
        compute_saliency(model, batch, SaliencyConfig(memory=memory))
    finally:
        del model.__dict__["hooks"]
    return fired


def test_lean_really_recomputes_each_block_once(models):
    model = models["llama"]
    batch = _batch(model)
    n = model.cfg.n_layers
    assert len(_count_firings(model, batch, "normal")) == n
    assert sorted(_count_firings(model, batch, "lean")) == sorted(
        [f"blocks.{l}.attn.hook_pattern" for l in range(n)] * 2)


def _attention_sized_bytes_saved_for_backward(model, batch, memory):
    """Bytes of [.., T, T]-shaped tensors autograd keeps from the forward for the backward,
    outside checkpointed regions (checkpointing installs its own inner saved-tensor hooks)."""
    T = batch.seq_len
    seen: dict[int, int] = {}  # storage -> bytes (a tensor saved by several ops counts once)

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == T and t.shape[-2] == T:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    cfg = SaliencyConfig(memory=memory)
    store, hooks = saliency_hooks(model, batch, cfg, recompute=memory == "lean")
    adapter = sal.as_adapter(model)
    with torch.enable_grad(), adapter.hooks(fwd_hooks=hooks):
        recompute = sal._checkpointed_blocks(adapter) if memory == "lean" else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recompute:
            embeds = batch.embeds.detach().requires_grad_(True)
            logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids)
            loss = sal.target_nll(logits, batch).sum()
        torch.autograd.grad(loss, embeds)
    assert sorted(store.per_layer) == list(range(model.cfg.n_layers))
    return sum(seen.values())


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_lean_keeps_no_attention_sized_tensor_for_the_backward(models, which):
    model = models[which]
    batch = _batch(model)
    B, T, H, L = batch.batch_size, batch.seq_len, model.cfg.n_heads, model.cfg.n_layers
    # normal: every layer's [B, H, T, T] pattern (at least) is kept for the backward
    assert _attention_sized_bytes_saved_for_backward(model, batch, "normal") >= L * B * H * T * T * 4
    # lean: at most the model's own [B, 1, T, T] attention mask (GPT-2 builds it once, outside
    # the blocks); no per-layer, per-head tensor
    assert _attention_sized_bytes_saved_for_backward(model, batch, "lean") <= B * T * T * 4


def test_auto_switches_to_lean_when_the_estimate_does_not_fit(models, monkeypatch):
    model = models["llama"]
    batch = _batch(model)
    assert sal.normal_mode_bytes(sal.as_adapter(model), batch) == (
        3 * model.cfg.n_layers * batch.batch_size * model.cfg.n_heads * batch.seq_len ** 2 * 4)
    assert len(_count_firings(model, batch, "auto")) == model.cfg.n_layers  # fits: normal
    # normal does not fit, one layer's pattern does: lean (below that, blockwise: see
    # test_saliency_blockwise.py)
    one_layer = sal.normal_mode_bytes(sal.as_adapter(model), batch) // model.cfg.n_layers
    monkeypatch.setattr(sal, "_free_bytes", lambda device: 2 * one_layer)
    assert len(_count_firings(model, batch, "auto")) == 2 * model.cfg.n_layers  # does not fit: lean


def test_model_left_as_found_after_an_exception_in_lean_mode(models):
    model = models["gpt2"]
    batch = _batch(model)

    def bad_loss(logits, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compute_saliency(model, batch, SaliencyConfig(memory="lean"), loss_fn=bad_loss)
    assert not any("forward" in b.__dict__ for b in model.blocks)
    assert not any(m._forward_hooks for m in model.modules() if "_pattern" in m.__dict__)
    assert all(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("memory", ["normal", "lean"])
def test_no_attention_pattern_left_on_the_model_after_a_pass(models, memory):
    """TL 4.3's GPT-2 attention bridge keeps each layer's last pattern, with its graph, after a
    forward; dpc_lens does not leave that behind after its own passes."""
    model = models["gpt2"]
    keepers = [m for m in model.modules() if "_pattern" in m.__dict__]
    assert keepers
    compute_saliency(model, _batch(model), SaliencyConfig(memory=memory))
    assert all(m.__dict__["_pattern"] is None for m in keepers)


def test_recompute_without_checkpointing_is_a_clear_error(models):
    model = models["llama"]
    batch = _batch(model)
    store, hooks = saliency_hooks(model, batch, SaliencyConfig(), recompute=True)
    adapter = sal.as_adapter(model)
    with torch.enable_grad(), adapter.hooks(fwd_hooks=hooks):
        embeds = batch.embeds.detach().requires_grad_(True)
        logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids)
        with pytest.raises(SaliencyError, match="was not recomputed"):
            torch.autograd.grad(sal.target_nll(logits, batch).sum(), embeds)


def test_memory_mode_is_validated():
    with pytest.raises(ConfigError, match="'auto', 'normal', 'lean' or 'blockwise'"):
        SaliencyConfig(memory="small")
