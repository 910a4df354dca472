"""Fault injection and bad inputs (STYLE items 2, 3 and 11).

Hooks: the user's own hooks survive a saliency pass; after an exception half-way (in a user
hook, in the loss, in a bad config) no hook is left, and parameters, ``requires_grad`` flags and
training mode are exactly as the caller had them. Bad inputs fail early with messages that say
what was expected.
"""

from __future__ import annotations

import pytest
import torch

from dpc_lens import hook_names
from dpc_lens.errors import ConfigError, HookError, InputError, ModelError, SaliencyError
from dpc_lens.model import ModelAdapter, as_adapter, load_model, tl_version
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model

PIECES = [("question", "ann has 3 apples ."), ("rationale", "so 3 + 2 = 5")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("hyg_llama"), seed=2)


@pytest.fixture(scope="module")
def model(llama_dir):
    """This module's own bridge: tests here change flags and modes (and restore them)."""
    return load_model(llama_dir, device="cpu")


@pytest.fixture()
def batch(model):
    soft = SoftPrompt(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)))
    return PromptBatch.from_pieces(as_adapter(model), [PIECES], soft)


def hook_count(model) -> int:
    """Hooks on the model's hook points; each point once (the bridge's hook_dict lists aliases
    such as blocks.1.hook_resid_pre -> blocks.1.hook_in under both names)."""
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) + len(hp._forward_pre_hooks)
               for hp in points)


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.fixture()
def dirty_flags(model):
    """Put the model in a non-default state (train mode, some weights trainable) so restoring
    is observable; put it back afterwards."""
    params = list(model.parameters())
    for p in params[::3]:
        p.requires_grad_(True)
    model.train()
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in model.modules()]
    yield flags, modes
    for p in params:
        p.requires_grad_(False)
    model.eval()


def assert_flags(model, flags, modes):
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert any(flags) and not all(flags)


# --------------------------------------------------------------------------- (a)
def test_user_hook_survives_and_still_fires(model, batch):
    name = hook_names.resid_pre(1)
    calls = []

    def user_hook(x, hook):
        calls.append(name)

    assert hook_count(model) == 0
    model.add_hook(name, user_hook)
    try:
        res = compute_saliency(model, batch)
        assert calls == [name]  # fired during the saliency pass
        assert hook_count(model) == 1
        assert len(model.hook_dict[name]._forward_hooks) == 1
        with torch.no_grad():
            as_adapter(model).forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
        assert calls == [name, name]  # and still fires afterwards
        # the user's hook did not disturb the numbers
    finally:
        model.hook_dict[name].remove_hooks("fwd")
    assert hook_count(model) == 0
    again = compute_saliency(model, batch)
    torch.testing.assert_close(again.flow_sums, res.flow_sums, atol=0, rtol=0)


# --------------------------------------------------------------------------- (b)
def test_raising_user_hook_inside_users_block(model, batch, dirty_flags):
    flags, modes = dirty_flags
    before = state_copy(model)

    class Boom(RuntimeError):
        pass

    def raising(x, hook):
        raise Boom("user hook failed")

    with pytest.raises(Boom, match="user hook failed"):
        with model.hooks(fwd_hooks=[(hook_names.pattern(1), raising)]):
            compute_saliency(model, batch)
    assert hook_count(model) == 0
    assert_same_state(model, before)
    assert_flags(model, flags, modes)
    assert model.training
    # the model still works and gives the same answer as a clean model state would
    compute_saliency(model, batch)
    assert hook_count(model) == 0
    assert_flags(model, flags, modes)


def test_flags_restored_after_a_clean_pass(model, batch, dirty_flags):
    flags, modes = dirty_flags
    before = state_copy(model)
    compute_saliency(model, batch)
    assert_same_state(model, before)
    assert_flags(model, flags, modes)
    # no weight gradient was allocated by the pass
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- (c)
def test_hook_name_typo_suggests_the_close_match(model):
    with pytest.raises(HookError, match=r"'blocks\.0\.attn\.hook_patern' does not exist.*"
                                        r"Did you mean 'blocks\.0\.attn\.hook_pattern'"):
        hook_names.check_hook_names(model.hook_dict, ["blocks.0.attn.hook_patern"])


def test_bad_hook_name_half_way_through_a_list(model):
    names = [hook_names.pattern(0), "blocks.1.attn.hook_patten", hook_names.pattern(1)]
    with pytest.raises(HookError, match=r"'blocks\.1\.attn\.hook_patten'.*Did you mean"):
        hook_names.check_hook_names(model.hook_dict, names)
    assert hook_count(model) == 0
    hook_names.check_hook_names(model.hook_dict, [names[0], names[2]])  # the good ones pass


def test_bad_layer_raises_before_anything_is_registered(model, batch):
    fired = []
    name = hook_names.resid_pre(0)
    model.add_hook(name, lambda x, hook: fired.append(1))
    try:
        msg = r"SaliencyConfig\.layers: layer index 99 is out of range for a 2-layer model"
        with pytest.raises(ConfigError, match=msg):
            compute_saliency(model, batch, SaliencyConfig(layers=(0, 99)))
        assert fired == []  # no forward pass ran
        assert hook_count(model) == 1  # only the user's
    finally:
        model.hook_dict[name].remove_hooks("fwd")
    with pytest.raises(ConfigError, match="layer 1 appears twice"):
        compute_saliency(model, batch, SaliencyConfig(layers=(1, -1)))
    assert hook_count(model) == 0


# --------------------------------------------------------------------------- (d), (e)
def test_exception_in_custom_loss(model, batch, dirty_flags):
    flags, modes = dirty_flags
    before = state_copy(model)

    def bad_loss(logits, b):
        raise KeyError("loss exploded")

    with pytest.raises(KeyError, match="loss exploded"):
        compute_saliency(model, batch, loss_fn=bad_loss)
    assert hook_count(model) == 0
    assert_same_state(model, before)
    assert_flags(model, flags, modes)


def test_non_scalar_loss(model, batch, dirty_flags):
    flags, modes = dirty_flags
    msg = r"scalar tensor or one value per example \(\[1\]\); got \(2, 3\)"
    with pytest.raises(SaliencyError, match=msg):
        compute_saliency(model, batch, loss_fn=lambda logits, b: logits[0, :2, :3].sum() * torch.ones(2, 3))
    assert hook_count(model) == 0
    assert_flags(model, flags, modes)


def test_non_finite_and_detached_losses(model, batch):
    with pytest.raises(SaliencyError, match="not finite"):
        compute_saliency(model, batch, loss_fn=lambda logits, b: logits.sum() * float("nan"))
    with pytest.raises(SaliencyError, match="does not depend on the model's output"):
        compute_saliency(model, batch, loss_fn=lambda logits, b: torch.tensor(1.0))
    assert hook_count(model) == 0


# --------------------------------------------------------------------------- (f)
def test_under_no_grad_gives_the_same_result(model, batch):
    cfg = SaliencyConfig(keep_full=True, column_targets=("rationale",))
    ref = compute_saliency(model, batch, cfg)
    with torch.no_grad():
        got = compute_saliency(model, batch, cfg)
        assert not torch.is_grad_enabled()  # the engine's enable_grad did not leak out
    torch.testing.assert_close(got.full, ref.full, atol=0, rtol=0)
    torch.testing.assert_close(got.flow_sums, ref.flow_sums, atol=0, rtol=0)
    assert float(ref.full.max()) > 0


# --------------------------------------------------------------------------- bad inputs
def test_soft_prompt_width_mismatch(model):
    with pytest.raises(InputError, match=r"width 16 does not match the model's d_model 32"):
        PromptBatch.from_pieces(as_adapter(model), [PIECES], SoftPrompt(torch.randn(3, 16)))
    with pytest.raises(InputError, match=r"width 16 does not match the model's d_model 32"):
        PromptBatch.from_pieces(as_adapter(model), [PIECES], torch.randn(3, 16))


def test_empty_required_segment(model):
    with pytest.raises(InputError, match=r"Segment 'rationale' is empty; it must hold at least one token"):
        PromptBatch.from_pieces(as_adapter(model), [[("question", "ann"), ("rationale", "")]],
                                required=("rationale",))
    with pytest.raises(InputError, match=r"Segment 'rationale' is required but missing"):
        SegmentLayout({"question": (0, 2)}, 2, required=("rationale",))


def test_overlapping_spans():
    with pytest.raises(InputError, match=r"'a' \(0, 3\) and 'b' \(2, 5\) overlap"):
        SegmentLayout({"a": (0, 3), "b": (2, 5)}, 6)


def test_span_outside_the_sequence():
    with pytest.raises(InputError, match=r"span \(4, 7\) lies outside the sequence of length 6"):
        SegmentLayout({"a": (0, 4), "b": (4, 7)}, 6)
    with pytest.raises(InputError, match="outside the sequence"):
        SegmentLayout({"a": (3, 2)}, 6)


def test_longer_than_n_ctx(tmp_path_factory):
    d = save_tiny_hf_model("llama", tmp_path_factory.mktemp("short_ctx"), n_ctx=16)
    m = load_model(d, device="cpu")
    ad = as_adapter(m)
    assert ad.n_ctx == 16
    long_text = "ann has 3 apples and bob has 4 pens and eve has 5 cats"
    n = len(ad.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert 13 < n <= 16
    PromptBatch.from_pieces(ad, [[("question", long_text)]])  # fits without the soft prompt
    with pytest.raises(InputError, match=rf"is {n + 3} positions long \(soft prompt 3 \+ {n} tokens\)"
                                         r".*n_ctx=16"):
        PromptBatch.from_pieces(ad, [[("question", long_text)]], SoftPrompt(torch.randn(3, 32)))


def test_nan_soft_prompt():
    t = torch.randn(4, 32)
    t[2, 5] = float("nan")
    with pytest.raises(InputError, match=r"NaN or infinite values \(rows \[2\]\)"):
        SoftPrompt(t)


def test_unknown_flow_segment(model, batch):
    with pytest.raises(InputError, match=r"Segment 'answr' appears in no example of the batch; the batch has "
                                         r"\['soft', 'question', 'rationale'\]"):
        compute_saliency(model, batch, SaliencyConfig(flow_segments=("question", "answr")))
    with pytest.raises(InputError, match="'promt' appears in no example"):
        compute_saliency(model, batch, SaliencyConfig(column_targets=("promt",)))
    assert hook_count(model) == 0


def test_non_transformerlens_model():
    msg = r"Expected a TransformerLens TransformerBridge or HookedTransformer, got Linear"
    with pytest.raises(InputError, match=msg):
        as_adapter(torch.nn.Linear(3, 3))


def test_remote_driver_bridge():
    class Driver:
        underlying_model = None

    class RemoteBridge:
        _driver = Driver()
        hook_dict = {"blocks.0.attn.hook_pattern": object()}

    adapter = ModelAdapter(RemoteBridge(), "bridge")
    with pytest.raises(ModelError, match=r"no local torch model \(its driver runs remotely"):
        adapter.check_supported()
    with pytest.raises(ModelError, match="driver runs remotely"):
        _ = adapter.embedding_weight


def test_sdpa_model_is_forced_to_eager_or_refused(llama_dir):
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa")
    assert hf.config._attn_implementation == "sdpa"
    bridge = TransformerBridge.boot_transformers(llama_dir, hf_model=hf, device="cpu")
    for p in bridge.parameters():
        p.requires_grad_(False)
    # TL 4.3 (_driver) / 3.9 (original_model) keep the HF model in different places
    hf_inside = getattr(getattr(bridge, "_driver", None), "underlying_model", None) or bridge.original_model
    assert hf_inside is hf
    adapter_ok = hf.config._attn_implementation == "eager"
    if adapter_ok:
        # TL 4.3 switches a pre-loaded model to eager (SPEC section 5: "the bridge forces it")
        b = PromptBatch.from_pieces(as_adapter(bridge), [PIECES])
        assert float(compute_saliency(bridge, b).flow_sums.abs().sum()) > 0
        # if something switches it back to sdpa, dpc_lens refuses
        hf.config._attn_implementation = "sdpa"
    else:
        assert tl_version() < (4,)  # TL 3.9 keeps the caller's sdpa: dpc_lens must refuse it
    msg = r"attention with 'sdpa'.*eager attention.*attn_implementation='eager'"
    with pytest.raises(ModelError, match=msg):
        as_adapter(bridge)
