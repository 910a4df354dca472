"""Layer axes stay readable on deep models (issue 18, item 6): a 30-layer flow-curve figure and a
30-layer head map label a handful of integer layers, and no two tick labels overlap once drawn."""

from __future__ import annotations

import numpy as np
import pytest

from dpc_lens import plotting as P


def _visible_ticks(axis, lo, hi):
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def _label_boxes(fig, axis):
    """The drawn extents of ``axis``'s tick labels that lie inside the axis's view."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    lo, hi = sorted(axis.get_view_interval())
    return [t.label1.get_window_extent(renderer) for t in axis.get_major_ticks()
            if lo - 1e-9 <= t.get_loc() <= hi + 1e-9 and t.label1.get_visible() and t.label1.get_text()]


def _overlaps(boxes):
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def _flows(n_layers, n_instances=3):
    rng = np.random.default_rng(0)
    return [{"soft->question": list(rng.random(n_layers)), "soft->rationale": list(rng.random(n_layers)),
             "question->rationale": list(rng.random(n_layers))} for _ in range(n_instances)]


@pytest.mark.parametrize("n_layers", [30, 64])
def test_a_deep_flow_curve_has_a_few_integer_layer_ticks_that_do_not_overlap(n_layers):
    fig = P.plot_flow_curves(_flows(n_layers))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = _visible_ticks(ax.xaxis, lo, hi)
    assert 3 <= len(ticks) <= P.saliency.MAX_LAYER_TICKS
    assert all(float(t).is_integer() for t in ticks)
    assert min(ticks) >= 0 and max(ticks) <= n_layers  # inside the axis (which has a small margin)
    steps = set(np.diff(ticks))
    assert len(steps) == 1 and steps.pop() in (2, 5, 10, 20)  # a regular, round step
    boxes = _label_boxes(fig, ax.xaxis)
    assert len(boxes) == len(ticks) and not _overlaps(boxes)


def test_the_old_every_layer_ticks_did_overlap_at_30_layers():
    """The check above can fail: one tick per layer (the old axis) overlaps at 30 layers."""
    fig = P.plot_flow_curves(_flows(30))
    ax = fig.axes[0]
    ax.set_xticks(range(30))
    assert _overlaps(_label_boxes(fig, ax.xaxis))


def test_a_shallow_model_still_labels_every_layer():
    fig = P.plot_flow_curves(_flows(2))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert _visible_ticks(ax.xaxis, lo, hi) == [0, 1]


def test_head_map_rows_are_labelled_with_their_layers_every_few_rows():
    from matplotlib.figure import Figure

    from dpc_lens.plotting.saliency import _layer_ticks

    layers = list(range(3, 33))  # 30 layers that do not start at 0: labels are layers, not rows
    fig = Figure(figsize=(4.2, 3.8), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(np.zeros((30, 4)), aspect="auto")
    _layer_ticks(ax.yaxis, layers)
    ax.tick_params(axis="y", labelsize=7)
    boxes = _label_boxes(fig, ax.yaxis)
    texts = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert texts == [str(layers[i]) for i in range(0, 30, 3)]  # ceil(30 / 12) = 3 rows per tick
    assert not _overlaps(boxes)
