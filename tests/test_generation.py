"""Generation through dpc_lens equals the model's own greedy decoding on the same inputs.

References are independent of dpc_lens: Hugging Face ``model.generate(do_sample=False)`` on the
same token ids, and a hand-written greedy loop over the Hugging Face forward with
``inputs_embeds`` when a soft prompt is prepended (no cache, full re-run every step). The tiny
checkpoints get their weights spread out (seeded noise) so greedy decoding does not collapse
into one repeated token, which would make every comparison trivially true.
"""

from __future__ import annotations

import pytest
import torch

from dpc_lens.errors import InputError
from dpc_lens.generation import GenerationConfig, encode_prompts, generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model

ARCHS = ["gpt2", "llama", "opt"]


PROMPTS = ["how many apples", "the cat has 3 pens and 2 books", "bob"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on shared CPUs run ~5x faster on one thread (no oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (directory, HF model, dpc_lens-loaded bridge) with varied weights."""
    from transformers import AutoModelForCausalLM

    out = {}
    for k, arch in enumerate(ARCHS):
        d = save_tiny_hf_model(arch, tmp_path_factory.mktemp(arch), seed=k)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() >= 2:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        hf.save_pretrained(d)
        hf.eval()
        out[arch] = (d, hf, load_model(d, device="cpu"))
    return out


def hf_new_tokens_until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_greedy_equals_hf_generate(checkpoints, arch):
    _, hf, model = checkpoints[arch]
    tok = model.tokenizer
    cfg = GenerationConfig(max_new_tokens=10)
    ids = encode_prompts(as_adapter(model), PROMPTS, add_bos=True)
    ours = generate(model, ids, None, cfg, progress=False)
    distinct = set()
    for p, g in zip(ids, ours):
        x = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=10,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = ref[0, len(p) :].tolist()
        assert list(g.token_ids) == hf_new_tokens_until_eos(new, tok.eos_token_id)
        assert g.stop_reason == ("eos" if tok.eos_token_id in new else "max_new_tokens")
        assert g.text == tok.decode(list(g.token_ids), skip_special_tokens=True)
        distinct |= set(g.token_ids)
    assert len(distinct) > 3  # the comparison is not between two runs of one repeated token


def hf_greedy_with_embeds(hf, soft: torch.Tensor, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Reference: re-run the HF forward over [soft; tokens so far] and take the argmax."""
    emb = hf.get_input_embeddings()
    x = torch.cat([soft, emb(torch.tensor(ids))])[None]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).logits
            t = int(logits[0, -1].argmax())
            if eos is not None and t == eos:
                break
            out.append(t)
            x = torch.cat([x, emb(torch.tensor([[t]]))], dim=1)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_soft_prompt_greedy_equals_hand_loop_over_hf(checkpoints, arch):
    _, hf, model = checkpoints[arch]
    g = torch.Generator().manual_seed(7)
    soft = SoftPrompt(torch.randn(3, model.cfg.d_model, generator=g) * 0.3)
    ids = encode_prompts(as_adapter(model), PROMPTS[:2], add_bos=True)
    for use_cache in (True, False):
        ours = generate(
            model, ids, soft, GenerationConfig(max_new_tokens=8, use_kv_cache=use_cache), progress=False
        )
        for p, o in zip(ids, ours):
            want = hf_greedy_with_embeds(hf, soft.embeddings, p, 8, model.tokenizer.eos_token_id)
            assert list(o.token_ids) == want, (arch, use_cache)


@pytest.mark.parametrize("which", ["llama", "gpt2", "native"])
def test_batched_equals_one_by_one_and_cache_equals_no_cache(checkpoints, native_model, which):
    model = native_model if which == "native" else checkpoints[which][2]
    g = torch.Generator().manual_seed(3)
    soft = SoftPrompt(torch.randn(2, model.cfg.d_model, generator=g) * 0.3)
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False, batch_size=8)
    batched = generate(model, PROMPTS, soft, cfg, add_bos=True, progress=False)
    alone = [generate(model, [p], soft, cfg, add_bos=True, progress=False)[0] for p in PROMPTS]
    assert batched == alone
    no_cache = generate(
        model,
        PROMPTS,
        soft,
        GenerationConfig(max_new_tokens=8, stop_at_eos=False, use_kv_cache=False),
        add_bos=True,
        progress=False,
    )
    assert no_cache == batched
    # batches of 2 (the last one holds one prompt) give the same as one batch of 3
    assert (
        generate(
            model,
            PROMPTS,
            soft,
            GenerationConfig(max_new_tokens=8, stop_at_eos=False, batch_size=2),
            add_bos=True,
            progress=False,
        )
        == batched
    )


def test_per_prompt_soft_prompts(checkpoints):
    model = checkpoints["llama"][2]
    g = torch.Generator().manual_seed(4)
    a = SoftPrompt(torch.randn(2, model.cfg.d_model, generator=g))
    b = SoftPrompt(torch.randn(2, model.cfg.d_model, generator=g))
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    both = generate(model, PROMPTS[:2], [a, b], cfg, progress=False)
    assert both == [
        generate(model, [PROMPTS[0]], a, cfg, progress=False)[0],
        generate(model, [PROMPTS[1]], b, cfg, progress=False)[0],
    ]
    with pytest.raises(InputError, match="2 soft prompts for 3 prompts"):
        generate(model, PROMPTS, [a, b], cfg, progress=False)


def test_stop_strings_cut_the_text(checkpoints):
    model = checkpoints["llama"][2]
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    full = generate(model, [PROMPTS[1]], None, cfg, progress=False)[0]
    words = full.text.split()
    assert len(words) >= 4
    stop = words[3]  # a word from the middle; cut where it first appears
    cut = full.text[: full.text.find(stop)]
    got = generate(
        model,
        [PROMPTS[1]],
        None,
        GenerationConfig(max_new_tokens=12, stop_at_eos=False, stop_strings=(stop, "never-there")),
        progress=False,
    )[0]
    assert got.stop_reason == "stop_string"
    assert got.text == cut and stop not in got.text
    assert len(got.token_ids) < len(full.token_ids)
    assert list(got.token_ids) == list(full.token_ids[: len(got.token_ids)])


def test_eos_stops(checkpoints):
    """Make the 3rd greedy token the EOS of a second copy of the model: generation stops there."""
    d, _, model = checkpoints["llama"]
    full = generate(
        model, [PROMPTS[0]], None, GenerationConfig(max_new_tokens=10, stop_at_eos=False), progress=False
    )[0]
    other = load_model(d, device="cpu")
    target = full.token_ids[2]
    other.tokenizer.eos_token = other.tokenizer.convert_ids_to_tokens(target)
    assert other.tokenizer.eos_token_id == target
    first = list(full.token_ids).index(target)
    got = generate(other, [PROMPTS[0]], None, GenerationConfig(max_new_tokens=10), progress=False)[0]
    assert got.stop_reason == "eos"
    assert list(got.token_ids) == list(full.token_ids[:first])  # EOS itself is not output
    ignore = generate(
        other, [PROMPTS[0]], None, GenerationConfig(max_new_tokens=10, stop_at_eos=False), progress=False
    )[0]
    assert ignore.token_ids == full.token_ids


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_respected(checkpoints, n):
    model = checkpoints["llama"][2]
    out = generate(
        model, PROMPTS, None, GenerationConfig(max_new_tokens=n, stop_at_eos=False), progress=False
    )
    assert all(len(g.token_ids) == n and g.stop_reason == "max_new_tokens" for g in out)


def test_n_ctx_overflow_is_an_input_error(checkpoints, native_model):
    for model in (checkpoints["gpt2"][2], native_model):
        n_ctx = model.cfg.n_ctx
        ids = [[5] * (n_ctx - 4)]
        with pytest.raises(InputError, match=f"n_ctx={n_ctx}"):
            generate(model, ids, None, GenerationConfig(max_new_tokens=10), progress=False)
        # exactly filling the context is fine
        out = generate(
            model, ids, None, GenerationConfig(max_new_tokens=4, stop_at_eos=False), progress=False
        )
        assert len(out[0].token_ids) == 4


def test_sampling_is_deterministic_for_a_seed(checkpoints):
    model = checkpoints["llama"][2]

    def run(seed):
        cfg = GenerationConfig(
            max_new_tokens=10, do_sample=True, temperature=3.0, seed=seed, stop_at_eos=False
        )
        return [g.token_ids for g in generate(model, PROMPTS, None, cfg, progress=False)]

    a, b, c = run(11), run(11), run(12)
    assert a == b
    assert a != c  # 30 tokens drawn at temperature 3 over ~130 words: equal by chance ~never
    greedy = [
        g.token_ids
        for g in generate(
            model, PROMPTS, None, GenerationConfig(max_new_tokens=10, stop_at_eos=False), progress=False
        )
    ]
    top1 = GenerationConfig(max_new_tokens=10, do_sample=True, top_k=1, seed=5, stop_at_eos=False)
    assert [g.token_ids for g in generate(model, PROMPTS, None, top1, progress=False)] == greedy


# ------------------------------------------------------------------ the KV cache is really used
def _positions_fed(model, **gen_kwargs):
    """Sequence length entering block 0 at every forward pass of one dpc_lens generate call."""
    seen: list[int] = []

    def record(x, hook):
        seen.append(int(x.shape[1]))

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", record)]):
        cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False, **gen_kwargs)
        out = generate(model, [[5, 6, 7, 8, 9]], None, cfg, progress=False)
    return seen, out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_decoding_feeds_one_token_per_step_and_equals_full_rerun(checkpoints, arch):
    """A decode step after the prefill feeds exactly one position (the cached path is taken,
    whatever keyword name the installed transformers uses for the cache), and the tokens equal
    a full re-run of the whole sequence every step."""
    model = checkpoints[arch][2]
    assert as_adapter(model).supports_kv_cache
    cached_lens, cached = _positions_fed(model)
    assert cached_lens == [5, 1, 1, 1, 1, 1]
    assert all(g.kv_cache for g in cached)
    full_lens, full = _positions_fed(model, use_kv_cache=False)
    assert full_lens == [5, 6, 7, 8, 9, 10]
    assert not any(g.kv_cache for g in full)
    assert [g.token_ids for g in cached] == [g.token_ids for g in full]


def test_a_cache_that_stays_empty_is_detected_and_not_used(tmp_path, monkeypatch):
    """When a prefill hands back an empty cache (what TransformerLens 4.3 + transformers 5.24 did
    without the keyword rename), dpc_lens says so, decodes by full re-runs and gets the right
    tokens, instead of decoding garbage from the empty cache."""
    from transformers import DynamicCache

    from dpc_lens.model import ModelAdapter

    path = save_tiny_hf_model("llama", tmp_path / "m", seed=1)
    model = load_model(str(path), device="cpu")
    real_prefill = ModelAdapter.prefill

    def empty_cache_prefill(self, *args, **kwargs):
        logits, _ = real_prefill(self, *args, **kwargs)
        return logits, DynamicCache()

    monkeypatch.setattr(ModelAdapter, "prefill", empty_cache_prefill)
    want = generate(model, [[5, 6, 7]], None, GenerationConfig(max_new_tokens=5, stop_at_eos=False,
                                                                  use_kv_cache=False), progress=False)
    assert not as_adapter(model).supports_kv_cache
    with pytest.warns(RuntimeWarning, match="re-runs the whole sequence"):
        got = generate(model, [[5, 6, 7]], None, GenerationConfig(max_new_tokens=5, stop_at_eos=False),
                       progress=False)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert not got[0].kv_cache


def test_greedy_batches_are_formed_by_length_and_results_come_back_in_input_order(checkpoints, monkeypatch):
    """Length buckets: rows are batched shortest first (little padding); each row's result is
    what it generates alone, returned in the caller's order, per-row soft prompts included."""
    import dpc_lens.generation as gen_mod

    model = checkpoints["llama"][2]
    prompts = [[5] * 9, [6] * 2, [7] * 7, [8] * 3]
    g = torch.Generator().manual_seed(9)
    softs = [SoftPrompt(torch.randn(2, model.cfg.d_model, generator=g) * 0.3) for _ in prompts]
    cfg = GenerationConfig(max_new_tokens=4, stop_at_eos=False, batch_size=2)
    alone = [generate(model, [p], [s], cfg, progress=False)[0] for p, s in zip(prompts, softs)]
    seen: list[list[int]] = []
    real = gen_mod._generate_batch

    def spy(adapter, seqs, soft, cfg_, gen):
        seen.append([len(x) for x in seqs])
        return real(adapter, seqs, soft, cfg_, gen)

    monkeypatch.setattr(gen_mod, "_generate_batch", spy)
    assert generate(model, prompts, softs, cfg, progress=False) == alone
    assert seen == [[2, 3], [7, 9]]


# ------------------------------------------- decoding on the wrapped modules (the fast path)
def test_direct_decoding_path_is_taken_only_when_exact_and_unhooked(checkpoints):
    """Without hooks, a bridge whose components reproduce its Hugging Face modules bit for bit
    decodes on those modules directly (same tokens, no per-module bridge overhead); a hook on
    any hook point keeps the bridge path, and the hook fires."""
    model = checkpoints["llama"][2]
    adapter = as_adapter(model)
    with adapter.decoding_session() as fast:
        assert fast
        assert not any("Bridge" in type(m).__name__ for m in adapter._hf_model.model.layers)
    assert all("Bridge" in type(m).__name__ for m in adapter._hf_model.model.layers)  # restored
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    direct = generate(model, PROMPTS, None, cfg, progress=False)
    fired = []

    def spy(x, hook):
        fired.append(hook.name)

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", spy)]):
        with adapter.decoding_session() as fast:
            assert not fast
        bridged = generate(model, PROMPTS, None, cfg, progress=False)
    assert fired and direct == bridged


def test_the_module_tree_is_restored_after_an_exception_during_direct_decoding(checkpoints):
    model = checkpoints["llama"][2]
    adapter = as_adapter(model)
    before = [(n, type(m).__name__) for n, m in adapter._hf_model.named_modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.decoding_session() as fast:
            assert fast
            raise RuntimeError("boom")
    assert [(n, type(m).__name__) for n, m in adapter._hf_model.named_modules()] == before
