"""Figures of IAP's outcome: does the score rank prompts (AUC with intervals), and each method's
accuracy difference against the reference prompts, drawn from a ``run_iap`` summary (or the
``summary.json`` of ``dpc-lens iap``) and never running a model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import DataError, InputError
from ._figure import _figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["score_auc_data", "plot_score_auc", "paired_difference_data", "plot_paired_differences",
           "save_iap_figures"]


def _summary(summary: Mapping[str, Any] | str | os.PathLike, where: str) -> Mapping[str, Any]:
    if isinstance(summary, (str, os.PathLike)):
        path = os.fspath(summary)
        if os.path.isdir(path):
            path = os.path.join(path, "summary.json")
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            raise DataError(f"{where}: {path} does not exist; run `dpc-lens iap --out DIR` first.") from None
    if not isinstance(summary, Mapping):
        raise InputError(f"{where}: give a run_iap summary dict or a path to its summary.json, got "
                         f"{type(summary).__name__}.")
    return summary


def score_auc_data(summary: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The numbers :func:`plot_score_auc` draws: per score (flows, then the synthesised score),
    the within-question and pooled AUC with their 95% intervals (``nan`` where undefined), and
    the dev split's when the run was calibrated."""
    s = _summary(summary, "score_auc_data")
    out: dict[str, Any] = {}
    dev = (s.get("dev") or {}).get("score_diagnostics")
    for split, diag in (("test", s.get("score_diagnostics")), ("dev", dev)):
        if not diag:
            continue
        nan = float("nan")
        rows = []
        for name, d in diag.items():
            w = d.get("within_question_ci95") or [nan, nan]
            p = d.get("pooled_ci95") or [nan, nan]
            within, pooled = d.get("within_question_auc"), d.get("pooled_auc")
            rows.append({"name": name, "within": nan if within is None else within, "within_ci": list(w),
                         "pooled": nan if pooled is None else pooled, "pooled_ci": list(p),
                         "pairs": d.get("within_question_pairs", 0)})
        out[split] = rows
    if not out:
        raise DataError("score_auc_data: this summary has no score_diagnostics (a run made before dpc_lens "
                        "measured them); re-evaluate it with run_iap(..., resume=True).")
    return out


def plot_score_auc(summary: Mapping[str, Any] | str | os.PathLike, *, title: str | None = None) -> Figure:
    """Forest plot: within-question and pooled AUC of each score with 95% intervals, one panel
    per split (test, and dev when calibrated), with chance (0.5) marked."""
    data = score_auc_data(summary)
    splits = list(data)
    n = max(len(v) for v in data.values())
    fig, axes = _figure(1, len(splits), (5.2 * len(splits), 0.55 * n + 1.6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        rows = data[split]
        ys = list(range(len(rows)))[::-1]
        for y, r in zip(ys, rows, strict=True):
            for off, key, color, label in ((0.12, "within", "C0", "within question"),
                                           (-0.12, "pooled", "C1", "pooled")):
                lo, hi = r[f"{key}_ci"]
                ax.errorbar([r[key]], [y + off], xerr=[[r[key] - lo], [hi - r[key]]], fmt="o", color=color,
                            capsize=3, label=label if y == ys[0] else None)
        ax.axvline(0.5, color="0.4", ls="--", lw=1)
        ax.set_yticks(ys, [f"{r['name']}\n({r['pairs']} pairs)" for r in rows], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("AUC: P(right answer's score > wrong answer's); 0.5 = chance")
        ax.set_title(f"{split}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)  # the points sit near 0.5 and above
    fig.suptitle(title or "Does IAP's score rank prompts? (95% bootstrap intervals over questions)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def paired_difference_data(summary: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The numbers :func:`plot_paired_differences` draws: per method and reference prompt, the
    accuracy difference in points with its 95% interval, and the reference prompts' texts."""
    s = _summary(summary, "paired_difference_data")
    diffs = s.get("paired_differences")
    if not diffs:
        raise DataError("paired_difference_data: this summary has no paired_differences (a run made before "
                        "dpc_lens measured them); re-evaluate it with run_iap(..., resume=True).")
    rows = []
    for method, refs in diffs.items():
        for ref, d in refs.items():
            rows.append({"method": method, "reference": ref, "diff": 100 * d["diff"],
                         "ci": [100 * d["ci95"][0], 100 * d["ci95"][1]]})
    return {"rows": rows, "reference_prompts": dict(s.get("reference_prompts") or {})}


def plot_paired_differences(summary: Mapping[str, Any] | str | os.PathLike, *,
                            title: str | None = None) -> Figure:
    """Each method's accuracy minus the first prompt's and the best single prompt's, in points,
    with paired-bootstrap 95% intervals; 0 marked."""
    data = paired_difference_data(summary)
    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    refs = list(dict.fromkeys(r["reference"] for r in rows))
    fig, ax = _figure(1, 1, (6.4, 0.6 * len(methods) + 1.8))
    for k, ref in enumerate(refs):
        off = 0.15 * (1 - 2 * k) if len(refs) == 2 else 0.0
        pts = [r for r in rows if r["reference"] == ref]
        ys = [len(methods) - 1 - methods.index(r["method"]) + off for r in pts]
        x = [r["diff"] for r in pts]
        err = [[r["diff"] - r["ci"][0] for r in pts], [r["ci"][1] - r["diff"] for r in pts]]
        prompt = data["reference_prompts"].get({"vs_first_prompt": "first", "vs_best_single": "best_single"}
                                               .get(ref, ""), "")
        label = ref.replace("_", " ") + (f": {prompt[:40]!r}" if prompt else "")
        ax.errorbar(x, ys, xerr=err, fmt="o", capsize=3, color=f"C{k}", label=label)
    ax.axvline(0.0, color="0.4", ls="--", lw=1)
    ax.set_yticks(range(len(methods))[::-1], methods)
    ax.set_xlabel("accuracy difference (points), paired bootstrap 95% interval")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "IAP against fixed prompts, on the same questions", fontsize=10)
    fig.tight_layout()
    return fig


def save_iap_figures(out_dir: str | os.PathLike) -> list[str]:
    """Write ``score_auc.png`` and ``paired_differences.png`` of an IAP output directory into
    ``out_dir/figures/``; a figure whose data the summary lacks is left out. Returns the paths."""
    from ._figure import save

    out_dir = os.fspath(out_dir)
    s = _summary(out_dir, "save_iap_figures")
    written = []
    if s.get("score_diagnostics"):
        written.append(save(plot_score_auc(s), os.path.join(out_dir, "figures", "score_auc.png")))
    if s.get("paired_differences"):
        written.append(save(plot_paired_differences(s), os.path.join(out_dir, "figures",
                                                                     "paired_differences.png")))
    return written
