"""The figures' data, checked by value, and every figure rendered once to a real file.

The data functions of :mod:`dpc_lens.plotting` are fed hand-built DPC records (trigger dicts
made by the real detector on hand-built inputs), a hand-built :class:`SaliencyResult` whose
numbers are known, and a result from a tiny offline model; expected means, bands, boundaries
and marked columns are worked out here by hand. Every ``plot_*`` builder is then rendered to
PNG (and one to SVG) and the file is checked by its magic bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from dpc_lens import plotting as P
from dpc_lens.dpc.detector import DetectorConfig, DetectorInputs, dynamic_trigger
from dpc_lens.errors import DataError, InputError
from dpc_lens.saliency import SaliencyConfig, SaliencyResult, compute_saliency
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.soft_prompt import SoftPrompt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPC = ("soft->question", "soft->rationale", "question->rationale")


# ---------------------------------------------------------------------------------------------
# Hand-built inputs
# ---------------------------------------------------------------------------------------------


def trigger(columns, rows, **cfg):
    """A real TriggerDecision dict from hand-built detector inputs (4 layers)."""
    c = torch.tensor(columns, dtype=torch.float64)
    r = torch.tensor(rows, dtype=torch.float64)
    d = dynamic_trigger(DetectorInputs(c, c, r, r), DetectorConfig(**cfg))
    return d.to_dict()


# 4 layers; shallow = [1], deep = [3]. Soft prompt of 3 tokens.
COLS_ACC = [[0, 0, 0], [1.0, 10.0, 1.0], [0, 0, 0], [0, 0, 0]]  # max/mean = 10/4 = 2.5
COLS_EVEN = [[0, 0, 0], [1.0, 1.0, 1.0], [0, 0, 0], [0, 0, 0]]  # max/mean = 1
# deep flow f over 4 rationale tokens (layer 3): r1 = [0.1, 0.3] -> beta 0.2; r2 = [0.5, 0.1]
ROWS_FIRE = [[0] * 4, [0] * 4, [0] * 4, [0.1, 0.3, 0.5, 0.1]]  # 1 of 2 affected: share 0.5
ROWS_CALM = [[0] * 4, [0] * 4, [0] * 4, [0.3, 0.3, 0.1, 0.1]]  # none affected


def record(rid, flows, pt, dpc, base, trig, *, fired=False, rows=None):
    located = trig["accumulation"]["top_indices"] if trig else []
    return {
        "id": rid,
        "pt": {"answer": "1" if pt else "0", "correct": pt},
        "dpc": {"answer": "1" if dpc else "0", "correct": dpc, "fired": fired,
                "corrupted_rows": (rows if rows is not None else located) if fired else []},
        "base": {"answer": "1" if base else "0", "correct": base},
        "trigger": trig,
        "located_rows": located,
        "flows": flows,
    }


def flows(sq, sr, qr):
    return {"soft->question": sq, "soft->rationale": sr, "question->rationale": qr}


@pytest.fixture()
def records():
    """Four records over 4 layers (and one with an empty rationale, which has no flows).

    Triggers use R = 0.4, accumulation threshold 2.0 on max_over_mean:
      a: accumulation (2.5) + change (share 0.5) -> fired; PT wrong, DPC right.
      b: accumulation, no change;                 PT right, DPC right.
      c: no accumulation (1.0), change -> fired;  PT right, DPC wrong.
      d: no accumulation, no change;              PT wrong, DPC wrong.
    """
    kw = dict(R=0.4, accumulation_threshold=2.0)
    ta = trigger(COLS_ACC, ROWS_FIRE, **kw)
    tb = trigger(COLS_ACC, ROWS_CALM, **kw)
    tc = trigger(COLS_EVEN, ROWS_FIRE, **kw)
    td = trigger(COLS_EVEN, ROWS_CALM, **kw)
    return [
        record("a", flows([1, 1, 1, 1], [2, 2, 2, 6], [1, 1, 1, 1]), False, True, True, ta, fired=True),
        record("b", flows([1, 2, 1, 1], [1, 2, 3, 2], [2, 0, 1, 1]), True, True, False, tb),
        record("c", flows([3, 2, 1, 2], [3, 2, 1, 4], [2, 4, 2, 2]), True, False, False, tc, fired=True),
        record("d", flows([1, 2, 3, float("nan")], [3, 4, 5, 8], [0, 1, 2, 1]), False, False, False, td),
        record("e", {}, False, False, False, None),
    ]


def hand_result(per_head: bool = False) -> SaliencyResult:
    """3 layers (model layers 1, 2, 4), batch 2, T = 6.

    Example 0: soft (0, 2), question (2, 4), rationale (4, 6).
    Example 1, left-padded by one: soft (1, 3), question (3, 4), rationale (4, 6).
    full[l, b, i, j] = (l + 1) * (b + 1) * (6 i + j + 1) below the diagonal, else 0.
    """
    L, B, T = 3, 2, 6
    base = torch.tril(torch.arange(T * T, dtype=torch.float32).view(T, T) + 1, -1)
    full = torch.stack([torch.stack([base * (l + 1) * (b + 1) for b in range(B)]) for l in range(L)])
    names = ("soft", "question", "rationale")
    sums = torch.arange(L * B * 3 * 3, dtype=torch.float32).view(L, B, 3, 3) + 1
    counts = torch.tensor([[[0, 0, 0], [4, 1, 0], [4, 4, 1]], [[0, 0, 0], [2, 0, 0], [4, 2, 1]]],
                          dtype=torch.float32)
    if per_head:  # two heads: head h carries (h + 1) x the sums
        sums = torch.stack([sums, 2 * sums], dim=2)
        full = torch.stack([full, 2 * full], dim=2)
    return SaliencyResult(
        config=SaliencyConfig(keep_full=True, per_head=per_head),
        layers=(1, 2, 4),
        segment_names=names,
        layouts=(
            SegmentLayout({"soft": (0, 2), "question": (2, 4), "rationale": (4, 6)}, 6),
            SegmentLayout({"soft": (1, 3), "question": (3, 4), "rationale": (4, 6)}, 6),
        ),
        flow_sums=sums,
        pair_counts=counts,
        loss=torch.zeros(B),
        full=full,
    )


@pytest.fixture(scope="module")
def tiny_result(tiny_llama):
    """A real saliency pass on the tiny Llama, with a soft prompt, full maps kept."""
    from dpc_lens.model import as_adapter

    adapter = as_adapter(tiny_llama)
    soft = SoftPrompt(torch.randn(3, adapter.d_model, generator=torch.Generator().manual_seed(0)) * 0.1)
    bos = adapter.tokenizer.bos_token_id
    examples = [
        [("bos", [bos]), ("question", "ann has 3 apples ."), ("rationale", "so 3 + 2 = 5 .")],
        [("bos", [bos]), ("question", "bob has 7 pens and 2 books ."), ("rationale", "7 - 2 = 5")],
    ]
    batch = PromptBatch.from_pieces(adapter, examples, soft)
    return compute_saliency(tiny_llama, batch, SaliencyConfig(keep_full=True, loss_segments=("rationale",)))


def is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# Flow curves
# ---------------------------------------------------------------------------------------------


def test_flow_curves_raw_mean_and_std_by_hand(records):
    d = P.flow_curve_data(records, proportions=False)
    assert d.names == DPC
    np.testing.assert_array_equal(d.layers, [0, 1, 2, 3])
    # soft->rationale over a, b, c, d (e has no flows): layer 0 = [2, 1, 3, 3]
    sr0 = np.array([2, 1, 3, 3.0])
    assert d.center["soft->rationale"][0] == pytest.approx(2.25)
    std0 = np.sqrt(((sr0 - 2.25) ** 2).mean())  # population std, ddof = 0
    assert d.lo["soft->rationale"][0] == pytest.approx(2.25 - std0)
    assert d.hi["soft->rationale"][0] == pytest.approx(2.25 + std0)
    # soft->question layer 3: d is NaN there, so the mean is over a, b, c = [1, 1, 2]
    assert d.center["soft->question"][3] == pytest.approx(4 / 3)
    np.testing.assert_array_equal(d.n["soft->question"], [4, 4, 4, 3])
    assert d.band == "std" and d.proportions is False


def test_flow_curves_proportions_by_hand(records):
    d = P.flow_curve_data(records, proportions=True)
    # layer 0 per record: a = (1, 2, 1), b = (1, 1, 2), c = (3, 3, 2), d = (1, 3, 0).
    # Wang et al.: average the raw flows (1.5, 2.25, 1.25), then normalise: 2.25 / 5 = 0.45 --
    # not the mean of the per-instance proportions (0.46875)
    assert d.center["soft->rationale"][0] == pytest.approx(0.45)
    assert d.center["soft->question"][0] == pytest.approx(0.3)
    # the band: spread of the per-instance proportions around that curve
    sr = np.array([2 / 4, 1 / 4, 3 / 8, 3 / 4])
    assert d.hi["soft->rationale"][0] == pytest.approx(0.45 + sr.std())
    # the three proportions sum to 1 at every layer
    total = sum(d.center[n] for n in DPC)
    np.testing.assert_allclose(total, 1.0)
    # layer 3: record d has a NaN flow, so it drops out of every flow there
    np.testing.assert_array_equal(d.n["soft->rationale"], [4, 4, 4, 3])
    np.testing.assert_array_equal(d.n["question->rationale"], [4, 4, 4, 3])


def test_flow_curves_iqr_band(records):
    d = P.flow_curve_data(records, ["soft->rationale"], proportions=False, band="iqr")
    # layer 3: [6, 2, 4, 8] -> median 5, 25th 3.5, 75th 6.5 (linear interpolation)
    assert d.center["soft->rationale"][3] == pytest.approx(5.0)
    assert d.lo["soft->rationale"][3] == pytest.approx(3.5)
    assert d.hi["soft->rationale"][3] == pytest.approx(6.5)


def test_flow_curves_from_a_result_equal_its_flows():
    res = hand_result()
    d = P.flow_curve_data(res, proportions=False)
    np.testing.assert_array_equal(d.layers, [1, 2, 4])
    # soft->rationale = sums[l, b, t=2, s=0] / counts[b, 2, 0]; counts are 4 for both examples
    s = res.flow_sums[:, :, 2, 0].numpy() / 4
    np.testing.assert_allclose(d.center["soft->rationale"], s.mean(1))
    # soft->question: example 1 has 2 pairs, example 0 has 4
    sq = np.stack([res.flow_sums[:, 0, 1, 0].numpy() / 4, res.flow_sums[:, 1, 1, 0].numpy() / 2], 1)
    np.testing.assert_allclose(d.center["soft->question"], sq.mean(1))


def test_flow_curves_from_flows_dicts_with_iap_names():
    items = [
        {"question->prompt": [1.0, 3.0], "question->rationale": [1.0, 1.0], "prompt->rationale": [2.0, 0.0]},
        {"question->prompt": [3.0, 1.0], "question->rationale": [1.0, 1.0], "prompt->rationale": [0.0, 2.0]},
    ]
    d = P.flow_curve_data(items, proportions=False)
    assert d.names == P.IAP_FLOWS
    np.testing.assert_allclose(d.center["question->prompt"], [2.0, 2.0])
    np.testing.assert_allclose(d.hi["question->prompt"], [3.0, 3.0])


def test_flow_curves_refuse_bad_inputs(records):
    with pytest.raises(InputError, match="band"):
        P.flow_curve_data(records, band="sem")
    with pytest.raises(InputError, match="no flows"):
        P.flow_curve_data(records, ["question->prompt"])
    with pytest.raises(InputError, match="nothing to plot"):
        P.flow_curve_data([records[-1]])
    with pytest.raises(InputError, match="per_head"):
        P.flow_curve_data(hand_result(per_head=True))
    bad = [records[0], {**records[1], "flows": {k: v[:3] for k, v in records[1]["flows"].items()}}]
    with pytest.raises(InputError, match="different models"):
        P.flow_curve_data(bad)


# ---------------------------------------------------------------------------------------------
# Heatmap
# ---------------------------------------------------------------------------------------------


def test_heatmap_sum_and_mean_over_layers_by_hand():
    res = hand_result()
    d = P.heatmap_data(res, 0, layers=[2, 4])
    T = 6
    base = np.tril(np.arange(T * T, dtype=np.float64).reshape(T, T) + 1, -1)
    np.testing.assert_allclose(d.matrix, base * (2 + 3))  # layers 2 and 4 are axis entries 1 and 2
    assert d.offset == 0 and d.layers == (2, 4)
    assert d.segments == (("soft", 0, 2), ("question", 2, 4), ("rationale", 4, 6))
    assert d.boundaries == (2, 4)
    m = P.heatmap_data(res, 0, layers=range(1, 3), reduce="mean")
    np.testing.assert_allclose(m.matrix, base * (1 + 2) / 2)


def test_heatmap_crops_padding_and_marks_columns():
    res = hand_result()
    d = P.heatmap_data(res, 1, marked=[1])
    T = 6
    base = np.tril(np.arange(T * T, dtype=np.float64).reshape(T, T) + 1, -1)
    np.testing.assert_allclose(d.matrix, (base * 2 * (1 + 2 + 3))[1:, 1:])  # pad position 0 cut
    assert d.offset == 1
    assert d.segments == (("soft", 0, 2), ("question", 2, 3), ("rationale", 3, 5))
    assert d.boundaries == (2, 3)
    assert d.marked_cols == (1,)
    # a trigger dict (or a record holding one) marks its located top_indices
    trig = {"accumulation": {"top_indices": [0, 1]}, "deep_flow": {}}
    assert P.heatmap_data(res, 1, marked=trig).marked_cols == (0, 1)
    assert P.heatmap_data(res, 0, marked={"trigger": trig}).marked_cols == (0, 1)
    assert P.heatmap_data(res, 0, marked={"trigger": None}).marked_cols == ()


def test_heatmap_per_head_and_errors():
    res = hand_result(per_head=True)
    d = P.heatmap_data(res, 0, layers=[1], head=1)
    T = 6
    base = np.tril(np.arange(T * T, dtype=np.float64).reshape(T, T) + 1, -1)
    np.testing.assert_allclose(d.matrix, 2 * base)
    with pytest.raises(InputError, match="head="):
        P.heatmap_data(res, 0)
    plain = hand_result()
    with pytest.raises(InputError, match="not in this result"):
        P.heatmap_data(plain, 0, layers=[0])
    with pytest.raises(InputError, match="outside the soft prompt"):
        P.heatmap_data(plain, 0, marked=[2])
    with pytest.raises(InputError, match="out of range"):
        P.heatmap_data(plain, 2)
    with pytest.raises(InputError, match="keep_full"):
        P.heatmap_data(SaliencyResult(**{**plain.__dict__, "full": None}))


def test_heatmap_of_a_real_saliency_pass(tiny_result):
    res = tiny_result
    lay = res.layouts[1]
    d = P.heatmap_data(res, 1, layers=[0, 1], marked=[2])
    start = lay.spans["soft"][0]
    T = lay.length - start
    assert d.matrix.shape == (T, T)
    np.testing.assert_allclose(d.matrix, res.full[:, 1].sum(0)[start:, start:].double().numpy())
    assert np.all(np.triu(d.matrix) == 0)  # causal, diagonal excluded by default
    names = [n for n, _, _ in d.segments]
    assert names == ["soft", "bos", "question", "rationale"]
    assert d.boundaries == tuple(lay.spans[n][0] - start for n in names[1:])
    assert d.marked_cols == (2,)


# ---------------------------------------------------------------------------------------------
# Correct vs wrong, contingency, trigger, head maps, before/after
# ---------------------------------------------------------------------------------------------


def test_correct_vs_wrong_deep_layer_means(records):
    d = P.correct_wrong_data(records)
    assert d["layers"] == [3]  # the records' own deep layers
    assert d["correct_ids"] == ["b", "c"] and d["wrong_ids"] == ["a", "d"]
    np.testing.assert_allclose(d["correct"], [2, 4])
    np.testing.assert_allclose(d["wrong"], [6, 8])
    two = P.correct_wrong_data(records, layers=[2, 3])
    np.testing.assert_allclose(two["correct"], [2.5, 2.5])
    np.testing.assert_allclose(two["wrong"], [4, 6.5])
    prop = P.correct_wrong_data(records, layers=[0], proportions=True)
    np.testing.assert_allclose(prop["correct"], [1 / 4, 3 / 8])
    np.testing.assert_allclose(prop["wrong"], [2 / 4, 3 / 4])
    by_dpc = P.correct_wrong_data(records, method="dpc")
    assert by_dpc["correct_ids"] == ["a", "b"]


def test_contingency_counts_and_cells(records):
    d = P.contingency_data(records)
    cells = ("accum_change", "accum_no_change", "no_accum_change", "no_accum_no_change")
    assert [d[c] for c in cells] == [1, 1, 1, 1]
    np.testing.assert_array_equal(d["table"], [[1, 1], [1, 1]])
    # PT correct: a wrong (accum, change), b right (accum, none), c right (none, change), d wrong
    np.testing.assert_array_equal(d["accuracy_table"], [[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(d["accumulation"], [2.5, 2.5, 1.0, 1.0])
    np.testing.assert_allclose(d["affected_share"], [0.5, 0.0, 0.5, 0.0])
    assert d["ids"] == ["a", "b", "c", "d"]  # e has no trigger
    assert d["accumulation_threshold"] == 2.0 and d["R"] == 0.4 and d["measure"] == "max_over_mean"
    strict = P.contingency_data(records, accumulation_threshold=3.0)
    np.testing.assert_array_equal(strict["table"], [[0, 0], [2, 2]])
    with pytest.raises(InputError, match="no record has a trigger"):
        P.contingency_data([records[-1]])


def test_trigger_data_by_hand(records):
    d = P.trigger_data(records[0])
    np.testing.assert_allclose(d["f"], [0.1, 0.3, 0.5, 0.1])
    assert d["n_first"] == 2
    assert d["beta"] == pytest.approx(0.2)
    assert d["affected_indices"] == [2]
    np.testing.assert_array_equal(d["affected"], [False, False, True, False])
    assert d["affected_share"] == 0.5 and d["R"] == 0.4 and d["fired"]
    assert d["deep_layers"] == [3] and d["shallow_layers"] == [1]
    np.testing.assert_allclose(d["scores"], [1, 10, 1])
    assert d["top_indices"] == [1]
    assert P.trigger_data(records[0]["trigger"])["beta"] == d["beta"]
    with pytest.raises(InputError, match="no trigger decision"):
        P.trigger_data(records[-1])


def test_head_maps_by_hand():
    res = hand_result(per_head=True)
    m, layers = P.head_map_data(res, "soft->rationale")
    assert layers == (1, 2, 4) and m.shape == (3, 2)
    s = res.flow_sums[:, :, 0, 2, 0].numpy() / 4  # head 0, both examples have 4 pairs
    np.testing.assert_allclose(m[:, 0], s.mean(1))
    np.testing.assert_allclose(m[:, 1], 2 * s.mean(1))
    one, _ = P.head_map_data(res, "soft->question", example=1)
    np.testing.assert_allclose(one[:, 0], res.flow_sums[:, 1, 0, 1, 0].numpy() / 2)
    with pytest.raises(InputError, match="per_head=True"):
        P.head_map_data(hand_result(), "soft->rationale")


def test_before_after_by_hand(records):
    d = P.before_after_data(records)
    assert d["n"] == 5 and d["n_fired"] == 2
    assert d["accuracy"] == {"base": 1 / 5, "pt": 2 / 5, "dpc": 2 / 5, "oracle": 3 / 5}
    assert d["flips"] == {"wrong_to_right": 1, "right_to_wrong": 1,
                          "unchanged_right": 1, "unchanged_wrong": 2}
    assert d["answer_changed"] == 2
    assert d["n_soft"] == 3
    # fired: a located soft row 1, c located row 0 (an even spread ties -> lowest position)
    np.testing.assert_array_equal(d["corrupted"], [1, 1, 0])
    np.testing.assert_array_equal(d["located"], [2, 2, 0])
    with pytest.raises(InputError, match="no 'random' answer"):
        P.before_after_data(records, method="random")


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def test_every_figure_renders_to_png(records, tiny_result, tmp_path):
    from matplotlib.figure import Figure

    per_head = hand_result(per_head=True)
    figs = {
        "curves": P.plot_flow_curves(records),
        "curves_iqr": P.plot_flow_curves(tiny_result, proportions=False, band="iqr"),
        "heatmap": P.plot_saliency_heatmap(tiny_result, 0, layers=[1], marked=records[0]),
        "heatmap_lin": P.plot_saliency_heatmap(hand_result(), 1, log=False, tokens=list("abcde")),
        "cvw": P.plot_correct_vs_wrong(records),
        "cvw_one_group": P.plot_correct_vs_wrong(records[:1]),
        "contingency": P.plot_contingency(records),
        "trigger": P.plot_trigger(records[0], tokens=["w", "x", "y", "z"]),
        "trigger_calm": P.plot_trigger(records[1]["trigger"]),
        "heads": P.plot_head_maps(per_head, ["soft->question", "soft->rationale"]),
        "heads_default": P.plot_head_maps(per_head, example=0),
        "before_after": P.plot_before_after(records),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        path = P.save(fig, tmp_path / "figs" / f"{name}.png")
        assert is_png(path), name
    svg = P.save(figs["curves"], tmp_path / "curves.svg")
    assert "<svg" in open(svg, encoding="utf-8").read(2000)
    with pytest.raises(InputError, match=".png or .svg"):
        P.save(figs["curves"], tmp_path / "curves.jpg")
    with pytest.raises(InputError, match="labels"):
        P.plot_trigger(records[0], tokens=["too", "few"])


def test_save_standard_figures_reads_records_jsonl(records, tmp_path):
    with open(tmp_path / "records.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    paths = P.save_standard_figures(tmp_path)
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert names == ["flow_curves.png", "flow_curves_raw.png", "correct_vs_wrong.png",
                     "contingency.png", "before_after.png", "trigger_a.png"]
    assert all(is_png(p) and p.startswith(str(tmp_path / "figures")) for p in paths)
    # without flows or triggers only the before/after figure can be drawn
    bare = [{k: v for k, v in r.items() if k not in ("flows", "trigger")} for r in records]
    only = P.save_standard_figures(tmp_path / "bare", bare)
    assert [p.rsplit("/", 1)[-1] for p in only] == ["before_after.png"]
    with pytest.raises(DataError, match="no records"):
        P.save_standard_figures(tmp_path / "empty")


def test_interactive_view_is_optional(monkeypatch):
    res = hand_result()
    monkeypatch.setitem(sys.modules, "circuitsvis", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install circuitsvis"):
        P.interactive_saliency(res, 0)
    seen = {}

    def attention_patterns(tokens, attention):
        seen.update(tokens=tokens, attention=attention)
        return "view"

    fake = types.ModuleType("circuitsvis")
    fake.attention = types.SimpleNamespace(attention_patterns=attention_patterns)
    monkeypatch.setitem(sys.modules, "circuitsvis", fake)
    assert P.interactive_saliency(res, 1) == "view"
    assert seen["tokens"] == ["soft0", "soft1", "question0", "rationale0", "rationale1"]
    assert tuple(seen["attention"].shape) == (1, 5, 5)
    assert float(seen["attention"].max()) == pytest.approx(1.0)


def test_importing_plotting_does_not_import_matplotlib():
    code = "import sys, dpc_lens.plotting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
