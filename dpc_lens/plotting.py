"""Figures of saliency flows, the DPC detector and DPC's outcome, drawn from results only.

Every figure here is built from objects the library already produced — a
:class:`~dpc_lens.saliency.SaliencyResult`, DPC records (:func:`dpc_lens.dpc.run_dpc`, or
:func:`dpc_lens.dpc.read_records` on a ``records.jsonl``), a trigger dict
(:meth:`~dpc_lens.detector.TriggerDecision.to_dict`) — and never runs a model.

Each figure has two halves:

* a pure **data** function (``*_data``) that returns exactly the numbers the figure draws, as
  numpy arrays and plain dicts, so the tests check values, shapes, segment boundaries and marked
  columns without looking at pixels;
* a **builder** (``plot_*``) that draws those numbers and returns a
  :class:`matplotlib.figure.Figure`.

Figure / data pairs:

=========================  ==============================  =====================================
figure                     data                            input
=========================  ==============================  =====================================
:func:`plot_flow_curves`   :func:`flow_curve_data`         records, flows dicts or a result
:func:`plot_saliency_heatmap` :func:`heatmap_data`         a result with ``keep_full=True``
:func:`plot_correct_vs_wrong` :func:`correct_wrong_data`   records
:func:`plot_contingency`   :func:`contingency_data`        records (their trigger dicts)
:func:`plot_trigger`       :func:`trigger_data`            one record / trigger dict / decision
:func:`plot_head_maps`     :func:`head_map_data`           a result with ``per_head=True``
:func:`plot_before_after`  :func:`before_after_data`       records
=========================  ==============================  =====================================

:func:`save` writes a figure as PNG or SVG (by the file extension); :func:`save_standard_figures`
writes the standard set for a DPC output directory (what ``dpc-lens dpc --plots`` calls).
:func:`interactive_saliency` shows a saliency map through circuitsvis when that package is
installed (it is never required).

matplotlib is imported inside the builders only. They create ``matplotlib.figure.Figure``
objects directly, without pyplot: no backend is selected, no global figure list grows, and
saving renders with Agg, so the builders work on a machine without a display. In Jupyter the
inline backend displays a returned figure as usual.
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .errors import DataError, InputError

if TYPE_CHECKING:  # matplotlib is imported lazily, inside the builders
    from matplotlib.figure import Figure

    from .saliency import SaliencyResult

__all__ = [
    "DPC_FLOWS",
    "IAP_FLOWS",
    "FlowCurves",
    "HeatmapData",
    "flow_curve_data",
    "heatmap_data",
    "correct_wrong_data",
    "contingency_data",
    "trigger_data",
    "head_map_data",
    "before_after_data",
    "plot_flow_curves",
    "plot_saliency_heatmap",
    "plot_correct_vs_wrong",
    "plot_contingency",
    "plot_trigger",
    "plot_head_maps",
    "plot_before_after",
    "save",
    "save_standard_figures",
    "interactive_saliency",
]

# The flow names of both methods (the same strings as dpc_lens.dpc.DPC_FLOWS and
# dpc_lens.iap.IAP_FLOWS; spelled here so importing this module stays light).
DPC_FLOWS: tuple[str, str, str] = ("soft->question", "soft->rationale", "question->rationale")
IAP_FLOWS: tuple[str, str, str] = ("question->prompt", "question->rationale", "prompt->rationale")

Band = Literal["std", "iqr"]
_BANDS = ("std", "iqr")
#: Colours per flow name, fixed so one flow has one colour in every figure.
_FLOW_COLOURS = {
    "soft->question": "#1f77b4",
    "soft->rationale": "#d62728",
    "question->rationale": "#2ca02c",
    "question->prompt": "#9467bd",
    "prompt->rationale": "#ff7f0e",
}
_METHOD_ORDER = ("base", "pt", "dpc", "always", "random", "oracle")
_METHOD_LABELS = {"base": "base", "pt": "prompt\ntuning", "dpc": "DPC", "always": "always\ncorrupt",
                  "random": "random\ncorrupt", "oracle": "oracle\n(base|PT)"}


# =============================================================================================
# Inputs
# =============================================================================================


def _is_result(obj: Any) -> bool:
    from .saliency import SaliencyResult

    return isinstance(obj, SaliencyResult)


def _flows_of(item: Any, k: int) -> Mapping[str, Any] | None:
    """The per-layer flows of one item: a DPC record (its ``"flows"``) or a bare flows dict."""
    if not isinstance(item, Mapping):
        raise InputError(
            f"item {k} is a {type(item).__name__}; expected a DPC record (a dict with 'flows') or "
            "a flows dict such as {'soft->rationale': [per-layer values], ...}."
        )
    if "flows" in item:
        return item["flows"] or None  # an empty rationale has no flows: skipped
    if item and all(isinstance(key, str) and "->" in key for key in item):
        return item
    raise InputError(
        f"item {k} has neither 'flows' nor 'source->target' keys (it has {sorted(item)[:6]}); "
        "pass DPC records or flows dicts."
    )


def _as_items(source: Any) -> list[Any]:
    if isinstance(source, Mapping):
        return [source]
    if isinstance(source, (str, bytes)) or not isinstance(source, Sequence):
        raise InputError(
            f"expected a list of DPC records (or flows dicts) or a SaliencyResult, got "
            f"{type(source).__name__}; read a records.jsonl with dpc_lens.dpc.read_records."
        )
    return list(source)


def _default_names(segment_names: Sequence[str]) -> tuple[str, ...]:
    segs = set(segment_names)
    for names in (DPC_FLOWS, IAP_FLOWS):
        if all(set(n.split("->")) <= segs for n in names):
            return names
    raise InputError(
        f"this result has segments {list(segment_names)}, which hold neither the DPC flows "
        f"{list(DPC_FLOWS)} nor the IAP flows {list(IAP_FLOWS)}; pass names=[...] explicitly."
    )


def _instance_flows(
    source: Any, names: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...], dict[str, np.ndarray]]:
    """``(layers, names, {name: [layer, instance]})`` from records, flows dicts or a result."""
    if _is_result(source):
        if source.config.per_head:
            raise InputError(
                "this SaliencyResult keeps the head axis (per_head=True); flow curves need the "
                "head-summed saliency. Use plot_head_maps for per-head results, or compute "
                "saliency again with per_head=False."
            )
        names = tuple(names) if names is not None else _default_names(source.segment_names)
        flows = source.flows(names)
        return (np.asarray(source.layers), names,
                {n: v.detach().double().cpu().numpy() for n, v in flows.items()})
    items = _as_items(source)
    per_item = [f for k, item in enumerate(items) if (f := _flows_of(item, k)) is not None]
    if not per_item:
        raise InputError(
            f"none of the {len(items)} records has flows (every rationale was empty); there is "
            "nothing to plot."
        )
    if names is None:  # the DPC or the IAP flows, whichever the items hold (they share one)
        names = next((ns for ns in (DPC_FLOWS, IAP_FLOWS) if all(n in per_item[0] for n in ns)),
                     tuple(per_item[0]))
    names = tuple(dict.fromkeys(names))
    cols: dict[str, list[np.ndarray]] = {n: [] for n in names}
    n_layers = None
    for k, f in enumerate(per_item):
        missing = [n for n in names if n not in f]
        if missing:
            raise InputError(f"record {k} has no flows {missing}; it has {sorted(f)}.")
        for n in names:
            v = np.asarray(f[n], dtype=np.float64).reshape(-1)
            if n_layers is None:
                n_layers = v.shape[0]
            if v.shape[0] != n_layers:
                raise InputError(
                    f"record {k}: flow {n!r} has {v.shape[0]} layers but earlier records have "
                    f"{n_layers}; records from different models cannot be averaged."
                )
            cols[n].append(v)
    return np.arange(n_layers), names, {n: np.stack(v, axis=1) for n, v in cols.items()}


def _proportions(flows: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    from .flows import flow_proportions

    props = flow_proportions({n: torch.from_numpy(flows[n]) for n in names}, names)
    return {n: props[n].double().numpy() for n in names}


@contextmanager
def _quiet_nan() -> Iterator[None]:
    """numpy warns on all-NaN slices; an all-NaN layer is a NaN point, not a problem."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# =============================================================================================
# Per-layer flow curves
# =============================================================================================


@dataclass(frozen=True)
class FlowCurves:
    """The per-layer curves :func:`plot_flow_curves` draws.

    Attributes:
        layers: ``[layer]`` model layer indices (the x axis).
        names: the flows, in drawing order.
        center: per flow ``[layer]``: the mean over instances (``band="std"``) or the median
            (``band="iqr"``).
        lo, hi: per flow ``[layer]``: the band, ``mean -/+ std`` (population std, ddof=0) or the
            25th / 75th percentiles.
        n: per flow ``[layer]``: instances with a finite value at that layer (NaN flows, e.g. a
            segment pair without any pair of positions, are left out).
        band: ``"std"`` or ``"iqr"``.
        proportions: whether the values are per-layer proportions over ``names`` (they sum to 1
            per layer and instance, as Wang et al. plot them) or raw mean saliency.
    """

    layers: np.ndarray
    names: tuple[str, ...]
    center: dict[str, np.ndarray]
    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]
    n: dict[str, np.ndarray]
    band: str
    proportions: bool


def flow_curve_data(
    source: Any,
    names: Sequence[str] | None = None,
    *,
    proportions: bool = True,
    band: Band = "std",
) -> FlowCurves:
    """Per-layer flows averaged over instances, with a spread band.

    Args:
        source: DPC records (their ``"flows"``: per-layer mean saliency of each flow), flows
            dicts ``{"source->target": [per-layer values]}`` (e.g. IAP's per (question, prompt)
            flows), or a head-summed :class:`~dpc_lens.saliency.SaliencyResult` (every example of
            its batch is an instance). Records without flows (empty rationale) are skipped.
        names: flows to draw (default: the DPC flows, or the IAP flows for a result whose
            segments are ``question / prompt / rationale``).
        proportions: as Wang et al. plot them: the raw flows are averaged over instances first
            (mean, or median with ``band="iqr"``), then normalised per layer,
            ``p_k = avg flow_k / sum_k' avg flow_k'`` over ``names``, so the curves sum to 1 at
            every layer. An instance enters a layer only when all of ``names`` are finite there.
            The band is the spread of the per-instance proportions (:func:`dpc_lens.flows.
            flow_proportions`) around that curve. False: raw values.
        band: ``"std"`` (mean and mean -/+ population std) or ``"iqr"`` (median and the 25th /
            75th percentiles).
    """
    if band not in _BANDS:
        raise InputError(f"band must be one of {_BANDS}, got {band!r}.")
    layers, names, flows = _instance_flows(source, names)
    center, lo, hi, count = {}, {}, {}, {}
    if proportions:
        ok = np.logical_and.reduce([np.isfinite(flows[n]) for n in names])  # [layer, instance]
        flows = {n: np.where(ok, flows[n], np.nan) for n in names}
        per_instance = _proportions(flows, names)
    with _quiet_nan():
        for n in names:
            v = flows[n]  # [layer, instance]
            count[n] = np.isfinite(v).sum(axis=1)
            if band == "std":
                m = np.nanmean(v, axis=1)
                s = np.nanstd(v, axis=1)
                center[n], lo[n], hi[n] = m, m - s, m + s
            else:
                q25, q50, q75 = np.nanpercentile(v, [25, 50, 75], axis=1)
                center[n], lo[n], hi[n] = q50, q25, q75
        if proportions:
            total = sum(center[n] for n in names)
            for n in names:
                c = np.where(total != 0, center[n] / np.where(total != 0, total, 1.0), np.nan)
                p = per_instance[n]
                if band == "std":
                    s = np.nanstd(p, axis=1)
                    lo[n], hi[n] = c - s, c + s
                else:
                    lo[n], hi[n] = np.nanpercentile(p, [25, 75], axis=1)
                center[n] = c
    return FlowCurves(layers, tuple(names), center, lo, hi, count, band, bool(proportions))


def plot_flow_curves(
    source: Any,
    names: Sequence[str] | None = None,
    *,
    proportions: bool = True,
    band: Band = "std",
    title: str | None = None,
) -> Figure:
    """Per-layer flow curves with a band (see :func:`flow_curve_data` for the numbers)."""
    d = flow_curve_data(source, names, proportions=proportions, band=band)
    fig, ax = _figure(1, 1, (6.4, 4.0))
    for n in d.names:
        c = _FLOW_COLOURS.get(n)
        ax.plot(d.layers, d.center[n], marker="o", ms=3, color=c, label=f"{n} (n={int(d.n[n].max())})")
        ax.fill_between(d.layers, d.lo[n], d.hi[n], color=c, alpha=0.2, linewidth=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("proportion of the flows" if d.proportions else "mean saliency")
    spread = "mean ± std" if d.band == "std" else "median, IQR"
    ax.set_title(title or f"Per-layer information flow ({spread} over instances)")
    if len(d.layers) <= 40:
        ax.set_xticks(d.layers)
    if d.proportions:
        ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# =============================================================================================
# Saliency heatmap of one instance
# =============================================================================================


@dataclass(frozen=True)
class HeatmapData:
    """One instance's saliency map over a layer range, cropped to its real positions.

    Attributes:
        matrix: ``[query_pos, key_pos]`` — ``I_l`` summed (or averaged) over ``layers``; row i is
            the target token, column j the source (SPEC section 2).
        offset: padded position of row/column 0 (the example's left padding is cropped away).
        segments: ``(name, start, end)`` in matrix coordinates, ordered by start.
        boundaries: the start of every segment after the first (lines are drawn at ``b - 0.5``).
        marked_cols: columns (matrix coordinates) of the marked soft tokens, e.g. the located
            accumulation tokens.
        layers: the model layers combined.
        reduce: ``"sum"`` or ``"mean"``.
    """

    matrix: np.ndarray
    offset: int
    segments: tuple[tuple[str, int, int], ...]
    boundaries: tuple[int, ...]
    marked_cols: tuple[int, ...]
    layers: tuple[int, ...]
    reduce: str


def _soft_rows(marked: Any) -> list[int]:
    """Soft-row indices from ints, a TriggerDecision, its dict, or a record holding one."""
    from .dpc import TriggerDecision

    if marked is None:
        return []
    if isinstance(marked, TriggerDecision):
        return list(marked.accumulation.top_indices)
    if isinstance(marked, Mapping):
        if "trigger" in marked:  # a DPC record
            if not marked["trigger"]:
                return []
            marked = marked["trigger"]
        try:
            return [int(i) for i in marked["accumulation"]["top_indices"]]
        except (KeyError, TypeError):
            raise InputError(
                "marked is a dict without accumulation.top_indices; pass soft-row indices, a "
                "TriggerDecision, TriggerDecision.to_dict() or a DPC record."
            ) from None
    if isinstance(marked, (int, np.integer)):
        return [int(marked)]
    try:
        return [int(i) for i in marked]
    except (TypeError, ValueError):
        raise InputError(
            f"marked must be soft-row indices, a TriggerDecision or its dict; got {marked!r}."
        ) from None


def heatmap_data(
    result: SaliencyResult,
    example: int = 0,
    layers: Sequence[int] | None = None,
    *,
    reduce: Literal["sum", "mean"] = "sum",
    marked: Any = None,
    head: int | None = None,
) -> HeatmapData:
    """The saliency map of one example summed (or averaged) over ``layers``.

    Args:
        result: a :class:`~dpc_lens.saliency.SaliencyResult` computed with ``keep_full=True``.
        example: index in the batch.
        layers: model layer indices (each must be in ``result.layers``; a ``range`` works);
            default every layer of the result.
        reduce: ``"sum"`` or ``"mean"`` over the chosen layers.
        marked: soft-prompt rows to mark as columns: indices into the soft prompt (0 = its first
            token), a :class:`~dpc_lens.detector.TriggerDecision`, its ``to_dict()`` or a DPC
            record (its located accumulation tokens ``top_indices``).
        head: for a ``per_head`` result, which head to show (required there).
    """
    if result.full is None:
        raise InputError(
            "this SaliencyResult has no full maps; compute it with "
            "SaliencyConfig(keep_full=True) to draw a heatmap."
        )
    if reduce not in ("sum", "mean"):
        raise InputError(f"reduce must be 'sum' or 'mean', got {reduce!r}.")
    n_ex = result.full.shape[1]
    if not -n_ex <= example < n_ex:
        raise InputError(f"example {example} is out of range for a batch of {n_ex}.")
    example = example % n_ex
    chosen = list(result.layers) if layers is None else [int(x) for x in layers]
    if not chosen:
        raise InputError("layers is empty; give at least one layer (or None for all).")
    missing = [x for x in chosen if x not in result.layers]
    if missing:
        raise InputError(f"layers {missing} are not in this result; it has layers {list(result.layers)}.")
    idx = [result.layers.index(x) for x in chosen]
    full = result.full[idx, example]  # [L, (head), q, k]
    if result.config.per_head:
        if head is None:
            raise InputError(
                f"this result keeps {full.shape[1]} heads (per_head=True); pass head=<index> to "
                "choose one."
            )
        if not 0 <= head < full.shape[1]:
            raise InputError(f"head {head} is out of range (0..{full.shape[1] - 1}).")
        full = full[:, head]
    elif head is not None:
        raise InputError("head is only meaningful for a per_head result; leave it None.")
    m = full.double().sum(0) if reduce == "sum" else full.double().mean(0)
    lay = result.layouts[example]
    spans = sorted((s, e, n) for n, (s, e) in lay.spans.items() if e > s)
    offset = spans[0][0] if spans else 0
    matrix = m[offset:lay.length, offset:lay.length].cpu().numpy()
    segments = tuple((n, s - offset, e - offset) for s, e, n in spans)
    boundaries = tuple(s for _, s, _ in segments[1:])
    rows = _soft_rows(marked)
    marked_cols: list[int] = []
    if rows:
        if "soft" not in lay.spans:
            raise InputError("marked soft rows were given but this example has no 'soft' segment.")
        s0, s1 = lay.spans["soft"]
        bad = [r for r in rows if not 0 <= r < s1 - s0]
        if bad:
            raise InputError(f"marked soft rows {bad} are outside the soft prompt (0..{s1 - s0 - 1}).")
        marked_cols = [s0 - offset + r for r in rows]
    return HeatmapData(matrix, offset, segments, boundaries, tuple(marked_cols), tuple(chosen), reduce)


def plot_saliency_heatmap(
    result: SaliencyResult,
    example: int = 0,
    layers: Sequence[int] | None = None,
    *,
    reduce: Literal["sum", "mean"] = "sum",
    marked: Any = None,
    head: int | None = None,
    log: bool = True,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Heatmap of one example's saliency (rows: targets, columns: sources), with segment
    boundaries and the marked soft columns. ``log``: logarithmic colour scale (saliency is
    heavy-tailed); the causal upper triangle and zeros are left blank. ``tokens``: one label per
    matrix position."""
    from matplotlib.colors import LogNorm, Normalize

    d = heatmap_data(result, example, layers, reduce=reduce, marked=marked, head=head)
    T = d.matrix.shape[0]
    fig, ax = _figure(1, 1, (6.8, 6.0))
    shown = np.ma.masked_where(~(d.matrix > 0), d.matrix)
    if log and shown.count():
        pos = d.matrix[d.matrix > 0]
        top = float(pos.max())
        norm = LogNorm(vmin=max(float(np.percentile(pos, 1)), top * 1e-6), vmax=top)
    else:
        vmax = float(d.matrix.max()) if d.matrix.size else 0.0
        norm = Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    im = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"saliency ({d.reduce} over layers)")
    for b in d.boundaries:
        ax.axhline(b - 0.5, color="white", lw=1.0)
        ax.axvline(b - 0.5, color="white", lw=1.0)
    for c in d.marked_cols:
        ax.axvline(c, color="red", lw=1.2, ls="--")
    if tokens is not None:
        if len(tokens) != T:
            raise InputError(f"tokens has {len(tokens)} labels for a {T} x {T} map.")
        ax.set_xticks(range(T))
        ax.set_xticklabels(tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(T))
        ax.set_yticklabels(tokens, fontsize=6)
    else:
        mids = [(s + e - 1) / 2 for _, s, e in d.segments]
        ax.set_xticks(mids)
        ax.set_xticklabels([n for n, _, _ in d.segments], rotation=30, fontsize=8)
        ax.set_yticks(mids)
        ax.set_yticklabels([n for n, _, _ in d.segments], fontsize=8)
    ax.set_xlabel("source token j (key)")
    ax.set_ylabel("target token i (query)")
    lr = _layer_text(d.layers)
    extra = f"; dashed: marked soft tokens {list(d.marked_cols)}" if d.marked_cols else ""
    ax.set_title(title or f"Saliency of example {example}, layers {lr}{extra}", fontsize=9)
    fig.tight_layout()
    return fig


def _layer_text(layers: Sequence[int]) -> str:
    ls = list(layers)
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(str(x) for x in ls)


# =============================================================================================
# Correct vs wrong
# =============================================================================================


def _records(records: Any, what: str) -> list[dict[str, Any]]:
    items = _as_items(records)
    if not items:
        raise InputError(f"{what}: got no records.")
    for k, r in enumerate(items):
        if not isinstance(r, Mapping):
            raise InputError(f"{what}: record {k} is a {type(r).__name__}, expected a dict.")
    return items


def _deep_layers(records: Sequence[Mapping[str, Any]], n_layers: int, layers: Any) -> list[int]:
    from .layers import resolve_layers

    if layers is None:
        for r in records:
            if r.get("trigger"):
                return [int(x) for x in r["trigger"]["deep_layers"]]
        layers = "deep"
    return resolve_layers(layers, n_layers)


def correct_wrong_data(
    records: Sequence[Mapping[str, Any]],
    *,
    flow: str = "soft->rationale",
    layers: Any = None,
    method: str = "pt",
    proportions: bool = False,
) -> dict[str, Any]:
    """Deep-layer flow per instance, split by whether ``method``'s answer was correct.

    Value of an instance: the mean over ``layers`` of its per-layer ``flows[flow]`` (NaN layers
    left out; instances with no finite value, or no flows, are dropped). With ``proportions``
    the per-layer proportion of ``flow`` among the DPC flows is used instead of the raw mean
    saliency: raw saliency grows with the loss, so wrong answers show larger raw flows of every
    kind (SPEC section 3), and the proportion removes that common scale.

    Args:
        layers: a :func:`dpc_lens.detector.resolve_layers` spec; default the records' own deep
            layers (from their trigger dicts), else ``"deep"``.
        method: whose correctness splits the instances (``"pt"``: vanilla prompt tuning, whose
            generation the flows were measured on).

    Returns:
        ``{"correct": array, "wrong": array, "correct_ids": [...], "wrong_ids": [...],
        "layers": [...], "flow", "method", "proportions"}``.
    """
    recs = _records(records, "correct_wrong_data")
    names = DPC_FLOWS if proportions else (flow,)
    if proportions and flow not in DPC_FLOWS:
        raise InputError(f"proportions are over the DPC flows {list(DPC_FLOWS)}; {flow!r} is not one.")
    with_flows = [r for r in recs if r.get("flows")]
    if not with_flows:
        raise InputError("correct_wrong_data: no record has flows (every rationale was empty).")
    layers_axis, _, flows = _instance_flows(with_flows, names)
    if proportions:
        flows = _proportions(flows, names)
    chosen = _deep_layers(with_flows, len(layers_axis), layers)
    with _quiet_nan():
        values = np.nanmean(flows[flow][chosen], axis=0)
    out: dict[str, Any] = {"correct": [], "wrong": [], "correct_ids": [], "wrong_ids": []}
    for r, v in zip(with_flows, values):
        if method not in r:
            raise InputError(f"record {r.get('id')!r} has no {method!r} answer; it has {sorted(r)}.")
        if not np.isfinite(v):
            continue
        key = "correct" if r[method]["correct"] else "wrong"
        out[key].append(float(v))
        out[key + "_ids"].append(r.get("id"))
    out["correct"] = np.asarray(out["correct"], dtype=np.float64)
    out["wrong"] = np.asarray(out["wrong"], dtype=np.float64)
    out.update(layers=chosen, flow=flow, method=method, proportions=bool(proportions))
    return out


def plot_correct_vs_wrong(
    records: Sequence[Mapping[str, Any]],
    *,
    flow: str = "soft->rationale",
    layers: Any = None,
    method: str = "pt",
) -> Figure:
    """Deep-layer ``flow`` of correct vs wrong instances side by side: raw mean saliency (left)
    and its proportion among the DPC flows (right), each as a box with every instance as a dot."""
    fig, axes = _figure(1, 2, (8.8, 3.8))
    for ax, prop in zip(axes, (False, True)):
        d = correct_wrong_data(records, flow=flow, layers=layers, method=method, proportions=prop)
        groups = [("correct", d["correct"], "#2ca02c"), ("wrong", d["wrong"], "#d62728")]
        rng = np.random.default_rng(0)  # fixed jitter: the same records give the same picture
        for x, (_, vals, colour) in enumerate(groups):
            if vals.size:
                ax.boxplot([vals], positions=[x], widths=0.5, showfliers=False,
                           medianprops={"color": "black"})
                ax.scatter(x + rng.uniform(-0.12, 0.12, vals.size), vals, s=12, color=colour,
                           alpha=0.7, zorder=3)
            else:
                ax.text(x, 0.5, "none", transform=ax.get_xaxis_transform(), ha="center", color="gray")
        ax.set_xticks([0, 1])
        ax.set_xticklabels([f"{g} (n={v.size})" for g, v, _ in groups])
        ax.set_xlim(-0.6, 1.6)
        ax.set_ylabel(f"share of {flow}" if prop else f"mean {flow} saliency")
        kind = "proportion among DPC flows" if prop else "raw"
        ax.set_title(f"{kind}, layers {_layer_text(d['layers'])}", fontsize=9)
    fig.suptitle(f"Deep-layer {flow} flow by {method.upper()} correctness", fontsize=10)
    fig.tight_layout()
    return fig


# =============================================================================================
# Accumulation vs deep-flow change (the paper's Fig. 5)
# =============================================================================================


def _uniform(values: Sequence[Any]) -> Any:
    vals = list(values)
    return vals[0] if vals and all(v == vals[0] for v in vals) else None


def contingency_data(
    records: Sequence[Mapping[str, Any]],
    *,
    accumulation_threshold: float | None = None,
    measure: str | None = None,
    method: str = "pt",
) -> dict[str, Any]:
    """Shallow accumulation vs deep-flow change over the records' trigger decisions (Fig. 5).

    Counts come from :func:`dpc_lens.detector.accumulation_deepflow_contingency` on the
    decisions rebuilt from the records' trigger dicts (records without one are skipped).

    Returns:
        The contingency dict (``accum_change``, ``accum_no_change``, ``no_accum_change``,
        ``no_accum_no_change``, ``n``, ``p_change_given_accum``, ``p_change_given_no_accum``),
        plus ``table`` (2x2 array, rows: accumulation yes/no, columns: deep-flow change yes/no),
        ``accuracy_table`` (2x2 array: ``method``'s accuracy in each cell, NaN where empty),
        per-instance arrays ``accumulation`` (the measure's value), ``affected_share``,
        ``correct``, ``fired``, and ``ids``, and the thresholds used (``accumulation_threshold``,
        ``R``, ``measure``; ``None`` when the records' configs disagree).
    """
    from .dpc import TriggerDecision, accumulation_deepflow_contingency

    recs = [r for r in _records(records, "contingency_data") if r.get("trigger")]
    if not recs:
        raise InputError("contingency_data: no record has a trigger decision (every rationale was empty).")
    decisions = [TriggerDecision.from_dict(r["trigger"]) for r in recs]
    counts = accumulation_deepflow_contingency(decisions, accumulation_threshold, measure)
    meas = measure or _uniform([d.config.accumulation_measure for d in decisions])
    thr = accumulation_threshold if accumulation_threshold is not None else _uniform(
        [d.config.accumulation_threshold for d in decisions])
    if meas is None:
        acc = np.array([d.accumulation_value for d in decisions])
    else:
        acc = np.array([d.accumulation.measure(meas) for d in decisions])
    if accumulation_threshold is None and measure is None:
        present = np.array([d.accumulation_present for d in decisions])
    else:
        own = np.array([d.config.accumulation_threshold for d in decisions])
        present = acc >= (thr if thr is not None else own)
    change = np.array([d.flow_triggered for d in decisions])
    correct = np.array([bool(r[method]["correct"]) if method in r else False for r in recs])
    table = np.array([[counts["accum_change"], counts["accum_no_change"]],
                      [counts["no_accum_change"], counts["no_accum_no_change"]]])
    acc_table = np.full((2, 2), np.nan)
    for i, p in enumerate((True, False)):
        for j, c in enumerate((True, False)):
            cell = (present == p) & (change == c)
            if cell.any():
                acc_table[i, j] = correct[cell].mean()
    return {
        **counts,
        "table": table,
        "accuracy_table": acc_table,
        "accumulation": acc,
        "affected_share": np.array([d.deep_flow.affected_share for d in decisions]),
        "present": present,
        "change": change,
        "correct": correct,
        "fired": np.array([d.fired for d in decisions]),
        "ids": [r.get("id") for r in recs],
        "accumulation_threshold": thr,
        "R": _uniform([d.config.R for d in decisions]),
        "measure": meas,
        "method": method,
    }


def plot_contingency(
    records: Sequence[Mapping[str, Any]],
    *,
    accumulation_threshold: float | None = None,
    measure: str | None = None,
    method: str = "pt",
) -> Figure:
    """The paper's Fig. 5 panels from the records: (a) counts of shallow accumulation vs
    deep-flow change, (b) ``method``'s accuracy in each cell, (c) every instance placed by its
    accumulation measure and affected share, with the thresholds."""
    d = contingency_data(records, accumulation_threshold=accumulation_threshold, measure=measure,
                         method=method)
    fig, axes = _figure(1, 3, (12.5, 3.9))
    rows, cols = ["accumulation", "no accumulation"], ["deep-flow\nchange", "no change"]
    for ax, mat, fmt, ttl, cmap in (
        (axes[0], d["table"].astype(float), "{:.0f}", f"(a) instances (n={d['n']})", "Blues"),
        (axes[1], d["accuracy_table"], "{:.0%}", f"(b) {method.upper()} accuracy per cell", "RdYlGn"),
    ):
        vmax = 1.0 if ax is axes[1] else max(float(np.nanmax(mat)), 1.0)
        ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0.0, vmax=vmax)
        for i in range(2):
            for j in range(2):
                v = mat[i, j]
                txt = "—" if not np.isfinite(v) else fmt.format(v)
                if ax is axes[1] and np.isfinite(v):
                    txt += f"\n(n={int(d['table'][i, j])})"
                dark = ax is axes[0] and np.isfinite(v) and v > 0.6 * vmax
                ax.text(j, i, txt, ha="center", va="center", fontsize=10, color="white" if dark else "black")
        ax.set_xticks([0, 1])
        ax.set_xticklabels(cols, fontsize=8)
        ax.set_yticks([0, 1])
        ax.set_yticklabels(rows, fontsize=8)
        ax.set_title(ttl, fontsize=9)
    ax = axes[2]
    colours = np.where(d["correct"], "#2ca02c", "#d62728")
    ax.scatter(d["accumulation"], d["affected_share"], c=list(colours), s=18, alpha=0.8,
               edgecolors=np.where(d["fired"], "black", "none").tolist())
    if d["accumulation_threshold"] is not None:
        ax.axvline(d["accumulation_threshold"], color="gray", ls="--", lw=1)
    if d["R"] is not None:
        ax.axhline(d["R"], color="gray", ls=":", lw=1)
    ax.set_xlabel(f"accumulation ({d['measure'] or 'each record own measure'})")
    ax.set_ylabel("affected share of r2")
    ax.set_title(f"(c) instances (green: {method.upper()} right, red: wrong; ring: fired)", fontsize=9)
    fig.suptitle("Shallow information accumulation vs deep-layer flow change", fontsize=10)
    fig.tight_layout()
    return fig


# =============================================================================================
# Why the trigger fired (one instance)
# =============================================================================================


def _trigger_dict(obj: Any) -> dict[str, Any]:
    from .dpc import TriggerDecision

    if isinstance(obj, TriggerDecision):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        if "trigger" in obj:
            if not obj["trigger"]:
                raise InputError(
                    f"record {obj.get('id')!r} has no trigger decision (empty rationale); pick "
                    "another record."
                )
            return dict(obj["trigger"])
        if "deep_flow" in obj and "accumulation" in obj:
            return dict(obj)
    raise InputError(
        f"expected a DPC record, TriggerDecision.to_dict() or a TriggerDecision, got "
        f"{type(obj).__name__}."
    )


def trigger_data(obj: Any) -> dict[str, Any]:
    """What the trigger saw on one instance: the deep-layer flow per rationale token ``f``, the
    split point ``n_first``, ``beta``, the affected tokens (second half, ``f > beta``), their
    share against ``R``, the decision, and the shallow-layer accumulation scores per soft token
    with the located ``top_indices``. Input: a DPC record, a trigger dict or a TriggerDecision."""
    t = _trigger_dict(obj)
    df, acc, cfg = t["deep_flow"], t["accumulation"], t.get("config", {})
    f = np.asarray(df["f"], dtype=np.float64)
    affected = np.zeros(f.shape[0], dtype=bool)
    affected[[int(i) for i in df["affected_indices"]]] = True
    return {
        "f": f,
        "n_first": int(df["n_first"]),
        "beta": df["beta"],
        "affected": affected,
        "affected_indices": [int(i) for i in df["affected_indices"]],
        "affected_share": float(df["affected_share"]),
        "defined": bool(df["defined"]),
        "R": cfg.get("R"),
        "deep_layers": list(t["deep_layers"]),
        "shallow_layers": list(t["shallow_layers"]),
        "statistic": t.get("statistic"),
        "scores": np.asarray(acc["scores"], dtype=np.float64),
        "top_indices": [int(i) for i in acc["top_indices"]],
        "accumulation_value": float(t["accumulation_value"]),
        "accumulation_measure": cfg.get("accumulation_measure"),
        "accumulation_threshold": cfg.get("accumulation_threshold"),
        "accumulation_present": bool(t["accumulation_present"]),
        "fired": bool(t["fired"]),
        "reason": str(t["reason"]),
    }


def plot_trigger(obj: Any, *, tokens: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Why the trigger fired (or not) on one instance: left, ``f_i`` per rationale token with
    beta, the half split and the affected tokens; right, the shallow accumulation score of every
    soft token with the located ones. ``tokens``: labels for the rationale tokens."""
    d = trigger_data(obj)
    fig, (ax, ax2) = _figure(1, 2, (11.0, 3.8), width_ratios=(2.2, 1.0))
    n = d["f"].shape[0]
    x = np.arange(n)
    colours = np.where(d["affected"], "#d62728", np.where(x < d["n_first"], "#bbbbbb", "#1f77b4"))
    ax.bar(x, d["f"], color=list(colours), width=0.8)
    if d["beta"] is not None:
        ax.axhline(d["beta"], color="black", ls="--", lw=1, label=f"beta = {d['beta']:.3g}")
    if 0 < d["n_first"] < n:
        ax.axvline(d["n_first"] - 0.5, color="gray", lw=1)
    ax.set_xlabel("rationale token (grey: r1, blue: r2, red: affected)")
    ax.set_ylabel(f"deep flow f_i ({d['statistic']})")
    if tokens is not None:
        if len(tokens) != n:
            raise InputError(f"tokens has {len(tokens)} labels for {n} rationale tokens.")
        ax.set_xticks(x)
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
    r_txt = f" vs R={d['R']:.3g}" if d["R"] is not None else ""
    ax.set_title(f"deep layers {_layer_text(d['deep_layers'])}: affected share "
                 f"{d['affected_share']:.2f}{r_txt} -> {'FIRED' if d['fired'] else 'not fired'}",
                 fontsize=9)
    if d["beta"] is not None:
        ax.legend(fontsize=8)
    s = d["scores"]
    c2 = ["#d62728" if j in d["top_indices"] else "#7f7f7f" for j in range(s.shape[0])]
    ax2.bar(np.arange(s.shape[0]), s, color=c2, width=0.8)
    ax2.set_xlabel("soft token (red: located)")
    ax2.set_ylabel("accumulation score c_j")
    ax2.set_title(f"shallow layers {_layer_text(d['shallow_layers'])}: "
                  f"{d['accumulation_measure'] or 'measure'}={d['accumulation_value']:.3g}", fontsize=9)
    fig.suptitle(title or d["reason"], fontsize=8)
    fig.tight_layout()
    return fig


# =============================================================================================
# Layer x head maps
# =============================================================================================


def head_map_data(
    result: SaliencyResult, flow: str, *, example: int | None = None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """``([layer, head] matrix, layers)``: the mean saliency of ``flow`` per layer and head, for
    one ``example`` or averaged over the batch (NaN examples left out). Needs a result computed
    with ``per_head=True``."""
    if not result.config.per_head:
        raise InputError(
            "head maps need per-head saliency; compute it with SaliencyConfig(per_head=True)."
        )
    src, _, tgt = flow.partition("->")
    v = result.flow(src.strip(), tgt.strip()).detach().double().cpu().numpy()  # [layer, batch, head]
    if example is None:
        with _quiet_nan():
            m = np.nanmean(v, axis=1)
    else:
        if not -v.shape[1] <= example < v.shape[1]:
            raise InputError(f"example {example} is out of range for a batch of {v.shape[1]}.")
        m = v[:, example]
    return m, tuple(result.layers)


def plot_head_maps(
    result: SaliencyResult,
    flows: Sequence[str] | None = None,
    *,
    example: int | None = None,
) -> Figure:
    """One layer x head map per flow (default: the IAP flows, or the DPC flows for a result with
    a soft prompt), each with its own colour scale."""
    names = tuple(flows) if flows is not None else _default_names(result.segment_names)
    fig, axes = _figure(1, len(names), (4.2 * len(names), 3.8), squeeze=False)
    for ax, n in zip(axes[0], names):
        m, layers = head_map_data(result, n, example=example)
        im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="magma", interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.85, format="%.2g")  # no offset text over the next panel
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=7)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(n, fontsize=9)
    who = "batch mean" if example is None else f"example {example}"
    fig.suptitle(f"Mean saliency per layer and head ({who})", fontsize=10)
    fig.tight_layout()
    return fig


# =============================================================================================
# DPC before / after
# =============================================================================================


def before_after_data(
    records: Sequence[Mapping[str, Any]],
    *,
    method: str = "dpc",
    reference: str = "pt",
    n_soft: int | None = None,
) -> dict[str, Any]:
    """DPC's outcome against vanilla prompt tuning.

    Returns:
        ``accuracy``: method -> accuracy for every answer kind present in all records (``base``,
        ``pt``, ``dpc``, ``always``, ``random``; ``oracle`` = base or PT right, when ``base`` is
        there), in that order. ``flips``: over all instances, ``wrong_to_right``,
        ``right_to_wrong``, ``unchanged_right``, ``unchanged_wrong`` from ``reference`` to
        ``method``. ``answer_changed``: instances whose answer string changed.
        ``corrupted``: ``[n_soft]`` counts of how often each soft row was corrupted by
        ``method`` (its ``corrupted_rows``); ``located``: the same for the located rows of every
        instance (fired or not). ``n``, ``n_fired``, ``n_soft``.
    """
    recs = _records(records, "before_after_data")
    for name in (method, reference):
        missing = [r.get("id") for r in recs if name not in r]
        if missing:
            raise InputError(f"records {missing[:5]} have no {name!r} answer.")
    accuracy: dict[str, float] = {}
    for m in _METHOD_ORDER[:-1]:
        if all(m in r for r in recs):
            accuracy[m] = sum(bool(r[m]["correct"]) for r in recs) / len(recs)
    if "base" in accuracy:
        accuracy["oracle"] = sum(bool(r["base"]["correct"] or r["pt"]["correct"]) for r in recs) / len(recs)
    flips = {"wrong_to_right": 0, "right_to_wrong": 0, "unchanged_right": 0, "unchanged_wrong": 0}
    changed = 0
    for r in recs:
        a, b = bool(r[reference]["correct"]), bool(r[method]["correct"])
        key = ("unchanged_right" if a else "unchanged_wrong") if a == b else (
            "wrong_to_right" if b else "right_to_wrong")
        flips[key] += 1
        changed += r[reference].get("answer") != r[method].get("answer")
    rows_c = [int(i) for r in recs for i in (r[method].get("corrupted_rows") or [])]
    rows_l = [int(i) for r in recs for i in (r.get("located_rows") or [])]
    if n_soft is None:
        sizes = [len(r["trigger"]["accumulation"]["scores"]) for r in recs if r.get("trigger")]
        n_soft = max(sizes) if sizes else (max(rows_c + rows_l) + 1 if rows_c + rows_l else 0)
    bad = [i for i in rows_c + rows_l if not 0 <= i < n_soft]
    if bad:
        raise InputError(f"soft rows {sorted(set(bad))} are outside 0..{n_soft - 1}; pass n_soft.")
    return {
        "accuracy": accuracy,
        "flips": flips,
        "answer_changed": changed,
        "corrupted": np.bincount(np.asarray(rows_c, dtype=np.int64), minlength=n_soft),
        "located": np.bincount(np.asarray(rows_l, dtype=np.int64), minlength=n_soft),
        "n": len(recs),
        "n_fired": sum(1 for r in recs if r[method].get("fired")),
        "n_soft": n_soft,
        "method": method,
        "reference": reference,
    }


def plot_before_after(
    records: Sequence[Mapping[str, Any]], *, method: str = "dpc", reference: str = "pt"
) -> Figure:
    """DPC before/after: accuracy of every method, the flips from ``reference`` to ``method``,
    and which soft rows were located and corrupted."""
    d = before_after_data(records, method=method, reference=reference)
    fig, axes = _figure(1, 3, (13.0, 3.8), width_ratios=(1.3, 1.0, 1.3))
    ax = axes[0]
    names = list(d["accuracy"])
    vals = [d["accuracy"][m] for m in names]
    colours = ["#d62728" if m == method else "#1f77b4" if m == reference else "#7f7f7f" for m in names]
    ax.bar(range(len(names)), vals, color=colours)
    for i, v in enumerate(vals):
        ax.text(i, v + 0.01, f"{v:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_METHOD_LABELS.get(m, m) for m in names], fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"accuracy (n={d['n']}, fired {d['n_fired']})", fontsize=9)
    ax = axes[1]
    keys = ["wrong_to_right", "right_to_wrong", "unchanged_right", "unchanged_wrong"]
    ax.bar(range(4), [d["flips"][k] for k in keys], color=["#2ca02c", "#d62728", "#9ecae1", "#cccccc"])
    for i, k in enumerate(keys):
        ax.text(i, d["flips"][k], str(d["flips"][k]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(4))
    ax.set_xticklabels(["wrong→\nright", "right→\nwrong", "right\n(same)", "wrong\n(same)"], fontsize=7)
    ax.set_ylabel("instances")
    ax.set_title(f"{reference.upper()} → {method.upper()} ({d['answer_changed']} answers changed)",
                 fontsize=9)
    ax = axes[2]
    x = np.arange(d["n_soft"])
    ax.bar(x, d["located"], color="#c7c7c7", width=0.8, label="located (all instances)")
    ax.bar(x, d["corrupted"], color="#d62728", width=0.5, label=f"corrupted by {method.upper()}")
    ax.set_xlabel("soft token")
    ax.set_ylabel("instances")
    ax.set_title("which soft tokens were located / corrupted", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# =============================================================================================
# Saving
# =============================================================================================


def _figure(nrows: int, ncols: int, size: tuple[float, float], *, squeeze: bool = True,
            width_ratios: Sequence[float] | None = None) -> tuple[Figure, Any]:
    """A pyplot-free figure (see the module docstring) and its axes."""
    from matplotlib.figure import Figure

    _show_figures_in_ipython(Figure)
    fig = Figure(figsize=size, dpi=100)
    kw = {"width_ratios": list(width_ratios)} if width_ratios is not None else {}
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, gridspec_kw=kw or None)
    return fig, axes


def _show_figures_in_ipython(figure_class: type) -> None:
    """In a Jupyter/IPython shell, make a returned figure display as a PNG.

    matplotlib's inline backend registers that display only once pyplot is imported; these
    figures never touch pyplot, so without this a notebook would print ``<Figure ...>``. Only a
    missing PNG formatter for figures is added (a user's or the inline backend's is kept), and
    outside IPython nothing happens.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "image/png" not in formatters:
        return
    png = formatters["image/png"]
    try:
        png.lookup_by_type(figure_class)
    except KeyError:
        png.for_type(figure_class, _png_bytes)


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> str:
    """Write ``fig`` as PNG or SVG, chosen by the extension of ``path``; parent folders are made.
    Returns the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg"):
        raise InputError(f"save writes .png or .svg files; {path!r} has extension {ext or 'none'!r}.")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format=ext[1:], dpi=dpi, bbox_inches="tight")
    return path


def _safe_name(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s))[:80] or "record"


def save_standard_figures(
    out_dir: str | os.PathLike,
    records: Sequence[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Write the standard figures of a DPC run as PNGs into ``out_dir/figures/``.

    ``records`` default: ``out_dir/records.jsonl`` (:func:`dpc_lens.dpc.read_records`). Figures:
    ``flow_curves.png`` (proportions, mean ± std), ``flow_curves_raw.png``,
    ``correct_vs_wrong.png``, ``contingency.png`` and ``before_after.png``, and
    ``trigger_<id>.png`` for the first record whose trigger fired (if any). Figures whose data
    is absent (no record with flows, or no trigger decision) are left out. Returns the paths.
    """
    out_dir = os.fspath(out_dir)
    if records is None:
        from .runs import read_records

        path = os.path.join(out_dir, "records.jsonl")
        records = read_records(path)
        if not records:
            raise DataError(f"{path} holds no records (or does not exist); run DPC into {out_dir!r} first.")
    records = [r for r in records if not (isinstance(r, dict) and r.get("skipped"))]  # not run
    records = _records(records, "save_standard_figures")
    fig_dir = os.path.join(out_dir, "figures")
    written: list[str] = []
    has_flows = any(r.get("flows") for r in records)
    has_trigger = any(r.get("trigger") for r in records)
    jobs: list[tuple[str, Any]] = []
    if has_flows:
        jobs.append(("flow_curves.png", lambda: plot_flow_curves(records, proportions=True)))
        jobs.append(("flow_curves_raw.png", lambda: plot_flow_curves(
            records, proportions=False, title="Per-layer mean saliency (mean ± std over instances)")))
        jobs.append(("correct_vs_wrong.png", lambda: plot_correct_vs_wrong(records)))
    if has_trigger:
        jobs.append(("contingency.png", lambda: plot_contingency(records)))
    jobs.append(("before_after.png", lambda: plot_before_after(records)))
    fired = next((r for r in records if r.get("trigger") and r["trigger"].get("fired")), None)
    if fired is not None:
        jobs.append((f"trigger_{_safe_name(fired.get('id'))}.png",
                     lambda: plot_trigger(fired, title=f"{fired.get('id')}: {fired['trigger']['reason']}")))
    for name, build in jobs:
        written.append(save(build(), os.path.join(fig_dir, name)))
    return written


# =============================================================================================
# Optional interactive view
# =============================================================================================


def interactive_saliency(
    result: SaliencyResult,
    example: int = 0,
    layers: Sequence[int] | None = None,
    *,
    tokens: Sequence[str] | None = None,
    reduce: Literal["sum", "mean"] = "sum",
) -> Any:
    """An interactive circuitsvis view of one example's saliency map (layers combined as in
    :func:`heatmap_data`), scaled to [0, 1] and shown as one "head". Needs ``circuitsvis``
    (optional; ``pip install circuitsvis``); the static :func:`plot_saliency_heatmap` needs
    nothing extra."""
    try:
        import circuitsvis as cv
    except ImportError:
        raise ImportError(
            "interactive_saliency needs the optional package circuitsvis (pip install circuitsvis); "
            "plot_saliency_heatmap draws the same map without it."
        ) from None
    d = heatmap_data(result, example, layers, reduce=reduce)
    T = d.matrix.shape[0]
    labels = list(tokens) if tokens is not None else [
        f"{n}{i - s}" for n, s, e in d.segments for i in range(s, e)
    ]
    if len(labels) != T:
        raise InputError(f"tokens has {len(labels)} labels for a {T} x {T} map.")
    top = float(d.matrix.max()) if d.matrix.size else 0.0
    scaled = d.matrix / top if top > 0 else d.matrix
    return cv.attention.attention_patterns(tokens=labels, attention=torch.from_numpy(scaled)[None].float())

