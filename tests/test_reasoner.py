"""The reasoner's tokenizer, deterministic training, greedy decoding and the shipped checkpoint."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dpc_lens.errors import ConfigError  # noqa: E402
from dpc_lens.reasoner import (  # noqa: E402
    HARD_PROMPTS,
    SHIPPED_DIR,
    ReasonerConfig,
    TrainConfig,
    build_tokenizer,
    encode_example,
    evaluate_greedy,
    generate_greedy,
    load_reasoner,
    reasoner_config,
    train_base_model,
)
from dpc_lens.tasks.arith import SPLITS, make_split  # noqa: E402

_TINY = ReasonerConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_covers_the_task_and_round_trips(tok):
    unk = tok.unk_token_id
    for name in SPLITS:
        for ex in make_split(name, 40, 3):
            ids, start = encode_example(tok, ex.question, ex.rationale)
            assert unk not in ids
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            # Separate encoding == joint encoding: the rationale tokenises one way everywhere.
            assert ids[1:-1] == tok.encode(ex.question + " " + ex.rationale,
                                           add_special_tokens=False)
            assert tok.decode(ids[start:-1]) == ex.rationale
            assert tok.decode(ids, skip_special_tokens=True) == \
                ex.question + " " + ex.rationale
    for prompt in HARD_PROMPTS:
        assert unk not in tok.encode(prompt, add_special_tokens=False)
    assert tok("Ann has 12 pens.").input_ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(tok.encode("12", add_special_tokens=False)) == \
        ["▁", "1", "2"]
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == \
        [0, 1, 2, 3]


def test_tokenizer_and_config_save_and_reload(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(reasoner_config(tok, _TINY))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = make_split("shifted", 1, 0)[0].question
    assert tok2(text).input_ids == tok(text).input_ids
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert m2.config.num_key_value_heads == 2 and m2.config.num_attention_heads == 4
    ids = torch.tensor([tok(text).input_ids])
    assert torch.equal(m2(ids).logits, model(ids).logits)


def test_config_validation():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ReasonerConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="divisible"):
        ReasonerConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="mix"):
        TrainConfig(mix=(("nope", 1.0),))


def test_batched_greedy_equals_one_by_one(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(reasoner_config(tok, _TINY)).eval()
    qs = [e.question for e in make_split("test", 3, 0) + make_split("steps5", 2, 0)]
    soft = torch.randn(3, _TINY.d_model) * 0.05
    for sp in (None, soft):
        batched = generate_greedy(model, tok, qs, max_new_tokens=8, batch_size=5, soft_prompt=sp)
        single = [generate_greedy(model, tok, [q], max_new_tokens=8, soft_prompt=sp)[0]
                  for q in qs]
        assert batched == single


def test_training_is_deterministic(tmp_path):
    kw = dict(seed=3, steps=3, batch_size=4, eval_n=2, eval_splits=("test",),
              progress=False, num_threads=1, model=_TINY)
    log_a = train_base_model(tmp_path / "a", **kw)
    log_b = train_base_model(tmp_path / "b", **kw)
    assert log_a["losses"] == log_b["losses"]
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["seed"] == 3 and set(log["accuracy"]) == {"test"}


@pytest.mark.skipif(not (SHIPPED_DIR / "model.safetensors").is_file(),
                    reason="shipped reasoner checkpoint not present")
def test_shipped_reasoner_loads_and_solves_short_problems():
    model, tok = load_reasoner()
    size = sum(p.numel() for p in model.parameters())
    assert size < 3_000_000
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    acc = evaluate_greedy(model, tok, make_split("test", 32, 99))
    assert acc >= 0.9
