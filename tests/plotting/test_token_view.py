"""The notebook token view (issue 20): ``SaliencyResult.show`` / ``_repr_html_`` on a hand-built
result, checked against hand sums of its matrix, the records' views, escaping, and the page in
headless Chromium."""

from __future__ import annotations

import html
import re

import pytest
import torch
from cdp_chromium import Browser

from dpc_lens.errors import InputError
from dpc_lens.plotting.html import saliency_token_scores, shade_tokens
from dpc_lens.saliency import SaliencyConfig, SaliencyResult
from dpc_lens.segments import SegmentLayout

# I[layer, query, key] of one example with segments a = (0, 2), b = (2, 5) over 5 positions
I0 = torch.tensor([[0, 0, 0, 0, 0],
                   [1, 0, 0, 0, 0],
                   [2, 3, 0, 0, 0],
                   [4, 5, 6, 0, 0],
                   [7, 8, 9, 10, 0]], dtype=torch.float64)
I1 = 2 * I0


def _result(**cfg) -> SaliencyResult:
    full = torch.stack([I0, I1])[:, None]  # [layer, batch, q, k]
    lay = SegmentLayout({"a": (0, 2), "b": (2, 5)}, 5)
    masks = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
    sums = torch.einsum("tq,lqk,sk->lts", masks, full[:, 0], masks)[:, None]
    counts = torch.tensor([[[1, 0], [6, 3]]], dtype=torch.float64)  # [batch, target, source]
    return SaliencyResult(config=SaliencyConfig(keep_full=True, **cfg), layers=(0, 1),
                          segment_names=("a", "b"), layouts=(lay,), flow_sums=sums, pair_counts=counts,
                          loss=torch.zeros(1), full=full,
                          tokens=(("The", " cat", " <script>alert(1)</script>", " sat", "."),))


def test_flow_from_a_source_into_each_token_by_hand():
    res = _result()
    d = saliency_token_scores(res, 0, source="a")  # columns 0, 1 summed per row, mean of 2 layers
    row_sums_a = [0, 1, 5, 9, 15]
    assert d["values"] == pytest.approx([1.5 * v for v in row_sums_a])
    assert d["layers"] == [0, 1] and "from a into each token" in d["label"]
    d1 = saliency_token_scores(res, 0, source="b", layers=1)  # layer 1 only: 2 x I0
    assert d1["values"] == pytest.approx([0, 0, 0, 12, 38])
    both = saliency_token_scores(res, 0, source=["a", "b"])  # a group: columns of both
    assert both["values"] == pytest.approx([1.5 * v for v in [0, 1, 5, 15, 34]])


def test_flow_from_each_token_into_a_target_by_hand():
    res = _result()
    d = saliency_token_scores(res, 0, target="b", layers=[0])  # rows 2..4 summed per column
    assert d["values"] == pytest.approx([13, 16, 15, 10, 0])
    with pytest.raises(InputError, match="not both"):
        saliency_token_scores(res, 0, source="a", target="b")
    with pytest.raises(InputError, match=r"unknown segment 'c'; example 0 has the segments \['a', 'b'\]"):
        saliency_token_scores(res, 0, source="c")
    with pytest.raises(InputError, match=r"layers 5 asks for layers \[5\]"):
        saliency_token_scores(res, 0, source="a", layers=5)


def test_without_per_token_flows_the_message_says_how_to_get_them():
    import dataclasses

    res = dataclasses.replace(_result(), full=None, config=SaliencyConfig())
    with pytest.raises(InputError, match="keep_full=True"):
        saliency_token_scores(res, 0, source="a")
    assert "segment flows only" in res._repr_html_()  # still a view: tokens and segment table


def test_show_and_repr_html_escape_and_render(tmp_path):
    res = _result()
    view = res.show(source="a", layers="deep")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in view.html and "<script>alert" not in view.html
    assert "<script" not in res._repr_html_().replace("<style>", "")
    # the segment table over the same layers (layer 1 = 2 x I0): mean over pairs,
    # a->b: 2 x (2+3+4+5+7+8)/6 = 9.67, b->b: 2 x (6+9+10)/3 = 16.7, a->a: 2 x 1/1
    cells = re.findall(r'<td class="num">([^<]+)</td>', view.html)
    assert cells == ["2", "9.67", "16.7"]
    text = html.unescape(re.sub(r"<[^>]+>", " ", res._repr_html_()))
    assert "12.5" in text  # all layers: b->b (25/3 + 50/3) / 2
    path = view.save(str(tmp_path / "view.html"))
    b = Browser()
    try:
        page = b.open(path)
        toks = page.js("Array.from(document.querySelectorAll('.toks i')).map(e => [e.textContent, e.title])")
        assert [t for t, _ in toks] == ["The", " cat", " <script>alert(1)</script>", " sat", "."]
        # layer "deep" of 2 layers = layer 1 (2 x I0): flow from a = 2 x [0, 1, 5, 9, 15]
        assert [float(v) for _, v in toks] == pytest.approx([0, 2, 10, 18, 30])
        assert page.js("document.querySelectorAll('script').length") == 0
        assert not page.events("Page.javascriptDialogOpening")
    finally:
        b.close()


def test_shade_tokens_marks_split_threshold_and_checks_lengths():
    out = shade_tokens(["x", "y", "z", "w"], [0.1, 0.9, 0.2, 0.8], split=2, threshold=0.5)
    assert out.count('class="split"') == 2  # the bar in the tokens and in the legend
    assert re.findall(r'<i class="?([^" >]+(?: hi)?)"?', out) == ["s1", "s9", "s2", "s8 hi"]
    with pytest.raises(InputError, match="one value per token"):
        shade_tokens(["x"], [1.0, 2.0])


def test_records_render_in_notebooks():
    from dpc_lens.dpc import DPCRecord
    from dpc_lens.iap import PairRecord

    rec = DPCRecord.from_dict({"id": "q<1>", "question": "2+2?", "gold": "4",
                               "pt": {"rationale": "<b>5</b>", "answer": "5", "correct": False},
                               "dpc": {"rationale": "4", "answer": "4", "correct": True, "fired": True,
                                       "corrupted_rows": [3]},
                               "final_answer": "4", "final_correct": True})
    h = rec._repr_html_()
    assert "q&lt;1&gt;" in h and "&lt;b&gt;5&lt;/b&gt;" in h and "soft rows zeroed: <b>3</b>" in h
    assert "flipped wrong → right" in h
    pair = PairRecord(question_index=0, prompt_index=2, prompt="Abrakadabra!", group="irrelevant",
                      rationale="<i>no</i>", rationale_ids=(1,), stop_reason="eos", flows={},
                      flow_means={"question->prompt": 0.25}, layer_sets={"question->prompt": [0]},
                      n_tokens={}, loss=0.1, chat_template=False)
    h = pair._repr_html_()
    assert "&lt;i&gt;no&lt;/i&gt;" in h and "question-&gt;prompt" in h and "0.25" in h


def test_flow_into_one_chosen_token_by_hand():
    res = _result()
    d = saliency_token_scores(res, 0, target=3)  # row 3 of I: [4, 5, 6, 0, 0], mean of I0 and 2 x I0
    assert d["values"] == pytest.approx([6, 7.5, 9, 0, 0])
    assert saliency_token_scores(res, 0, target=-1, layers=[0])["values"] == pytest.approx([7, 8, 9, 10, 0])
    with pytest.raises(InputError, match="target token 5 is not in example 0, which has 5 tokens"):
        saliency_token_scores(res, 0, target=5)
    assert "into token 4" in res.show(0, target=-1).html
