"""Corruption invariants (SPEC section 3 step 5; STYLE 7) on tiny offline models.

* corrupting no soft token changes nothing (bit for bit);
* zeroing soft row j equals feeding a zero vector at that position (embeddings built by hand);
* the hook form (:func:`soft_row_hooks`) equals the new-soft-prompt form and composes with a
  user's hook in the same ``hooks()`` block;
* ``mean`` / ``scale`` / gamma elimination give the numbers worked out by hand;
* nothing the caller owns changes: the soft prompt, every model parameter and its
  ``requires_grad`` flag, and the hooks (the autouse fixture in conftest) -- also when a run
  stops with an exception half-way.
"""

from __future__ import annotations

import pytest
import torch

from dpc_lens import hook_names
from dpc_lens.dpc import DPCConfig, run_dpc
from dpc_lens.dpc.detector import DetectorConfig
from dpc_lens.errors import ConfigError, InputError
from dpc_lens.generation import GenerationConfig
from dpc_lens.model import as_adapter
from dpc_lens.patching import (
    CorruptionConfig,
    corrupt_soft_prompt,
    random_rows,
    replacement_rows,
    soft_row_hooks,
)
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks.base import Example

MODELS = ["tiny_llama", "tiny_gpt2", "native_model"]
IDS = [[5, 9, 12, 30, 31, 7], [40, 8, 11]]  # two rows of different lengths (left padding)


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


def soft_for(model, n=4, seed=0) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    return SoftPrompt(torch.randn(n, model.cfg.d_model, generator=g) * 0.5)


def build(adapter, soft, ids=IDS) -> PromptBatch:
    lays = [SegmentLayout({"q": (0, len(s))}, len(s)) for s in ids]
    return PromptBatch.build(adapter, ids, lays, soft)


@torch.no_grad()
def logits(adapter, batch: PromptBatch, hooks=()):
    with adapter.hooks(fwd_hooks=hooks):
        return adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)


def test_corrupting_nothing_changes_nothing(model):
    a = as_adapter(model)
    soft = soft_for(model)
    clean = logits(a, build(a, soft))
    same = corrupt_soft_prompt(soft, [])
    assert same is not soft and torch.equal(same.embeddings, soft.embeddings)
    assert torch.equal(logits(a, build(a, same)), clean)
    hooked = logits(a, build(a, soft), soft_row_hooks(build(a, soft), soft, []))
    assert torch.equal(hooked, clean)


@pytest.mark.parametrize("j", [0, 2])
def test_zeroing_row_equals_feeding_a_zero_vector(model, j):
    a = as_adapter(model)
    soft = soft_for(model)
    ids = IDS[0]
    got = logits(a, build(a, corrupt_soft_prompt(soft, [j]), [ids]))
    # the input built by hand: soft rows with row j a zero vector, then the token embeddings
    e = soft.embeddings
    tok = a.embedding_weight[torch.tensor(ids)]
    embeds = torch.cat([e[:j], torch.zeros(1, e.shape[1]), e[j + 1 :], tok])[None]
    n = embeds.shape[1]
    with torch.no_grad():
        want = a.forward_embeds(embeds, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None])
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    # and it really is a change
    assert not torch.allclose(got, logits(a, build(a, soft, [ids])), atol=1e-4)


def test_hooks_equal_corrupted_soft_prompt_and_compose(model):
    a = as_adapter(model)
    soft = soft_for(model)
    rows = [[1], [0, 3]]  # one row list per example
    cfg = CorruptionConfig(mode="zero")
    clean_batch = build(a, soft)
    # reference: each example run with its own corrupted soft prompt (batched, one per row)
    corrupted = [corrupt_soft_prompt(soft, r, cfg) for r in rows]
    want = logits(a, build(a, corrupted))
    got = logits(a, clean_batch, soft_row_hooks(clean_batch, soft, rows, cfg))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)

    # a user hook in the same block: add a constant vector to the residual entering block 1
    shift = torch.linspace(-0.1, 0.1, model.cfg.d_model)
    seen = []

    def user(resid, hook):
        seen.append(hook.name)
        return resid + shift

    user_hooks = [(hook_names.resid_pre(1), user)]
    want_u = logits(a, build(a, corrupted), user_hooks)
    got_u = logits(a, clean_batch, soft_row_hooks(clean_batch, soft, rows, cfg) + user_hooks)
    assert len(seen) == 2  # once per forward (the bridge reports its own alias as hook.name)
    assert torch.allclose(got_u, want_u, atol=1e-5, rtol=0)
    assert not torch.allclose(got_u, got, atol=1e-4)  # the user hook did act


def test_hooks_with_one_row_list_and_mean_mode(tiny_llama):
    a = as_adapter(tiny_llama)
    soft = soft_for(tiny_llama)
    cfg = CorruptionConfig(mode="mean")
    batch = build(a, soft)
    got = logits(a, batch, soft_row_hooks(batch, soft, [2], cfg))
    want = logits(a, build(a, corrupt_soft_prompt(soft, [2], cfg)))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_hook_raising_half_way_leaves_no_hook_and_no_change(tiny_llama):
    a = as_adapter(tiny_llama)
    soft = soft_for(tiny_llama)
    batch = build(a, soft)
    clean = logits(a, batch)

    def boom(resid, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        logits(a, batch, soft_row_hooks(batch, soft, [0]) + [(hook_names.resid_pre(1), boom)])
    assert torch.equal(logits(a, batch), clean)  # the corruption hook is gone too


def test_hook_errors():
    class FakeBatch:
        n_soft, batch_size, layouts = 3, 2, ()

    with pytest.raises(InputError, match="3 soft positions but the soft prompt has 4 rows"):
        soft_row_hooks(FakeBatch(), torch.zeros(4, 2), [0])
    with pytest.raises(InputError, match=r"one row list per example \(2\), got 3"):
        soft_row_hooks(FakeBatch(), torch.zeros(3, 2), [[0], [1], [2]])


# ------------------------------------------------------------------------------------------
# The replacement numbers, by hand
# ------------------------------------------------------------------------------------------

E = torch.tensor(
    [
        [1.0, -2.0, 3.0],
        [0.5, 4.0, -1.0],
        [-6.0, 0.25, 2.0],
        [2.0, 2.0, -0.75],
    ]
)


def test_zero_mean_scale_by_hand():
    z = replacement_rows(E, [1, -1], CorruptionConfig("zero"))  # -1 is row 3
    assert torch.equal(
        z, torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0], [-6.0, 0.25, 2.0], [0.0, 0.0, 0.0]])
    )
    m = replacement_rows(E, [1, 3], CorruptionConfig("mean"))
    # mean of the other rows 0 and 2: [(1 - 6)/2, (-2 + .25)/2, (3 + 2)/2]
    mean = torch.tensor([-2.5, -0.875, 2.5])
    assert torch.equal(m, torch.stack([E[0], mean, E[2], mean]))
    s = replacement_rows(E, [0], CorruptionConfig("scale", scale=0.5))
    assert torch.equal(s, torch.cat([torch.tensor([[0.5, -1.0, 1.5]]), E[1:]]))
    assert torch.equal(
        replacement_rows(E, [2], CorruptionConfig("scale", scale=0.0)),
        replacement_rows(E, [2], CorruptionConfig("zero")),
    )
    assert torch.equal(E[1], torch.tensor([0.5, 4.0, -1.0]))  # input untouched
    with pytest.raises(InputError, match="at least one soft row left"):
        replacement_rows(E, [0, 1, 2, 3], CorruptionConfig("mean"))
    with pytest.raises(InputError, match="out of range"):
        replacement_rows(E, [4], CorruptionConfig())


def test_gamma_zeroes_the_smallest_remaining_entries_by_hand():
    # zero row 1; the remaining rows 0, 2, 3 hold 9 entries with magnitudes
    #   row 0: 1, 2, 3     row 2: 6, .25, 2     row 3: 2, 2, .75
    # gamma 30%: round(0.3 * 9) = round(2.7) = 3 entries -> the three smallest: .25, .75, 1
    out = replacement_rows(E, [1], CorruptionConfig("zero", gamma=30.0))
    want = torch.tensor(
        [
            [0.0, -2.0, 3.0],
            [0.0, 0.0, 0.0],
            [-6.0, 0.0, 2.0],
            [2.0, 2.0, 0.0],
        ]
    )
    assert torch.equal(out, want)
    # gamma 50%: round(4.5) = 4 (banker's rounding) -> next smallest is one of the four 2's:
    # ties go by position, so the first 2 in row-major order of rows 0, 2, 3: row 0 col 1 (|-2|)
    out = replacement_rows(E, [1], CorruptionConfig("zero", gamma=50.0))
    assert int((out[[0, 2, 3]] == 0).sum()) == 4
    assert out[0, 1] == 0 and out[2, 2] == 2.0 and out[3, 0] == 2.0
    # gamma alone (no row chosen) acts on all 12 entries: 10% -> round(1.2) = 1 -> the .25
    out = replacement_rows(E, [], CorruptionConfig("zero", gamma=10.0))
    assert int((out == 0).sum()) == 1 and out[2, 1] == 0
    with pytest.raises(ConfigError, match="percentage"):
        CorruptionConfig(gamma=150.0)
    with pytest.raises(ConfigError, match="mode"):
        CorruptionConfig(mode="drop")  # type: ignore[arg-type]


def test_random_rows_seeded_and_checked():
    a = random_rows(10, 3, torch.Generator().manual_seed(5))
    b = random_rows(10, 3, torch.Generator().manual_seed(5))
    assert a == b and len(set(a)) == 3 and a == sorted(a) and all(0 <= r < 10 for r in a)
    with pytest.raises(InputError, match="Cannot draw 11 of 10"):
        random_rows(10, 11, torch.Generator())


# ------------------------------------------------------------------------------------------
# Nothing the caller owns changes, also after an exception half-way
# ------------------------------------------------------------------------------------------


def _snapshot(model, soft):
    return (
        soft.embeddings.clone(),
        soft.embeddings.requires_grad,
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.training,
    )


def _assert_unchanged(model, soft, snap):
    emb, emb_rg, params, flags, training = snap
    assert torch.equal(soft.embeddings, emb) and soft.embeddings.requires_grad == emb_rg
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, p in now.items():
        assert torch.equal(p.detach(), params[n]), n
        assert p.requires_grad == flags[n], n
    assert model.training == training


class _Task:
    name = "toy"

    def __init__(self, fail_at_call: int | None = None):
        self.fail_at_call = fail_at_call
        self.calls = 0

    def extract_answer(self, text):
        self.calls += 1
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            raise ValueError("extract_answer failed")
        return text.split()[0] if text.split() else None

    def is_correct(self, prediction, gold):
        return prediction == gold


EXAMPLES = [
    Example(f"e{i}", q, "3")
    for i, q in enumerate(["how many apples", "the cat has 3 pens", "bob buys 2 books", "what is 4 plus 5"])
]
CFG = DPCConfig(
    detector=DetectorConfig(R=0.0),
    generation=GenerationConfig(max_new_tokens=4, batch_size=2),
    baselines=("always",),
)


def test_run_dpc_leaves_soft_prompt_and_model_untouched(tiny_llama):
    soft = soft_for(tiny_llama)
    snap = _snapshot(tiny_llama, soft)
    records, _ = run_dpc(tiny_llama, soft, EXAMPLES, _Task(), CFG, progress=False)
    assert any(r["dpc"]["fired"] for r in records)  # corruption really happened
    _assert_unchanged(tiny_llama, soft, snap)


def test_unchanged_after_on_record_raises(tiny_llama):
    soft = soft_for(tiny_llama, seed=1)
    snap = _snapshot(tiny_llama, soft)
    seen = []

    def stop(record):
        seen.append(record["id"])
        if len(seen) == 3:
            raise KeyboardInterrupt  # like a user pressing Ctrl-C between records

    with pytest.raises(KeyboardInterrupt):
        run_dpc(tiny_llama, soft, EXAMPLES, _Task(), CFG, progress=False, on_record=stop)
    assert seen == ["e0", "e1", "e2"]
    _assert_unchanged(tiny_llama, soft, snap)


def test_unchanged_after_task_raises_and_with_trainable_soft_prompt(tiny_gpt2):
    # a soft prompt that requires grad (fresh from training) keeps its flag and values
    soft = SoftPrompt(soft_for(tiny_gpt2).embeddings.clone().requires_grad_(True))
    snap = _snapshot(tiny_gpt2, soft)
    with pytest.raises(ValueError, match="extract_answer failed"):
        run_dpc(tiny_gpt2, soft, EXAMPLES, _Task(fail_at_call=3), CFG, progress=False)
    _assert_unchanged(tiny_gpt2, soft, snap)
    assert soft.embeddings.grad is None
