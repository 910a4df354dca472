"""Figures of saliency flows: per-layer flow curves, one instance's saliency heatmap, layer x head
maps and the optional circuitsvis view; and the inputs every flow figure reads (DPC records,
IAP pair records, bare flows dicts or a :class:`~dpc_lens.saliency.SaliencyResult`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..errors import InputError

if TYPE_CHECKING:  # matplotlib is imported lazily, inside the builders
    from matplotlib.figure import Figure

    from ..saliency import SaliencyResult

from ..dpc.records import DPCRecord
from ..iap.records import PairRecord
from ._figure import _figure

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


# =============================================================================================
# Inputs
# =============================================================================================


def _is_result(obj: Any) -> bool:
    from ..saliency import SaliencyResult

    return isinstance(obj, SaliencyResult)


def _record(item: Mapping[str, Any]) -> DPCRecord | PairRecord:
    """A record's dict, typed: an IAP pair (it names a prompt) or a DPC record."""
    if "prompt" in item or "prompt_index" in item:
        return PairRecord.from_dict(item)
    return DPCRecord.from_dict(item)


def _flows_of(item: Any, k: int) -> Mapping[str, Any] | None:
    """The per-layer flows of one item: a DPC record or an IAP pair (typed or as its dict; its
    ``flows``) or a bare flows dict."""
    if isinstance(item, (DPCRecord, PairRecord)):
        return item.flows or None  # an empty rationale has no flows: skipped
    if not isinstance(item, Mapping):
        raise InputError(
            f"item {k} is a {type(item).__name__}; expected a DPC record or an IAP pair (a record "
            "or its dict with 'flows') or a flows dict such as {'soft->rationale': [per-layer "
            "values], ...}."
        )
    if "flows" in item:
        return _record(item).flows or None  # an empty rationale has no flows: skipped
    if item and all(isinstance(key, str) and "->" in key for key in item):
        return item
    raise InputError(
        f"item {k} has neither 'flows' nor 'source->target' keys (it has {sorted(item)[:6]}); "
        "pass DPC records, IAP pairs or flows dicts."
    )


def _as_items(source: Any) -> list[Any]:
    if isinstance(source, (Mapping, DPCRecord, PairRecord)):
        return [source]
    if isinstance(source, (str, bytes)) or not isinstance(source, Sequence):
        raise InputError(
            f"expected a list of DPC records (or IAP pairs, or flows dicts) or a SaliencyResult, "
            f"got {type(source).__name__}; read a records.jsonl with "
            "dpc_lens.dpc.read_dpc_records."
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
    from ..flows import flow_proportions

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
    _layer_ticks(ax.xaxis)
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
        tokens: the token string of every row/column (``<soft k>`` on soft positions), when the
            result kept them; ``None`` otherwise.
    """

    matrix: np.ndarray
    offset: int
    segments: tuple[tuple[str, int, int], ...]
    boundaries: tuple[int, ...]
    marked_cols: tuple[int, ...]
    layers: tuple[int, ...]
    reduce: str
    tokens: tuple[str, ...] | None = None


def _soft_rows(marked: Any) -> list[int]:
    """Soft-row indices from ints, a TriggerDecision, its dict, or a record holding one."""
    from ..dpc import TriggerDecision

    if marked is None:
        return []
    if isinstance(marked, TriggerDecision):
        return list(marked.accumulation.top_indices)
    if isinstance(marked, DPCRecord) or (isinstance(marked, Mapping) and "trigger" in marked):
        marked = DPCRecord.from_dict(marked).trigger  # a DPC record
        if not marked:
            return []
    if isinstance(marked, Mapping):
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
    toks = getattr(result, "tokens", None)
    tokens = tuple(toks[example][offset:lay.length]) if toks is not None else None
    return HeatmapData(matrix, offset, segments, boundaries, tuple(marked_cols), tuple(chosen), reduce,
                       tokens)


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


#: at most this many labelled layer ticks on an axis: a 30-layer model gets every 2nd or 5th
#: layer, not 30 labels drawn over each other
MAX_LAYER_TICKS = 12


def _layer_ticks(axis: Any, layers: Sequence[int] | None = None) -> None:
    """Integer layer ticks, at most :data:`MAX_LAYER_TICKS` of them (matplotlib's
    ``MaxNLocator`` picks a step of 1, 2, 5 or 10), on an axis whose data are layer numbers
    (``layers=None``) or row indices into ``layers`` (an image: tick i is labelled
    ``layers[i]``)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    if layers is None:
        axis.set_major_locator(MaxNLocator(nbins=MAX_LAYER_TICKS, steps=[1, 2, 5, 10], integer=True,
                                           min_n_ticks=1))
        return
    ls = [int(x) for x in layers]
    step = max(1, -(-len(ls) // MAX_LAYER_TICKS))
    axis.set_major_locator(FixedLocator(list(range(0, len(ls), step))))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: str(ls[int(round(v))])
                                           if 0 <= int(round(v)) < len(ls) else ""))


def _layer_text(layers: Sequence[int]) -> str:
    ls = list(layers)
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(str(x) for x in ls)


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
        _layer_ticks(ax.yaxis, layers)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(n, fontsize=9)
    who = "batch mean" if example is None else f"example {example}"
    fig.suptitle(f"Mean saliency per layer and head ({who})", fontsize=10)
    fig.tight_layout()
    return fig


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


