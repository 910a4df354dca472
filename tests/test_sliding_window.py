"""Sliding-window layers (Gemma 2/3) in the flows, on a tiny random Gemma 3 with a window of 4.

Checked against hand counts (explicit loops over ``(i, j)``, never ``dpc_lens.flows``), the
Hugging Face model's own attention pattern (zero beyond the window), and the layer grammar's
"global" / "sliding" names.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dpc_lens.errors import ConfigError, DpcLensWarning
from dpc_lens.layers import attention_windows, resolve_layers
from dpc_lens.model import as_adapter, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import tiny_tokenizer

WINDOW = 4
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
D_MODEL = 32


def save_tiny_gemma3(path, *, seed: int = 0) -> str:
    """A random 4-layer Gemma 3 text model (window 4; layer 2 global) with the tiny tokenizer."""
    import transformers as tf

    tok = tiny_tokenizer()
    cfg = tf.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
        layer_types=LAYER_TYPES, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return load_model(save_tiny_gemma3(tmp_path_factory.mktemp("gemma3")), device="cpu")


def hand_pairs(tgt: tuple[int, int], src: tuple[int, int], window: int | None) -> int:
    n = 0
    for i in range(*tgt):
        for j in range(*src):
            if j < i and (window is None or i - j < window):
                n += 1
    return n


PIECES = [("question", "ann has 3 apples and buys 2 more ."), ("prompt", "let's think"),
          ("rationale", "so 3 + 2 = 5 .")]


def test_windows_and_layer_names(gemma):
    ad = as_adapter(gemma)
    assert ad.attention_windows == (4, 4, None, 4)
    assert resolve_layers("global", 4, ad.attention_windows) == [2]
    assert resolve_layers("sliding", 4, ad.attention_windows) == [0, 1, 3]
    with pytest.raises(ConfigError, match="layer types"):
        resolve_layers("global", 4)
    with pytest.raises(ConfigError, match="no sliding-window layer"):
        resolve_layers("sliding", 4, (None,) * 4)

    class TLConfig:  # TransformerLens's names (HookedTransformer Gemma 2)
        attn_types = ["local", "global"]
        window_size = 7

    assert attention_windows(TLConfig(), 2) == (7, None)
    res = compute_saliency(gemma, "the cat", SaliencyConfig(layers="sliding"))
    assert res.layers == (0, 1, 3)


def test_pair_counts_follow_each_layers_mask(gemma):
    g = torch.Generator().manual_seed(0)
    soft = SoftPrompt(torch.randn(3, D_MODEL, generator=g) * 0.5)
    # two examples of different lengths (left padding shifts the second)
    batch = PromptBatch.from_pieces(gemma, [PIECES, PIECES[:1] + PIECES[2:]], soft)
    res = compute_saliency(gemma, batch, SaliencyConfig(
        loss_segments=("rationale",), keep_full=True))
    assert res.layer_pair_counts is not None
    names = res.segment_names
    windows = [WINDOW, WINDOW, None, WINDOW]
    for b, lay in enumerate(res.layouts):
        for ti, t in enumerate(names):
            for si, s in enumerate(names):
                if t not in lay.spans or s not in lay.spans:
                    continue
                for li in range(4):
                    want = hand_pairs(lay.spans[t], lay.spans[s], windows[li])
                    assert float(res.layer_pair_counts[li, b, ti, si]) == want, (li, b, t, s)
                # the causal counts are the global layer's
                assert float(res.pair_counts[b, ti, si]) == hand_pairs(lay.spans[t], lay.spans[s], None)
    # beyond the window a sliding layer's saliency is exactly zero; the global layer's is not
    full = res.full
    T = full.shape[-1]
    far = torch.tensor([[i - j >= WINDOW for j in range(T)] for i in range(T)])
    for li in (0, 1, 3):
        assert float(full[li][:, far].abs().max()) == 0.0
    assert float(full[2][:, far].abs().max()) > 0.0
    # each layer's mean divides by its own pair count (hand count)
    span_q, span_r = res.layouts[0].spans["question"], res.layouts[0].spans["rationale"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DpcLensWarning)
        mean = res.flow("question", "rationale")
    for li in range(4):
        n = hand_pairs(span_r, span_q, windows[li])
        s = sum(float(full[li, 0, i, j]) for i in range(*span_r) for j in range(*span_q))
        if n == 0:
            assert math.isnan(float(mean[li, 0]))
        else:
            assert float(mean[li, 0]) == pytest.approx(s / n, rel=1e-5, abs=1e-12)
    # the long table's counts are the per-layer ones
    df = res.to_dataframe()
    row = df[(df.flow == "question->rationale") & (df.example == 0) & (df.layer == 0)]
    assert float(row["count"].iloc[0]) == hand_pairs(span_r, span_q, WINDOW)


def test_structurally_empty_flow_warns_naming_the_layers(gemma, tmp_path):
    g = torch.Generator().manual_seed(1)
    soft = SoftPrompt(torch.randn(2, D_MODEL, generator=g) * 0.5)
    # the rationale starts more than a window after the soft prompt ends
    pieces = [("question", "ann has 3 apples and buys 2 more pens ."), ("rationale", "so 5 .")]
    batch = PromptBatch.from_pieces(gemma, [pieces], soft)
    res = compute_saliency(gemma, batch, SaliencyConfig(loss_segments=("rationale",)))
    lay = res.layouts[0]
    assert lay.spans["rationale"][0] - (lay.spans["soft"][1] - 1) >= WINDOW
    with pytest.warns(DpcLensWarning, match=r"structurally empty in the sliding-window layers \[0, 1, 3\]"):
        flow = res.flow("soft", "rationale")
    assert all(math.isnan(float(flow[li, 0])) for li in (0, 1, 3))
    n = hand_pairs(lay.spans["rationale"], lay.spans["soft"], None)
    assert float(flow[2, 0]) == pytest.approx(float(res.flow_sums[2, 0, 2, 0]) / n, rel=1e-6)
    # a result saved and loaded keeps the per-layer counts
    back = type(res).load(res.save(tmp_path / "sal"))
    assert torch.equal(back.layer_pair_counts, res.layer_pair_counts)


def test_global_models_have_no_layer_counts(tmp_path):
    from dpc_lens.testing import boot_tiny

    res = compute_saliency(boot_tiny("llama", tmp_path / "llama"), "the cat sat")
    assert res.layer_pair_counts is None


def test_dpc_analyse_says_which_layers_cannot_see_the_soft_prompt(gemma):
    from dpc_lens.dpc import DPCConfig, analyse
    from dpc_lens.generation import GenerationConfig, generate

    g = torch.Generator().manual_seed(2)
    soft = SoftPrompt(torch.randn(2, D_MODEL, generator=g) * 0.5)
    cfg = DPCConfig(generation=GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    # with BOS, a 9-token question puts every rationale token >= 4 (the window) after the soft rows
    long_q, short_q = "ann has 3 apples and buys 2 more pens", "ann"
    tok = as_adapter(gemma).tokenizer
    gens = generate(gemma, [[tok.bos_token_id] + tok(q, add_special_tokens=False)["input_ids"]
                            for q in (long_q, short_q)], soft, cfg.generation, progress=False)
    with pytest.warns(DpcLensWarning, match=r"sliding-window layers \[0, 1, 3\].*global layers are \[2\]"):
        analyse(gemma, soft, [long_q], cfg, generations=gens[:1], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DpcLensWarning)
        analyse(gemma, soft, [short_q], cfg, generations=gens[1:], progress=False)  # within the window


def test_dpc_detector_leaves_out_what_the_window_hides(gemma):
    """The detector inputs mark, per layer, which rationale tokens can see a soft token; where
    they cannot, the measured soft->token saliency is exactly zero (the model's own mask), and
    the deep-flow means leave those (layer, token) pairs out instead of averaging zeros in."""
    from dpc_lens.dpc import DetectorConfig, DPCConfig, analyse, dynamic_trigger
    from dpc_lens.generation import GenerationConfig

    g = torch.Generator().manual_seed(2)
    soft = SoftPrompt(torch.randn(2, D_MODEL, generator=g) * 0.5)
    cfg = DPCConfig(generation=GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DpcLensWarning)
        far, near = analyse(gemma, soft, ["ann has 3 apples and buys 2 more pens", "ann"], cfg,
                            progress=False)
    for a in (far, near):
        x = a.inputs
        assert x.layer_windows.tolist() == [WINDOW, WINDOW, 0, WINDOW]
        assert x.windows == (WINDOW, WINDOW, None, WINDOW)
        # [soft (2); BOS + question; rationale]: rationale token i sits at 2 + len(prompt) + i,
        # the last soft token at 1; a sliding layer shows it the soft prompt when the gap < 4
        gaps = [2 + len(a.prompt_ids) + i - 1 for i in range(len(a.generation.token_ids))]
        for layer, w in enumerate((WINDOW, WINDOW, None, WINDOW)):
            want = [w is None or gap < w for gap in gaps]
            assert x.rationale_visible[layer].tolist() == want
            hidden = ~x.rationale_visible[layer]
            assert bool((x.rationale_rows[layer][hidden] == 0).all())  # the model's mask agrees
    assert near.inputs.rationale_visible[0].tolist() == [True, False, False]

    # deep layers all sliding: the far rationale sees the soft prompt in none -> not judged
    d = dynamic_trigger(far.inputs, DetectorConfig(shallow_layers=[1], deep_layers="sliding"))
    assert d.deep_layers == (0, 1, 3) and not d.deep_flow.defined and not d.fired
    assert "see the soft prompt in none" in d.deep_flow.note
    # the global layer judges every token; "global" resolves from the inputs' own layer types
    d = dynamic_trigger(far.inputs, DetectorConfig(shallow_layers=[1], deep_layers="global"))
    assert d.deep_layers == (2,) and d.deep_flow.defined and d.deep_flow.n_judged is None
    # mixed: token 0 is seen by every deep layer, tokens 1-2 only by the global one
    d = dynamic_trigger(near.inputs, DetectorConfig(shallow_layers=[1], deep_layers=[0, 2]))
    rows = near.inputs.rows(d.statistic).double()
    assert d.deep_flow.f.tolist() == pytest.approx(
        [(rows[0, 0] + rows[2, 0]).item() / 2, rows[2, 1].item(), rows[2, 2].item()])
