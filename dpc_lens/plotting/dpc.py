"""Figures of DPC's detector and outcome, from DPC records: correct vs wrong deep-layer flow,
the Fig. 5 contingency, why the trigger fired on one instance, before/after, and the standard
set a run directory gets (``dpc-lens dpc --plots``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, InputError

if TYPE_CHECKING:  # matplotlib is imported lazily, inside the builders
    from matplotlib.figure import Figure


from ..dpc.records import ANSWER_KINDS, AnswerRecord, DPCRecord
from ._figure import _figure, save
from .saliency import (
    DPC_FLOWS,
    _as_items,
    _instance_flows,
    _layer_text,
    _proportions,
    _quiet_nan,
    plot_flow_curves,
)

_METHOD_ORDER = ("base", "pt", "dpc", "always", "random", "oracle")
_METHOD_LABELS = {"base": "base", "pt": "prompt\ntuning", "dpc": "DPC", "always": "always\ncorrupt",
                  "random": "random\ncorrupt", "oracle": "oracle\n(base|PT)"}


# =============================================================================================
# Correct vs wrong
# =============================================================================================


def _records(records: Any, what: str) -> list[DPCRecord]:
    """The records, typed (:meth:`DPCRecord.from_dict` names an unknown or misspelt key)."""
    items = _as_items(records)
    if not items:
        raise InputError(f"{what}: got no records.")
    for k, r in enumerate(items):
        if not isinstance(r, (Mapping, DPCRecord)):
            raise InputError(f"{what}: record {k} is a {type(r).__name__}, expected a DPCRecord "
                             "or its dict.")
    return [DPCRecord.from_dict(r) for r in items]


def _answer_of(r: DPCRecord, method: str) -> AnswerRecord | None:
    return r.answer(method) if method in ANSWER_KINDS else None


def _kinds(r: DPCRecord) -> list[str]:
    return [m for m in ANSWER_KINDS if _answer_of(r, m) is not None]


def _deep_layers(records: Sequence[DPCRecord], n_layers: int, layers: Any) -> list[int]:
    from ..layers import resolve_layers

    if layers is None:
        for r in records:
            if r.trigger:
                return [int(x) for x in r.trigger["deep_layers"]]
        layers = "deep"
    return resolve_layers(layers, n_layers)


def correct_wrong_data(
    records: Sequence[Mapping[str, Any] | DPCRecord],
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
    with_flows = [r for r in recs if r.flows]
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
        a = _answer_of(r, method)
        if a is None:
            raise InputError(f"record {r.id!r} has no {method!r} answer; it has {_kinds(r)}.")
        if not np.isfinite(v):
            continue
        key = "correct" if a.correct else "wrong"
        out[key].append(float(v))
        out[key + "_ids"].append(r.id)
    out["correct"] = np.asarray(out["correct"], dtype=np.float64)
    out["wrong"] = np.asarray(out["wrong"], dtype=np.float64)
    out.update(layers=chosen, flow=flow, method=method, proportions=bool(proportions))
    return out


def plot_correct_vs_wrong(
    records: Sequence[Mapping[str, Any] | DPCRecord],
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
    records: Sequence[Mapping[str, Any] | DPCRecord],
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
    from ..dpc import accumulation_deepflow_contingency

    recs = [r for r in _records(records, "contingency_data") if r.trigger]
    if not recs:
        raise InputError("contingency_data: no record has a trigger decision (every rationale was empty).")
    decisions = [r.decision for r in recs]
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
    correct = np.array([bool(a.correct) if (a := _answer_of(r, method)) is not None else False
                        for r in recs])
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
        "ids": [r.id for r in recs],
        "accumulation_threshold": thr,
        "R": _uniform([d.config.R for d in decisions]),
        "measure": meas,
        "method": method,
    }


def plot_contingency(
    records: Sequence[Mapping[str, Any] | DPCRecord],
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
    from ..dpc import TriggerDecision

    if isinstance(obj, TriggerDecision):
        return obj.to_dict()
    if isinstance(obj, DPCRecord) or (isinstance(obj, Mapping) and "trigger" in obj):
        rec = DPCRecord.from_dict(obj)
        if not rec.trigger:
            raise InputError(
                f"record {rec.id!r} has no trigger decision (empty rationale); pick another record."
            )
        return dict(rec.trigger)
    if isinstance(obj, Mapping) and "deep_flow" in obj and "accumulation" in obj:
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
# DPC before / after
# =============================================================================================


def before_after_data(
    records: Sequence[Mapping[str, Any] | DPCRecord],
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
        missing = [r.id for r in recs if _answer_of(r, name) is None]
        if missing:
            raise InputError(f"records {missing[:5]} have no {name!r} answer.")
    accuracy: dict[str, float] = {}
    for m in _METHOD_ORDER[:-1]:
        if all(_answer_of(r, m) is not None for r in recs):
            accuracy[m] = sum(bool(r.answer(m).correct) for r in recs) / len(recs)
    if "base" in accuracy:
        accuracy["oracle"] = sum(bool(r.base.correct or r.pt.correct) for r in recs) / len(recs)
    flips = {"wrong_to_right": 0, "right_to_wrong": 0, "unchanged_right": 0, "unchanged_wrong": 0}
    changed = 0
    for r in recs:
        ref, new = r.answer(reference), r.answer(method)
        a, b = bool(ref.correct), bool(new.correct)
        key = ("unchanged_right" if a else "unchanged_wrong") if a == b else (
            "wrong_to_right" if b else "right_to_wrong")
        flips[key] += 1
        changed += ref.answer != new.answer
    rows_c = [int(i) for r in recs for i in (r.answer(method).corrupted_rows or ())]
    rows_l = [int(i) for r in recs for i in r.located_rows]
    if n_soft is None:
        sizes = [len(r.trigger["accumulation"]["scores"]) for r in recs if r.trigger]
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
        "n_fired": sum(1 for r in recs if r.answer(method).fired),
        "n_soft": n_soft,
        "method": method,
        "reference": reference,
    }


def plot_before_after(
    records: Sequence[Mapping[str, Any] | DPCRecord], *, method: str = "dpc", reference: str = "pt"
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


def _safe_name(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s))[:80] or "record"


def save_standard_figures(
    out_dir: str | os.PathLike,
    records: Sequence[Mapping[str, Any] | DPCRecord] | None = None,
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
        from ..runs import read_records

        path = os.path.join(out_dir, "records.jsonl")
        records = read_records(path)
        if not records:
            raise DataError(f"{path} holds no records (or does not exist); run DPC into {out_dir!r} first.")
    records = [r for r in map(DPCRecord.from_dict, _as_items(records)) if not r.skipped]  # not run
    records = _records(records, "save_standard_figures")
    fig_dir = os.path.join(out_dir, "figures")
    written: list[str] = []
    has_flows = any(r.flows for r in records)
    has_trigger = any(r.trigger for r in records)
    jobs: list[tuple[str, Any]] = []
    if has_flows:
        jobs.append(("flow_curves.png", lambda: plot_flow_curves(records, proportions=True)))
        jobs.append(("flow_curves_raw.png", lambda: plot_flow_curves(
            records, proportions=False, title="Per-layer mean saliency (mean ± std over instances)")))
        jobs.append(("correct_vs_wrong.png", lambda: plot_correct_vs_wrong(records)))
    if has_trigger:
        jobs.append(("contingency.png", lambda: plot_contingency(records)))
    jobs.append(("before_after.png", lambda: plot_before_after(records)))
    fired = next((r for r in records if r.trigger and r.trigger.get("fired")), None)
    if fired is not None:
        jobs.append((f"trigger_{_safe_name(fired.id)}.png",
                     lambda: plot_trigger(fired, title=f"{fired.id}: {fired.trigger['reason']}")))
    for name, build in jobs:
        written.append(save(build(), os.path.join(fig_dir, name)))
    return written
