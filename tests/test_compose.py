"""Composing saliency with a TransformerLens user's own hooks and habits (issue 18).

The reference throughout is plain torch, written here: a hook on ``hook_pattern`` that keeps the
pattern with ``retain_grad()``, a forward over input embeddings that require grad, a float64 NLL
of every scored token by hand, ``backward()``, and ``I = |sum_h A * dL/dA|`` with the diagonal
zeroed. No dpc_lens reduction is used to build the expected numbers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import dpc_lens as dl
from dpc_lens import hook_names
from dpc_lens.errors import ConfigError, DpcLensWarning, InputError, SaliencyError
from dpc_lens.model import as_adapter, load_model
from dpc_lens.patching import corrupt_soft_prompt, soft_row_hooks
from dpc_lens.saliency import SaliencyConfig, SaliencyResult, compute_saliency, saliency_hooks, target_nll
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model

N_LAYERS = 3
IDS_A = [[5, 9, 12, 30, 31, 7, 22], [40, 8, 11, 13, 17, 19, 23]]
IDS_B = [[6, 10, 14, 33, 35, 9, 21], [41, 18, 12, 16, 20, 24, 26]]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A model exactly as load_model gives it: frozen weights, eval mode."""
    d = save_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"), seed=3, n_layers=N_LAYERS)
    m = load_model(d, device="cpu")
    assert not any(p.requires_grad for p in m.parameters())
    return m


def _text_batch(model, ids) -> PromptBatch:
    lays = [SegmentLayout({"text": (0, len(s))}, len(s)) for s in ids]
    return PromptBatch.build(model, ids, lays)


def _qr_batch(model, ids, soft=None) -> PromptBatch:
    lays = [SegmentLayout({"q": (0, 3), "r": (3, len(s))}, len(s)) for s in ids]
    return PromptBatch.build(model, ids, lays, soft)


def _nll64(logits, token_ids, mask):
    """Per-example mean NLL (float64) of the tokens where ``mask`` is 1, by hand."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = torch.as_tensor(token_ids)[:, 1:].clamp(min=0)
    tok = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    w = mask[:, 1:].double()
    return -(tok * w).sum(-1) / w.sum(-1)


def reference_maps(model, batch, *, fwd_hooks=(), loss_mask=None, patch_leaf=False):
    """``{layer: I [batch, q, k]}`` by plain torch (see the module docstring); layers whose
    pattern got no gradient are left out."""
    adapter = as_adapter(model)
    kept: dict[int, torch.Tensor] = {}

    def grab(p, hook):
        if p.requires_grad:
            p.retain_grad()
            kept[int(hook.name.split(".")[1])] = p

    hooks = list(fwd_hooks) + [(hook_names.pattern(l), grab) for l in range(N_LAYERS)]
    mask = loss_mask if loss_mask is not None else batch.attention_mask
    with adapter.hooks(fwd_hooks=hooks), torch.enable_grad():
        embeds = batch.embeds.detach().requires_grad_(True)
        logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids)
        _nll64(logits, batch.token_ids, mask).sum().backward()
    out = {}
    for l, p in kept.items():
        if p.grad is None:
            continue
        I = (p.detach() * p.grad).sum(1).abs()
        I.diagonal(dim1=-2, dim2=-1).zero_()
        out[l] = I
    return out


def _close(a, b, msg=""):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-10, msg=msg)


def _manual_pass(model, batch, hooks, extra=()):
    """The TransformerLens idiom: hooks on the model, a forward, loss.backward()."""
    adapter = as_adapter(model)
    with adapter.hooks(fwd_hooks=list(hooks) + list(extra)):
        logits = adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
        target_nll(logits, batch, ("text",), dtype=torch.float64).sum().backward()


FULL = SaliencyConfig(keep_full=True, loss_segments=("text",))


# --------------------------------------------------------------- 1. reuse over batches
def test_reused_store_gives_each_pass_its_own_result(frozen):
    a, b = _text_batch(frozen, IDS_A), _text_batch(frozen, IDS_B)
    ref_a, ref_b = reference_maps(frozen, a), reference_maps(frozen, b)
    store, hooks = saliency_hooks(frozen, a, FULL)
    _manual_pass(frozen, a, hooks)
    first = store.result()
    store.set_batch(b)
    _manual_pass(frozen, b, hooks)
    second = store.result()
    assert store.n_passes == 2
    for l in range(N_LAYERS):
        _close(first.full[l], ref_a[l], f"pass 1 layer {l}")
        _close(second.full[l], ref_b[l], f"pass 2 layer {l}")
    assert not torch.allclose(first.full, second.full)  # the batches really differ
    both = store.results()
    assert len(both) == 2
    _close(both[0].full, first.full)
    _close(both[1].full, second.full)
    store.clear()
    with pytest.raises(SaliencyError, match="No forward pass has run"):
        store.result()


def test_a_pass_that_does_not_fit_the_stores_batch_is_refused(frozen):
    a = _text_batch(frozen, IDS_A)
    store, hooks = saliency_hooks(frozen, a, FULL)
    shorter = _text_batch(frozen, [s[:5] for s in IDS_B])
    with pytest.raises(SaliencyError, match=r"shape \(2, \d+, 5, 5\).*set_batch"):
        _manual_pass(frozen, shorter, hooks)


# --------------------------------------------------- 2. independent of the caller's autograd set-up
def test_run_with_hooks_and_backward_on_a_frozen_model_equals_compute_saliency(frozen):
    tokens = torch.tensor(IDS_A)
    batch = _text_batch(frozen, IDS_A)
    store, hooks = saliency_hooks(frozen, batch, FULL)
    logits = frozen.run_with_hooks(tokens, fwd_hooks=hooks)  # TransformerLens's own idiom
    target_nll(logits, batch, ("text",), dtype=torch.float64).sum().backward()
    got = store.result()
    assert all(p.grad is None for p in frozen.parameters())  # no weight gradient allocated
    ref = reference_maps(frozen, batch)
    for l in range(N_LAYERS):
        _close(got.full[l], ref[l], f"layer {l}")
    _close(compute_saliency(frozen, tokens, FULL).full, got.full)


# ------------------------------------------------------------------ 3. one diagnosis per cause
def test_result_before_any_pass(frozen):
    store, _ = saliency_hooks(frozen, _text_batch(frozen, IDS_A), FULL)
    with pytest.raises(SaliencyError, match="No forward pass has run through these saliency hooks"):
        store.result()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_hooks_are_inert_with_gradients_off(frozen, mode):
    batch = _text_batch(frozen, IDS_A)
    store, hooks = saliency_hooks(frozen, batch, FULL)
    adapter = as_adapter(frozen)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx, adapter.hooks(fwd_hooks=hooks):
        hooked = adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
    with torch.no_grad():
        plain = adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
    assert torch.equal(hooked, plain)
    want = "torch.inference_mode()" if mode == "inference_mode" else r"torch.no_grad\(\)"
    with pytest.raises(SaliencyError, match=f"always with gradients off, under {want}"):
        store.result()


def test_leftover_hooks_leave_generation_unchanged_and_say_reset_hooks(frozen):
    batch = _text_batch(frozen, IDS_A)
    store, hooks = saliency_hooks(frozen, batch, FULL)
    cfg = dl.GenerationConfig(max_new_tokens=4)
    plain = [g.token_ids for g in dl.generate(frozen, IDS_A, config=cfg, progress=False)]
    try:
        for name, fn in hooks:  # added and never removed
            frozen.add_hook(name, fn)
        again = [g.token_ids for g in dl.generate(frozen, IDS_A, config=cfg, progress=False)]
        assert again == plain
        adapter = as_adapter(frozen)
        with pytest.raises(SaliencyError, match=r"still registered during generation.*reset_hooks\(\)"):
            adapter.forward_embeds(batch.embeds[:, :4], batch.attention_mask[:, :4],
                                   batch.position_ids[:, :4])
    finally:
        frozen.reset_hooks()


def test_forward_without_backward(frozen):
    batch = _text_batch(frozen, IDS_A)
    store, hooks = saliency_hooks(frozen, batch, FULL)
    adapter = as_adapter(frozen)
    with adapter.hooks(fwd_hooks=hooks):
        adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
    with pytest.raises(SaliencyError, match="no backward pass reached the patterns"):
        store.result()


def _cache_resid(model, batch, layer):
    adapter = as_adapter(model)
    seen = {}
    keep = [(hook_names.resid_pre(layer), lambda r, hook: seen.setdefault(0, r.clone()))]
    with torch.no_grad(), adapter.hooks(fwd_hooks=keep):
        adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
    return seen[0]


@pytest.mark.parametrize("keep_grad", [False, True])
def test_a_callers_detaching_hook_is_named_in_the_hooks_path(frozen, keep_grad):
    batch = _text_batch(frozen, IDS_A)
    cached = _cache_resid(frozen, batch, 1)
    store, hooks = saliency_hooks(frozen, batch, FULL)
    # a detached patch from a cache (or one made a new leaf with requires_grad_)
    patch = (hook_names.resid_pre(1),
             lambda r, hook: cached.clone().requires_grad_(True) if keep_grad else cached)
    _manual_pass(frozen, batch, hooks, [patch])
    with pytest.raises(SaliencyError, match=r"Layers \[0\].*'blocks.1.hook_resid_pre.*layers=\[1, 2\]"):
        store.result()


def test_pattern_hook_off_the_loss_path(frozen):
    """A model that only reports its pattern to hook_pattern and computes attention elsewhere
    (SPEC section 5): simulated by a later hook on layer 1's pattern that hands on a copy."""
    batch = _text_batch(frozen, IDS_A)
    store, hooks = saliency_hooks(frozen, batch, FULL)
    elsewhere = (hook_names.pattern(1), lambda p, hook: p.detach().clone())
    _manual_pass(frozen, batch, hooks, [elsewhere])
    with pytest.raises(SaliencyError, match=r"Layers \[1\].*backward pass ran.*not on the path to the "
                       r"loss.*layers=\[0, 2\]"):
        store.result()


# ---------------------------------------------------------------------- 4. fwd_hooks=
def _ablate_head0(p, hook):
    p = p.clone()
    p[:, 0] = 0.0
    return p


def test_fwd_hooks_equal_the_model_hooks_wrap_and_the_reference(frozen):
    batch = _text_batch(frozen, IDS_A)
    mine = [(hook_names.pattern(1), _ablate_head0)]
    got = compute_saliency(frozen, batch, FULL, fwd_hooks=mine)
    with frozen.hooks(fwd_hooks=mine):
        wrapped = compute_saliency(frozen, batch, FULL)
    _close(got.full, wrapped.full)
    ref = reference_maps(frozen, batch, fwd_hooks=mine)
    for l in range(N_LAYERS):
        _close(got.full[l], ref[l], f"layer {l}")
    assert not torch.allclose(got.full, compute_saliency(frozen, batch, FULL).full)


def test_fwd_hooks_compose_with_soft_row_hooks(frozen):
    g = torch.Generator().manual_seed(0)
    soft = SoftPrompt(torch.randn(3, frozen.cfg.d_model, generator=g) * 0.5)
    cfg = SaliencyConfig(loss_segments=("r",))
    clean = _qr_batch(frozen, IDS_A, soft)
    got = compute_saliency(frozen, clean, cfg, fwd_hooks=soft_row_hooks(clean, soft, [1]))
    want = compute_saliency(frozen, _qr_batch(frozen, IDS_A, corrupt_soft_prompt(soft, [1])), cfg)
    _close(got.flow_sums, want.flow_sums)
    assert not torch.allclose(got.flow_sums, compute_saliency(frozen, clean, cfg).flow_sums)


@pytest.mark.parametrize("keep_grad", [False, True])
def test_full_detached_residual_patch(frozen, keep_grad):
    batch = _text_batch(frozen, IDS_A)
    cached = _cache_resid(frozen, batch, 1)  # the clean residual: values unchanged by the patch

    def patch(r, hook):
        return cached.clone().requires_grad_(True) if keep_grad else cached

    later = SaliencyConfig(layers=[1, 2], keep_full=True, loss_segments=("text",))
    got = compute_saliency(frozen, batch, later, fwd_hooks=[(hook_names.resid_pre(1), patch)])
    # dL/dA of layers after the patch does not depend on what is upstream of the patch
    ref = reference_maps(frozen, batch)
    _close(got.full[0], ref[1])
    _close(got.full[1], ref[2])
    # a patch from another input changes them (the test can fail)
    other = _cache_resid(frozen, _text_batch(frozen, IDS_B), 1)
    swap = [(hook_names.resid_pre(1), lambda r, hook: other)]
    moved = compute_saliency(frozen, batch, later, fwd_hooks=swap)
    assert not torch.allclose(moved.full, got.full)
    with pytest.raises(SaliencyError, match=r"Layers \[0\].*your hook 'blocks.1.hook_resid_pre'.*"
                       r"layers=\[1, 2\]"):
        compute_saliency(frozen, batch, FULL, fwd_hooks=[(hook_names.resid_pre(1), patch)])


def test_fwd_hooks_are_validated(frozen):
    batch = _text_batch(frozen, IDS_A)
    good = (hook_names.pattern(0), _ablate_head0)
    with pytest.raises(dl.HookError, match="hook_resid_pre"):  # half-way through the list
        compute_saliency(frozen, batch, FULL, fwd_hooks=[good, ("blocks.1.hook_resid_pree", _ablate_head0)])
    with pytest.raises(InputError, match=r"\(hook_name, fn\) pair"):
        compute_saliency(frozen, batch, FULL, fwd_hooks=[hook_names.resid_pre(1)])


def test_a_callers_hook_that_raises_leaves_the_model_as_found(frozen):
    batch = _text_batch(frozen, IDS_A)
    flags = [p.requires_grad for p in frozen.parameters()]

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compute_saliency(frozen, batch, FULL, fwd_hooks=[(hook_names.pattern(0), _ablate_head0),
                                                         (hook_names.resid_pre(2), boom)])
    assert [p.requires_grad for p in frozen.parameters()] == flags
    assert not any(hp.fwd_hooks for hp in frozen.hook_dict.values())
    _close(compute_saliency(frozen, batch, FULL).full, compute_saliency(frozen, batch, FULL).full)


# ------------------------------------------------------------------- 5. segment groups
def _hand_result(per_head=False):
    """A hand-built result over one example of 10 positions: spans label0 (1), label1 (3),
    label2 (2), target (2), filler around them."""
    spans = {"pre": (0, 1), "label0": (1, 2), "mid": (2, 3), "label1": (3, 6), "label2": (6, 8),
             "target": (8, 10)}
    names = tuple(spans)
    g = torch.Generator().manual_seed(5)
    I = torch.rand(10, 10, generator=g, dtype=torch.float64).tril(-1)  # causal, no diagonal
    S = len(names)
    sums = torch.zeros(1, 1, S, S, dtype=torch.float64)
    counts = torch.zeros(1, S, S)
    for ti, tn in enumerate(names):
        for si, sn in enumerate(names):
            for i in range(*spans[tn]):
                for j in range(*spans[sn]):
                    if j < i:
                        sums[0, 0, ti, si] += I[i, j]
                        counts[0, ti, si] += 1
    res = SaliencyResult(config=SaliencyConfig(), layers=(0,), segment_names=names,
                         layouts=(SegmentLayout(spans, 10),), flow_sums=sums, pair_counts=counts,
                         loss=torch.zeros(1))
    return res, I, spans


def _pooled_by_hand(I, spans, sources, targets):
    tot, n = 0.0, 0
    for t in targets:
        for s in sources:
            for i in range(*spans[t]):
                for j in range(*spans[s]):
                    if j < i:
                        tot += float(I[i, j])
                        n += 1
    return tot / n


def test_group_flow_pools_every_pair_exactly():
    res, I, spans = _hand_result()
    labels = ["label0", "label1", "label2"]
    want = _pooled_by_hand(I, spans, labels, ["target"])
    assert float(res.flow(labels, "target")) == pytest.approx(want, rel=1e-12)
    # not the mean of per-span means (spans of 1, 3 and 2 tokens): the test can tell them apart
    means = sum(float(res.flow(x, "target")) for x in labels) / 3
    assert abs(means - want) > 1e-3
    assert float(res.flow("label0+label1+label2", "target")) == pytest.approx(want, rel=1e-12)
    grouped = res.with_groups({"label": labels})
    assert float(grouped.flow("label", "target")) == pytest.approx(want, rel=1e-12)
    # a group to itself pools the pairs between its members too (label0 -> label1, ...)
    self_want = _pooled_by_hand(I, spans, labels, labels)
    assert float(grouped.flow("label", "label")) == pytest.approx(self_want, rel=1e-12)
    # S_wp (text -> label words), S_pq (label words -> target), S_ww (the rest) as proportions
    props = grouped.proportions(["pre+mid->label", "label->target", "pre+mid->target"])
    raw = [_pooled_by_hand(I, spans, ["pre", "mid"], labels), want,
           _pooled_by_hand(I, spans, ["pre", "mid"], ["target"])]
    for (k, v), r in zip(props.items(), raw):
        assert float(v) == pytest.approx(r / sum(raw), rel=1e-12), k
    assert grouped.pair_count("label", "target").tolist() == [2 * (1 + 3 + 2)]
    df = grouped.to_dataframe()
    row = df[(df.flow == "label->target")].iloc[0]
    assert row["count"] == 2 * (1 + 3 + 2) and row["mean"] == pytest.approx(want, rel=1e-12)


def test_group_flows_reach_the_figure_data():
    from dpc_lens.plotting.saliency import flow_curve_data

    res, I, spans = _hand_result()
    grouped = res.with_groups({"label": ["label0", "label1", "label2"]})
    data = flow_curve_data(grouped, names=["label->target", "pre->label"])
    a = _pooled_by_hand(I, spans, ["label0", "label1", "label2"], ["target"])
    b = _pooled_by_hand(I, spans, ["pre"], ["label0", "label1", "label2"])
    assert data.names == ("label->target", "pre->label")
    assert float(data.center["label->target"][0]) == pytest.approx(a / (a + b), rel=1e-9)


def test_group_errors_name_the_segments():
    res, _, _ = _hand_result()
    with pytest.raises(InputError, match="Unknown segment 'lable0'.*Did you mean 'label0'"):
        res.flow(["lable0", "label1"], "target")
    with pytest.raises(InputError, match="already a segment"):
        res.with_groups({"target": ["label0"]})


def test_causally_forbidden_flow_warns_with_both_segments():
    res, _, _ = _hand_result()
    with pytest.warns(DpcLensWarning, match=r"target->label0 is NaN.*every 'label0' token comes before"):
        v = res.flow("target", "label0")
    assert math.isnan(float(v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res.flow("label0", "target")  # allowed: no warning


def test_tokens_are_kept_and_saved(frozen, tmp_path):
    tok = frozen.tokenizer
    res = compute_saliency(frozen, "ann has 3 pens", SaliencyConfig())
    ids = [tok.bos_token_id] + list(tok("ann has 3 pens", add_special_tokens=False)["input_ids"])
    assert res.tokens == (tuple(tok.decode([i]) for i in ids),)
    grouped = res.with_groups({"all": ["text"]})
    back = SaliencyResult.load(grouped.save(tmp_path / "s"))
    assert back.tokens == res.tokens and back.groups == {"all": ("text",)}


# ---------------------------------------------------------------- 6. text and token entry
def test_text_and_token_ids_build_the_one_segment_batch(frozen):
    tok = frozen.tokenizer
    text = "bob gives 2 more pens"
    ids = [tok.bos_token_id] + list(tok(text, add_special_tokens=False)["input_ids"])
    from_text = compute_saliency(frozen, text, SaliencyConfig(keep_full=True))
    from_ids = compute_saliency(frozen, torch.tensor(ids), SaliencyConfig(keep_full=True))
    assert from_text.segment_names == ("text",)
    ref = reference_maps(frozen, _text_batch(frozen, [ids]))  # NLL of every next token
    for l in range(N_LAYERS):
        _close(from_text.full[l], ref[l], f"layer {l}")
        _close(from_ids.full[l], ref[l], f"layer {l}")
    by_hand = _nll64(frozen(torch.tensor([ids])).detach(), [ids], torch.ones(1, len(ids)))
    torch.testing.assert_close(from_text.loss.double(), by_hand, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 7. bad inputs of item 5
def test_batch_built_under_inference_mode_just_works(frozen):
    with torch.inference_mode():
        inf = _text_batch(frozen, IDS_A)
    got = compute_saliency(frozen, inf, FULL)
    _close(got.full, compute_saliency(frozen, _text_batch(frozen, IDS_A), FULL).full)


def test_compute_saliency_inside_inference_mode_says_so(frozen):
    batch = _text_batch(frozen, IDS_A)
    with torch.inference_mode(), pytest.raises(SaliencyError, match="inside torch.inference_mode"):
        compute_saliency(frozen, batch, FULL)


def test_config_as_a_dict(frozen):
    batch = _text_batch(frozen, IDS_A)
    got = compute_saliency(frozen, batch, {"keep_full": True, "loss_segments": ["text"]})
    _close(got.full, compute_saliency(frozen, batch, FULL).full)
    with pytest.raises(ConfigError, match="keep_ful"):
        compute_saliency(frozen, batch, {"keep_ful": True})
    with pytest.raises(ConfigError, match="a SaliencyConfig or a dict"):
        compute_saliency(frozen, batch, ["deep"])


def test_loss_segment_in_no_example_is_named(frozen):
    batch = _qr_batch(frozen, IDS_A)
    with pytest.raises(InputError, match=r"segments \['q', 'r'\].*Segment 'rr' exists in no example.*"
                       r"Did you mean 'r'"):
        compute_saliency(frozen, batch, SaliencyConfig(loss_segments=("rr",)))


def test_all_unknown_text_warns(frozen):
    tok = frozen.tokenizer
    assert tok("zzqx", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    with pytest.warns(DpcLensWarning, match="unknown token"):
        compute_saliency(frozen, "zzqx zzqx", SaliencyConfig())
    with pytest.warns(DpcLensWarning, match="Piece 'question'"):
        PromptBatch.from_pieces(frozen, [[("bos", [tok.bos_token_id]), ("question", "zzqx")]])


def test_reprs_show_shapes_and_names_not_tensors(frozen):
    batch = _qr_batch(frozen, IDS_A)
    res = compute_saliency(frozen, batch, SaliencyConfig(loss_segments=("r",), keep_full=True))
    for r in (repr(batch), repr(res)):
        assert "tensor(" not in r and len(r) < 400
    assert "batch=2" in repr(batch) and "['q', 'r']" in repr(batch)
    assert "layers=[0, 1, 2]" in repr(res) and "['q', 'r']" in repr(res)


# -------------------------------------------------------------------- 8. the float64 loss
def test_float64_loss_rows_give_a_more_exact_logit_gradient():
    """dL/dlogits of the mean NLL is ``(softmax - onehot) / n`` per scored row; over a large
    vocabulary with large logits a float32 log-softmax loses digits there, float64 does not."""
    g = torch.Generator().manual_seed(0)
    T, V = 6, 49152
    logits = (torch.randn(1, T, V, generator=g) * 12).requires_grad_(True)
    batch = _fake_batch(T)
    exact = torch.softmax(logits.detach().double()[0, :-1], -1)
    exact[torch.arange(T - 1), batch.token_ids[0, 1:]] -= 1.0
    exact /= T - 1
    errs = {}
    for dt in (None, torch.float64):
        (grad,) = torch.autograd.grad(target_nll(logits, batch, ("text",), dtype=dt).sum(), logits)
        errs[dt] = float((grad[0, :-1].double() - exact).abs().max() / exact.abs().max())
    assert errs[torch.float64] < errs[None] / 2, errs
    assert errs[torch.float64] < 1e-7
    assert SaliencyConfig().loss_fp64 is True


def _fake_batch(T):
    ids = torch.tensor([[(97 * k) % 49152 for k in range(T)]])
    return PromptBatch(torch.zeros(1, T, 2), torch.ones(1, T, dtype=torch.long),
                       torch.arange(T)[None], ids, (SegmentLayout({"text": (0, T)}, T),), (0,), 0)


def test_heatmap_data_labels_itself_with_the_tokens(frozen):
    from dpc_lens.plotting.saliency import heatmap_data

    tok = frozen.tokenizer
    soft = SoftPrompt(torch.zeros(2, frozen.cfg.d_model))
    pieces = [[("q", "ann has"), ("r", " 3 pens")], [("q", "bob"), ("r", " 2")]]
    batch = PromptBatch.from_pieces(frozen, pieces, soft)
    res = compute_saliency(frozen, batch, SaliencyConfig(keep_full=True, loss_segments=("r",)))
    data = heatmap_data(res, example=1)  # left-padded: the crop drops the pads
    words = [tok.decode([i]) for i in tok("bob", add_special_tokens=False)["input_ids"]
             + tok(" 2", add_special_tokens=False)["input_ids"]]
    assert data.tokens == ("<soft 0>", "<soft 1>", *words)
    assert len(data.tokens) == data.matrix.shape[0]


@pytest.mark.parametrize("missing", ["get_gradient_edge", "_current_graph_task_id"])
def test_older_torch_without_the_private_hooks_gives_the_same_saliency(frozen, monkeypatch, missing):
    """torch 2.1 (the floor) has no gradient edges; the graph-task id is private API (torch's
    own non-reentrant checkpoint needs it, so lean mode is checked only with the edges gone)."""
    batch = _text_batch(frozen, IDS_A)
    modes = ("normal", "lean") if missing == "get_gradient_edge" else ("normal",)
    want = {m: compute_saliency(frozen, batch, dataclasses.replace(FULL, memory=m)).full for m in modes}
    monkeypatch.delattr(torch.autograd.graph if missing == "get_gradient_edge" else torch._C, missing)
    for m in modes:
        _close(compute_saliency(frozen, batch, dataclasses.replace(FULL, memory=m)).full, want[m])


def test_same_shape_batch_without_set_batch_is_refused_not_silently_wrong(frozen):
    """The trap of issue 18: one (store, hooks) pair, a second batch of the same shape, no
    set_batch. The pass must not be reduced with the first batch's segments."""
    a, b = _text_batch(frozen, IDS_A), _text_batch(frozen, IDS_B)
    store, hooks = saliency_hooks(frozen, a, FULL)
    _manual_pass(frozen, a, hooks)
    _manual_pass(frozen, a, hooks)  # the same input again is fine
    assert store.n_passes == 2
    with pytest.raises(SaliencyError, match=r"different input than the store.s batch.*set_batch"):
        _manual_pass(frozen, b, hooks)
    assert store.n_passes == 2  # the refused forward started no pass
    store.set_batch(b)
    _manual_pass(frozen, b, hooks)
    ref_b = reference_maps(frozen, b)
    for l in range(N_LAYERS):
        _close(store.result().full[l], ref_b[l], f"layer {l}")
    # the TransformerLens idiom over token batches refuses the same way
    store2, hooks2 = saliency_hooks(frozen, a, FULL)
    frozen.run_with_hooks(torch.tensor(IDS_A), fwd_hooks=hooks2)
    with pytest.raises(SaliencyError, match="different input"):
        frozen.run_with_hooks(torch.tensor(IDS_B), fwd_hooks=hooks2)
