"""Prompt tuning on a tiny Llama bridge: it learns, it never touches the model, it is
deterministic, and what it saves loads in PEFT with the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dpc_lens.errors import ConfigError, DataError, InputError
from dpc_lens.model import as_adapter, load_model
from dpc_lens.prompt_tuning import (
    TARGET_SEGMENT,
    PromptTuningConfig,
    PromptTuningResult,
    encode_training_example,
    evaluate_accuracy,
    initial_soft_prompt,
    train_soft_prompt,
)
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import Example
from dpc_lens.testing import save_tiny_hf_model

_NAMES = ("ann", "bob", "dan", "eve")
_ITEMS = ("pens", "books", "apples", "coins")


def _examples(n: int, offset: int = 0) -> list[Example]:
    out = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 3 + 1
        name, item = _NAMES[i % 4], _ITEMS[i % 4]
        out.append(Example(
            id=f"ex{i}",
            question=f"{name} has {a} {item} . she buys {b} more . how many {item} ?",
            answer=str(a + b),
            rationale=f"{a} + {b} = {a + b} . the answer is {a + b} .",
        ))
    return out


TRAIN = _examples(8)
DEV = _examples(4, offset=8)
FAST = dict(n_tokens=4, batch_size=4, eval_every=5, lr=3e-2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: a second intra-op thread only adds synchronisation, and on a
    loaded shared machine it makes these tests several times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny Llama whose non-embedding weights are scaled x10. At the default 0.02
    init, attention and the output head are so weak that the next-token distribution is nearly
    uniform whatever the input, and no soft prompt can move the loss much; scaled, the soft
    prompt's effect is large enough to test learning with a clear margin."""
    from transformers import AutoModelForCausalLM

    d = save_tiny_hf_model("llama", tmp_path_factory.mktemp("tiny_llama"))
    hf = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(10.0)
    hf.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, device="cpu")


def _state(model) -> dict[str, torch.Tensor]:
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def _assert_state_equal(model, before: dict[str, torch.Tensor]) -> None:
    after = _state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"tensors changed by prompt tuning: {changed[:5]}"


# ------------------------------------------------------------------------------------- learning
def test_loss_goes_down_and_best_prompt_is_kept(model):
    cfg = PromptTuningConfig(**{**FAST, "batch_size": 8}, steps=30, patience=None)
    res = train_soft_prompt(model, TRAIN, cfg, dev_examples=DEV, progress=False)
    df = res.to_dataframe()
    train = df["train_loss"].dropna().tolist()
    assert len(train) == 30
    first, last = sum(train[:3]) / 3, sum(train[-3:]) / 3
    assert last < 0.85 * first, (first, last)  # full batch each step: a smooth curve
    dev = df.dropna(subset=["dev_loss"])
    assert dev["step"].tolist() == [0, 5, 10, 15, 20, 25, 30]
    assert res.best_dev_loss == pytest.approx(dev["dev_loss"].min())
    assert res.best_step == int(dev.loc[dev["dev_loss"].idxmin(), "step"])
    assert res.best_dev_loss < dev["dev_loss"].iloc[0]
    sp = res.soft_prompt
    assert sp.embeddings.shape == (4, 32) and sp.embeddings.dtype == torch.float32
    assert not sp.embeddings.requires_grad


def test_early_stopping_keeps_the_best_prompt(model):
    # min_delta larger than any possible gain: no evaluation improves, so training stops after
    # `patience` evaluations and the best prompt is the initial one.
    cfg = PromptTuningConfig(**{**FAST, "eval_every": 2}, steps=50, patience=2, min_delta=100.0)
    res = train_soft_prompt(model, TRAIN, cfg, dev_examples=DEV, progress=False)
    assert res.stopped_early and res.steps_done == 4 and res.best_step == 0
    assert torch.equal(res.soft_prompt.embeddings, initial_soft_prompt(model, cfg).embeddings)


def test_callback_sees_every_step_and_can_stop(model):
    seen = []

    def cb(record, soft):
        seen.append((record.step, soft.n_tokens))
        return record.step == 3

    res = train_soft_prompt(model, TRAIN, PromptTuningConfig(**FAST, steps=10), progress=False,
                            callback=cb)
    assert seen == [(1, 4), (2, 4), (3, 4)]
    assert res.steps_done == 3 and not res.stopped_early and res.best_dev_loss is None


# ------------------------------------------------------------------------- the model is safe
def _set_flags_on_purpose(model):
    params = list(model.parameters())
    for p in params[:3]:
        p.requires_grad_(True)
    model.train()
    return [p.requires_grad for p in params]


def _restore_frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


def test_model_is_bit_identical_and_flags_restored(model):
    before = _state(model)
    flags = _set_flags_on_purpose(model)
    try:
        seen_inside = []

        def cb(record, soft):
            seen_inside.append((model.training, any(p.requires_grad for p in model.parameters())))

        train_soft_prompt(model, TRAIN, PromptTuningConfig(**FAST, steps=4), dev_examples=DEV,
                          progress=False, callback=cb)
        assert seen_inside == [(False, False)] * 4  # frozen and in eval mode while training
        assert [p.requires_grad for p in model.parameters()] == flags
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        _restore_frozen(model)
    _assert_state_equal(model, before)


def test_model_restored_after_an_exception_in_the_callback(model):
    before = _state(model)
    flags = _set_flags_on_purpose(model)
    try:
        def boom(record, soft):
            if record.step == 2:
                raise RuntimeError("boom in callback")

        with pytest.raises(RuntimeError, match="boom in callback"):
            train_soft_prompt(model, TRAIN, PromptTuningConfig(**FAST, steps=10), progress=False,
                              callback=boom)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert model.training
    finally:
        _restore_frozen(model)
    _assert_state_equal(model, before)


# ------------------------------------------------------------------------------ determinism
def test_same_seed_same_prompt(model):
    cfg = PromptTuningConfig(**FAST, steps=6, seed=3)
    a = train_soft_prompt(model, TRAIN, cfg, progress=False)
    b = train_soft_prompt(model, TRAIN, cfg, progress=False)
    c = train_soft_prompt(model, TRAIN, PromptTuningConfig(**FAST, steps=6, seed=4),
                          progress=False)
    assert torch.equal(a.soft_prompt.embeddings, b.soft_prompt.embeddings)
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    assert not torch.equal(a.soft_prompt.embeddings, c.soft_prompt.embeddings)


# ---------------------------------------------------------------------------- PEFT round trip
def test_adapter_round_trips_through_peft(model, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = train_soft_prompt(model, TRAIN, PromptTuningConfig(**FAST, steps=8), progress=False)
    out = res.save_adapter(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "prompt_tuning.json"} <= set(
        os.listdir(out))

    adapter = as_adapter(model)
    ids, _ = encode_training_example(adapter, DEV[0], res.config)
    batch = PromptBatch.from_pieces(adapter, [[("text", ids)]], res.soft_prompt)
    with torch.no_grad():
        ours = adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)

    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([ids]),
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    assert theirs.shape == ours.shape == (1, 4 + len(ids), ours.shape[-1])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    back = PromptTuningResult.load(out)
    assert torch.equal(back.soft_prompt.embeddings, res.soft_prompt.embeddings)
    assert back.config == res.config and back.history == res.history
    assert json.loads((tmp_path / "adapter" / "prompt_tuning.json").read_text())["steps_done"] == 8
    assert list(back.to_dataframe().columns) == ["step", "train_loss", "dev_loss", "seconds"]
    log = res.save(tmp_path / "logs" / "history.json")  # the CLI's layout: JSON beside the adapter
    assert json.loads(open(log).read())["history"][0]["step"] == 1


# ------------------------------------------------------------------ layout, init, evaluation
def test_training_layout_is_bos_question_rationale_eos(model):
    adapter = as_adapter(model)
    tok = adapter.tokenizer
    ex = TRAIN[0]
    ids, lay = encode_training_example(adapter, ex, PromptTuningConfig())
    q = tok(ex.question, add_special_tokens=False)["input_ids"]
    r = tok(ex.rationale, add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + q + r + [tok.eos_token_id]
    assert lay.span(TARGET_SEGMENT) == (1 + len(q), len(ids))


def test_initialisations(model, tmp_path):
    adapter = as_adapter(model)
    W = adapter.embedding_weight
    vocab = initial_soft_prompt(model, PromptTuningConfig(n_tokens=6, seed=1))
    rows = [(W == row).all(-1).nonzero().flatten().tolist() for row in vocab.embeddings]
    special = {0, 1, 2, 3}
    assert all(len(r) == 1 and r[0] not in special for r in rows)
    assert vocab.config["prompt_tuning_init"] == "SAMPLE_VOCAB"

    text = initial_soft_prompt(model, PromptTuningConfig(n_tokens=5, init="text",
                                                         init_text="let's think"))
    ref = SoftPrompt.from_text(adapter, "let's think", n_tokens=5)
    assert torch.equal(text.embeddings, ref.embeddings)
    # PEFT refuses a TEXT init without the tokenizer's path, so the trained adapter carries it
    from peft import PeftConfig

    res = train_soft_prompt(model, TRAIN[:2], PromptTuningConfig(
        n_tokens=5, init="text", init_text="let's think", steps=1), progress=False)
    peft_cfg = PeftConfig.from_pretrained(res.save_adapter(tmp_path / "text_init"))
    assert peft_cfg.prompt_tuning_init == "TEXT" and peft_cfg.tokenizer_name_or_path

    rnd = initial_soft_prompt(model, PromptTuningConfig(n_tokens=64, init="random"))
    rms = float(W.pow(2).mean().sqrt())
    assert float(rnd.embeddings.pow(2).mean().sqrt()) == pytest.approx(rms, rel=0.15)


def test_evaluate_accuracy(model):
    from dpc_lens.generation import GenerationConfig

    res = evaluate_accuracy(model, None, DEV, "arith", GenerationConfig(max_new_tokens=5),
                            progress=False)
    assert len(res.texts) == len(res.predictions) == len(res.correct) == len(DEV)
    assert res.accuracy == sum(res.correct) / len(DEV)
    assert res.ids == tuple(e.id for e in DEV)
    assert list(res.to_dataframe().columns) == ["id", "text", "prediction", "correct"]


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(n_tokens=0), "n_tokens must be an int >= 1"),
    (dict(init="sample"), "init must be 'vocab'"),
    (dict(init="text"), "init='text' needs init_text"),
    (dict(init_text="hello"), "only read with init='text'"),
    (dict(lr=0.0), "the DPC paper used 1e-3"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(patience=0), "patience must be an int >= 1"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be > 0 or None"),
    (dict(template="Q: {query}"), "only {question}, {answer} and {rationale}"),
    (dict(template="solve it"), "never uses {question}"),
    (dict(target_template="{question}"), "uses neither {rationale} nor {answer}"),
    (dict(add_bos="yes"), "add_bos must be True or False"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("{", r"\{").replace("}", r"\}")
                       .replace("(", r"\(").replace(")", r"\)")):
        PromptTuningConfig(**kwargs)


def test_input_errors(model):
    no_rationale = [Example("x", "ann has 3 pens .", "3")]
    with pytest.raises(DataError, match="has no rationale"):
        train_soft_prompt(model, no_rationale, PromptTuningConfig(**FAST, steps=1),
                          progress=False)
    # answers-only training is one template away
    res = train_soft_prompt(model, no_rationale, PromptTuningConfig(
        **FAST, steps=1, target_template="the answer is {answer} ."), progress=False)
    assert res.steps_done == 1
    with pytest.raises(InputError, match="at least one training example"):
        train_soft_prompt(model, [], progress=False)
    with pytest.raises(InputError, match="n_ctx=128"):
        train_soft_prompt(model, TRAIN, PromptTuningConfig(n_tokens=120, steps=1),
                          progress=False)
    assert PromptTuningConfig.from_dict(PromptTuningConfig().to_dict()) == PromptTuningConfig()
    with pytest.raises(ConfigError, match="Unknown PromptTuningConfig fields"):
        PromptTuningConfig.from_dict({"n_token": 3})
