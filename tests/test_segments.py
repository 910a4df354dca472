"""Segments, the padded batch layout, and the saliency result's save/load and table export."""

from __future__ import annotations

import math

import pytest
import torch

from dpc_lens.errors import InputError
from dpc_lens.model import as_adapter
from dpc_lens.saliency import SaliencyConfig, SaliencyResult, compute_saliency
from dpc_lens.segments import PromptBatch, SegmentLayout, encode_pieces
from dpc_lens.soft_prompt import SoftPrompt


def test_encode_pieces_boundaries(tiny_llama):
    tok = as_adapter(tiny_llama).tokenizer
    ids, lay = encode_pieces(tok, [("bos", [tok.bos_token_id]), ("question", "ann has 3"),
                                   ("rationale", "so 12")])
    q = tok("ann has 3", add_special_tokens=False)["input_ids"]
    r = tok("so 12", add_special_tokens=False)["input_ids"]
    assert len(q) == 3 and len(r) == 3  # digits are split one by one
    assert ids == [tok.bos_token_id] + q + r
    assert lay.spans == {"bos": (0, 1), "question": (1, 4), "rationale": (4, 7)}
    assert lay.length == 7
    assert list(lay.positions("question")) == [1, 2, 3]


def test_encode_pieces_rejects_duplicate_and_reserved_names(tiny_llama):
    tok = as_adapter(tiny_llama).tokenizer
    with pytest.raises(InputError, match="'q' is used twice"):
        encode_pieces(tok, [("q", "ann"), ("q", "bob")])
    with pytest.raises(InputError, match="reserved soft-prompt name 'soft'"):
        encode_pieces(tok, [("soft", "ann")])
    with pytest.raises(InputError, match="need a tokenizer"):
        encode_pieces(None, [("q", "ann")])


def test_prompt_batch_layout_pads_then_soft_then_tokens(tiny_llama):
    ad = as_adapter(tiny_llama)
    soft_t = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    batch = PromptBatch.build(
        ad, [[10, 11, 12, 13], [20]],
        [SegmentLayout({"question": (0, 2), "rationale": (2, 4)}, 4), SegmentLayout({"question": (0, 1)}, 1)],
        SoftPrompt(soft_t),
    )
    pad = ad.pad_token_id()
    # row 0: 6 real positions, no pad; row 1: 3 pads, 2 soft, 1 token
    assert batch.pad_lengths == (0, 3) and batch.n_soft == 2 and batch.seq_len == 6
    assert batch.token_ids.tolist() == [[-1, -1, 10, 11, 12, 13], [pad, pad, pad, -1, -1, 20]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]]
    assert batch.layouts[0].spans == {"soft": (0, 2), "question": (2, 4), "rationale": (4, 6)}
    assert batch.layouts[1].spans == {"soft": (3, 5), "question": (5, 6)}
    assert torch.equal(batch.embeds[0, :2], soft_t) and torch.equal(batch.embeds[1, 3:5], soft_t)
    emb = ad.embed_tokens(torch.tensor([[10, 20]]))[0]
    assert torch.equal(batch.embeds[0, 2], emb[0]) and torch.equal(batch.embeds[1, 5], emb[1])
    m = batch.segment_masks(["soft", "rationale"])
    assert m[1, 1].tolist() == [0.0] * 6  # example 1 has no rationale
    assert m[1, 0].tolist() == [0, 0, 0, 1, 1, 0]
    assert batch.union_mask(["soft", "question"])[1].tolist() == [0, 0, 0, 1, 1, 1]


def test_prompt_batch_errors(tiny_llama):
    ad = as_adapter(tiny_llama)
    with pytest.raises(InputError, match="empty batch"):
        PromptBatch.build(ad, [], [])
    with pytest.raises(InputError, match="layout covers 3 tokens but the sequence has 2"):
        PromptBatch.build(ad, [[1, 2]], [SegmentLayout({"q": (0, 3)}, 3)])
    with pytest.raises(InputError, match="Example 0 has no tokens"):
        PromptBatch.build(ad, [[]], [SegmentLayout({}, 0)])
    with pytest.raises(InputError, match="soft must be a SoftPrompt"):
        PromptBatch.build(ad, [[1]], [SegmentLayout({"q": (0, 1)}, 1)], soft=[1.0])


def test_segment_layout_json_round_trip():
    import json

    lay = SegmentLayout({"soft": (0, 3), "question": (3, 8), "rationale": (8, 12)}, 12)
    back = SegmentLayout.from_dict(json.loads(json.dumps(lay.to_dict())))
    assert back.spans == lay.spans and back.length == 12
    assert list(back.spans) == ["soft", "question", "rationale"]  # order kept
    moved = lay.shifted(2)
    assert moved.spans["question"] == (5, 10) and moved.length == 14
    with pytest.raises(InputError, match="Unknown segment 'answer'"):
        lay.span("answer")


@pytest.fixture(scope="module")
def result(tiny_llama):
    ad = as_adapter(tiny_llama)
    soft = SoftPrompt(torch.randn(2, 32, generator=torch.Generator().manual_seed(4)))
    batch = PromptBatch.from_pieces(ad, [
        [("question", "ann has 3 apples ."), ("rationale", "so 3 + 2 = 5")],
        [("question", "bob has 2"), ("rationale", "2 pens")],
    ], soft)
    cfg = SaliencyConfig(column_targets=("rationale",), row_sources=("question",), keep_full=True)
    return compute_saliency(tiny_llama, batch, cfg)


def test_result_save_load_round_trip(result, tmp_path):
    result.save(tmp_path / "r")
    back = SaliencyResult.load(tmp_path / "r")
    assert back.config == result.config
    assert back.layers == result.layers and back.segment_names == result.segment_names
    assert [lay.spans for lay in back.layouts] == [lay.spans for lay in result.layouts]
    for key in ("flow_sums", "pair_counts", "loss", "column_sums", "column_shares", "row_sums",
                "row_totals", "full"):
        assert torch.equal(getattr(back, key), getattr(result, key)), key
    f1, f2 = back.flow("soft", "rationale"), result.flow("soft", "rationale")
    assert torch.equal(f1, f2)


def test_to_dataframe_columns_and_values(result):
    df = result.to_dataframe()
    assert {"layer", "example", "source", "target", "flow", "sum", "count", "mean"} <= set(df.columns)
    # pairs with no count (question->soft: causal) are left out
    assert not ((df.source == "question") & (df.target == "soft")).any()
    # example 1: question "bob has 2" (3 tokens) after 2 soft tokens and 3 pad positions
    pad = result.layouts[1].spans["soft"][0]
    assert result.layouts[1].spans["question"] == (pad + 2, pad + 5)
    row = df[(df.layer == 1) & (df.example == 1) & (df.flow == "question->rationale")].iloc[0]
    # by hand: rationale "2 pens" is 2 tokens, question 3 tokens, all question tokens precede: 6 pairs
    assert row["count"] == 6
    full = result.full[1, 1]
    qs, qe = result.layouts[1].spans["question"]
    rs, re = result.layouts[1].spans["rationale"]
    by_hand = sum(float(full[i, j]) for i in range(rs, re) for j in range(qs, qe)) / 6
    assert row["mean"] == pytest.approx(by_hand, rel=1e-6)
    assert row["mean"] == pytest.approx(float(result.flow("question", "rationale")[1, 1]), rel=1e-6)
    # soft->soft in example 0: 2 soft tokens -> the single pair (1, 0)
    ss = df[(df.layer == 0) & (df.example == 0) & (df.flow == "soft->soft")].iloc[0]
    assert ss["count"] == 1
    assert ss["sum"] == pytest.approx(float(result.full[0, 0, 1, 0]), rel=1e-6)


def test_flow_reduce_options_and_errors(result):
    s = result.flow("question", "rationale", reduce="sum")
    m = result.flow("question", "rationale")
    c = result.pair_counts[:, result.segment_names.index("rationale"), result.segment_names.index("question")]
    torch.testing.assert_close(m, s / c)
    assert math.isnan(float(result.flow("rationale", "question")[0, 0]))
    props = result.proportions(["soft->rationale", "question->rationale"])
    torch.testing.assert_close(props["soft->rationale"] + props["question->rationale"], torch.ones(2, 2))
    with pytest.raises(InputError, match="Unknown segment 'answer'"):
        result.flow("answer", "rationale")
    with pytest.raises(InputError, match="reduce must be 'mean' or 'sum'"):
        result.flow("question", "rationale", reduce="max")
    with pytest.raises(InputError, match="'source->target'"):
        result.flows(["question to rationale"])
