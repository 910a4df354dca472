"""The reasoner's tokenizer, deterministic training, its evaluation through the library's one
decoding loop, and the shipped checkpoint."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dpc_lens.errors import ConfigError  # noqa: E402
from dpc_lens.tasks.arith import SPLITS, make_split  # noqa: E402
from dpc_lens.testbed.reasoner import (  # noqa: E402
    HARD_PROMPTS,
    SHIPPED_DIR,
    ReasonerConfig,
    TrainConfig,
    build_tokenizer,
    encode_example,
    evaluate_reasoner,
    load_reasoner,
    reasoner_config,
    train_base_model,
)

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


def test_reasoner_evaluation_is_the_librarys_generate(tok, tmp_path):
    """No decoding loop of its own: evaluate_reasoner's texts are generation.generate's on the
    [<bos> question] prompt (encode_example's), with and without a soft prompt."""
    from transformers import LlamaForCausalLM

    from dpc_lens.generation import GenerationConfig, generate
    from dpc_lens.model import load_model
    from dpc_lens.soft_prompt import SoftPrompt

    torch.manual_seed(1)
    LlamaForCausalLM(reasoner_config(tok, _TINY)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    exs = make_split("test", 3, 0) + make_split("steps5", 2, 0)
    prompts = [encode_example(tok, e.question)[0] for e in exs]
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)
    for soft in (None, SoftPrompt(torch.randn(3, _TINY.d_model) * 0.05)):
        res = evaluate_reasoner(model, exs, soft_prompt=soft, max_new_tokens=8, batch_size=2)
        ref = generate(model, prompts, soft, cfg, progress=False)
        assert list(res.texts) == [g.text for g in ref]
        assert len(res.correct) == len(exs)


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
    acc = evaluate_reasoner(SHIPPED_DIR, make_split("test", 32, 99)).accuracy
    assert acc >= 0.9


@pytest.mark.skipif(not (SHIPPED_DIR / "model.safetensors").is_file(),
                    reason="shipped reasoner checkpoint not present")
def test_shipped_accuracies_reproduce_through_generate():
    """Every accuracy of the shipped training_log.json (200 problems per split, greedy, 96 new
    tokens) is what the library's generate gives today: the reasoner's old decoding loop is gone
    and nothing it measured changed."""
    from dpc_lens.model import load_model

    log = json.loads((SHIPPED_DIR / "training_log.json").read_text())
    model = load_model(str(SHIPPED_DIR), device="cpu")
    n, seed = log["eval"]["n"], log["eval"]["seed"]
    got = {split: evaluate_reasoner(model, make_split(split, n, seed)).accuracy
           for split in log["accuracy"]}
    assert got == log["accuracy"]
