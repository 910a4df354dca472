"""DPC diagnostics over many trigger decisions and detector inputs (pure, no model): how often
the located token is the attention sink (:func:`sink_rate`), the paper's Fig. 5 contingency of
accumulation x deep-flow change (:func:`accumulation_deepflow_contingency`), threshold sweeps
without recomputation (:func:`fires_at_thresholds`) and the reference scale of
``sink="normalize"`` (:func:`fit_sink_scale`); whether the detector adapts to each instance
(:func:`instance_adaptivity`, :func:`adaptivity_warning`, :func:`locating_vs_modal`) and how well
the trigger's statistic separates the questions it should fire on (:func:`trigger_auc`)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from dpc_lens.errors import InputError
from dpc_lens.layers import resolve_layers

from .detector import (
    _MEASURES,
    AccumulationMeasure,
    DetectorConfig,
    DetectorInputs,
    TriggerDecision,
    _check_choice,
    sink_positions,
)

__all__ = ["sink_rate", "accumulation_deepflow_contingency", "fires_at_thresholds", "fit_sink_scale",
           "instance_adaptivity", "adaptivity_warning", "locating_vs_modal", "trigger_auc",
           "ADAPTIVITY_WARNING_SHARE"]

#: one located position taking more than this share of the questions means the detector is not
#: instance-adaptive (issue 19: soft row 2 on 100% of SmolLM2's test questions)
ADAPTIVITY_WARNING_SHARE = 0.8


def _check_decisions(decisions: Sequence[TriggerDecision], name: str) -> list[TriggerDecision]:
    out = list(decisions)
    if not out:
        raise InputError(f"{name}: got no decisions; pass at least one TriggerDecision.")
    bad = [type(d).__name__ for d in out if not isinstance(d, TriggerDecision)]
    if bad:
        raise InputError(f"{name}: expected TriggerDecision objects, got {sorted(set(bad))}.")
    return out


def sink_rate(decisions: Sequence[TriggerDecision]) -> float:
    """Share of instances whose top located soft token is position 0 (the attention-sink slot).

    ``sink_rate = #{d : d.accumulation.top_is_position0} / #decisions``, over all decisions
    (fired or not). Near 1 means "accumulation" mostly finds the sink: try ``sink="exclude"``
    or ``"normalize"``. Always 0 under ``"exclude"``.
    """
    ds = _check_decisions(decisions, "sink_rate")
    return sum(d.accumulation.top_is_position0 for d in ds) / len(ds)


def accumulation_deepflow_contingency(
    decisions: Sequence[TriggerDecision],
    accumulation_threshold: float | None = None,
    measure: AccumulationMeasure | None = None,
) -> dict[str, Any]:
    """2x2 counts of shallow accumulation vs deep-flow change, as in the paper's Fig. 5 (left).

    Accumulation present: ``d.accumulation.measure(measure) >= accumulation_threshold``; both
    default to each decision's own config (i.e. ``d.accumulation_present``). Deep-flow change:
    ``d.flow_triggered`` (affected share > R, regardless of the accumulation gate).

    Returns:
        ``{"accum_change", "accum_no_change", "no_accum_change", "no_accum_no_change"}`` (int
        counts), ``"n"``, and ``"p_change_given_accum"`` / ``"p_change_given_no_accum"``
        (floats, ``None`` when the condition never occurs).
    """
    ds = _check_decisions(decisions, "accumulation_deepflow_contingency")
    if measure is not None:
        _check_choice(measure, "measure", _MEASURES)
    counts = {
        "accum_change": 0,
        "accum_no_change": 0,
        "no_accum_change": 0,
        "no_accum_no_change": 0,
    }
    for d in ds:
        if accumulation_threshold is None and measure is None:
            present = d.accumulation_present
        else:
            m = measure or d.config.accumulation_measure
            t = (
                d.config.accumulation_threshold
                if accumulation_threshold is None
                else accumulation_threshold
            )
            present = d.accumulation.measure(m) >= t
        key = ("accum" if present else "no_accum") + (
            "_change" if d.flow_triggered else "_no_change"
        )
        counts[key] += 1
    n_acc = counts["accum_change"] + counts["accum_no_change"]
    n_no = counts["no_accum_change"] + counts["no_accum_no_change"]
    return {
        **counts,
        "n": len(ds),
        "p_change_given_accum": counts["accum_change"] / n_acc if n_acc else None,
        "p_change_given_no_accum": counts["no_accum_change"] / n_no if n_no else None,
    }


def fires_at_thresholds(
    decisions: Sequence[TriggerDecision],
    R_values: Sequence[float],
    accumulation_thresholds: Sequence[float] | None = None,
) -> Bool[Tensor, "r_value acc_value instance"]:
    """Whether each instance would fire for every (R, accumulation threshold) pair, no recompute.

    R and the accumulation threshold change no statistic, so a sweep only compares the stored
    numbers::

        out[a, b, n] = defined_n and share_n > R_values[a]
                       and (value_n >= accumulation_thresholds[b])

    where ``value_n`` is each decision's ``accumulation_value`` (its own measure). With
    ``accumulation_thresholds=None`` there is no accumulation gate and dim 1 has size 1.
    Sweeps over layers, statistic, beta or sink do change statistics: re-run
    :func:`dynamic_trigger` on the cached inputs for those (cheap, see the module docstring).
    """
    ds = _check_decisions(decisions, "fires_at_thresholds")
    r = torch.as_tensor(list(R_values), dtype=torch.float64)
    if r.ndim != 1 or r.numel() == 0:
        raise InputError("R_values must be a non-empty sequence of numbers.")
    share = torch.tensor([d.deep_flow.affected_share for d in ds], dtype=torch.float64)
    defined = torch.tensor([d.deep_flow.defined for d in ds], dtype=torch.bool)
    flow = defined[None, :] & (share[None, :] > r[:, None])  # [R, instance]
    if accumulation_thresholds is None:
        return flow[:, None, :]
    t = torch.as_tensor(list(accumulation_thresholds), dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        raise InputError("accumulation_thresholds must be a non-empty sequence of numbers or None.")
    value = torch.tensor([d.accumulation_value for d in ds], dtype=torch.float64)
    present = value[None, :] >= t[:, None]  # [acc, instance]
    return flow[:, None, :] & present[None, :, :]


def fit_sink_scale(inputs: Sequence[DetectorInputs], config: DetectorConfig | None = None) -> float:
    """Reference scale for ``sink="normalize"``: how much larger a sink column usually is.

    For each reference instance, with ``c`` the soft-column sums over ``config.shallow_layers``
    of the ``config.statistic`` tensor and S its sink positions (``(0,)`` for
    ``sink_source="position0"``, else the detected ones; instances without a detected sink are
    skipped)::

        ratio = mean(c_j, j in S) / mean(c_j, j not in S)     (= c_0 / mean(c_1 .. c_{P-1}))
        sink_scale = median over instances of ratio

    The median keeps a few instances with real accumulation on position 0 from inflating the
    scale. Only ``config.statistic`` and ``config.shallow_layers`` are read, so any sink mode
    may be set; use it as
    ``replace(config, sink="normalize", sink_scale=fit_sink_scale(dev, config))``.

    Raises:
        InputError: no inputs, fewer than 2 soft tokens, or zero flow into columns 1..P-1.
    """
    config = config or DetectorConfig()
    items = list(inputs)
    if not items:
        raise InputError("fit_sink_scale: got no inputs; pass reference DetectorInputs.")
    ratios = []
    for k, x in enumerate(items):
        if not isinstance(x, DetectorInputs):
            raise InputError(
                f"fit_sink_scale: item {k} is {type(x).__name__}, expected DetectorInputs."
            )
        if x.n_soft < 2:
            raise InputError(
                f"fit_sink_scale: item {k} has {x.n_soft} soft token; need at least 2."
            )
        layers = resolve_layers(config.shallow_layers, x.n_layers, x.windows)
        c = x.columns(config.statistic).detach().to("cpu", torch.float64)[layers].sum(dim=0)
        sinks = list(sink_positions(x, config, layers))
        others = [j for j in range(x.n_soft) if j not in sinks]
        if not sinks or not others:
            continue
        rest = float(c[others].mean())
        if rest <= 0:
            raise InputError(
                f"fit_sink_scale: item {k} has no flow into its non-sink soft columns in "
                f"layers {layers}; it cannot serve as a reference."
            )
        ratios.append(float(c[sinks].mean()) / rest)
    if not ratios:
        raise InputError(
            "fit_sink_scale: no reference instance has both a sink and an ordinary soft position "
            f"(sink_source={config.sink_source!r}, sink_threshold={config.sink_threshold}); there "
            "is no sink to normalise, use sink='keep'."
        )
    scale = float(statistics.median(ratios))
    if scale <= 0:
        raise InputError(
            "fit_sink_scale: column 0 carries no flow in the reference instances; "
            "there is no sink to normalise, use sink='keep'."
        )
    return scale


def instance_adaptivity(located: Sequence[int | None]) -> dict[str, Any]:
    """How the top located soft position spreads over the questions (``None``: nothing located).

    Returns ``n`` (questions with a located position), ``histogram`` (position -> count, as
    string keys for JSON), ``distinct_positions``, ``modal_position`` (the commonest; ties -> the
    lower position), ``modal_share`` (its count / n), ``entropy`` ``H = -sum_p q_p ln q_p`` in
    nats over the located positions, and ``normalized_entropy`` ``H / ln(distinct)`` (0 when one
    position). A detector that adapts to each instance spreads; one that always finds the same
    token (an attention sink) has ``modal_share`` near 1 and entropy near 0.
    """
    pos = [int(p) for p in located if p is not None]
    if not pos:
        return {"n": 0, "histogram": {}, "distinct_positions": 0, "modal_position": None,
                "modal_share": None, "entropy": None, "normalized_entropy": None}
    counts = Counter(pos)
    n = len(pos)
    modal = min(counts, key=lambda p: (-counts[p], p))
    h = -sum((c / n) * math.log(c / n) for c in counts.values())
    k = len(counts)
    return {"n": n, "histogram": {str(p): counts[p] for p in sorted(counts)}, "distinct_positions": k,
            "modal_position": modal, "modal_share": counts[modal] / n, "entropy": h,
            "normalized_entropy": h / math.log(k) if k > 1 else 0.0}


def adaptivity_warning(adaptivity: Mapping[str, Any], sinks: Sequence[int] | None = (),
                       threshold: float = ADAPTIVITY_WARNING_SHARE, *, sinks_excluded: bool = False,
                       locator: str = "argmax") -> str | None:
    """One plain warning line when one position takes more than ``threshold`` of the questions
    (``adaptivity`` from :func:`instance_adaptivity`); ``None`` otherwise.

    The line names the cause the evidence supports and a next step that is not already in use:
    the modal position is a detected sink (``sinks``: the positions detected as sinks; ``None``
    when sinks were not measured) -> exclude detected sinks or use the z locator; it is not a
    sink, or the locator already excludes them (``sinks_excluded``) -> the shallow column score
    ranks the soft rows the same way on every question, so the argmax is a property of the
    prompt (try the dev-relative z locator); the z locator itself (``locator="z"``) -> even
    relative to the dev profile one row stands out on every question."""
    share = adaptivity.get("modal_share")
    if share is None or share <= threshold:
        return None
    pos = adaptivity["modal_position"]
    head = (f"warning: the detector is not instance-adaptive here: it located soft position {pos} on "
            f"{100 * share:.0f}% of {adaptivity['n']} questions; ")
    known = sorted(sinks) if sinks else []
    if locator == "z":
        return head + (f"even against the dev profile (locator='z') soft position {pos} stands out on "
                       "almost every question, so the dev profile does not describe these questions "
                       "(refit it on questions like them), and DPC zeroes a fixed row here.")
    if pos in known and not sinks_excluded:
        return head + (f"soft position {pos} is a detected attention sink. Try sink_source='detected' "
                       "with sink='exclude', or locator='z'.")
    if sinks_excluded or sinks is not None:
        detail = (f" (detected sinks {', '.join(map(str, known))} are excluded)" if sinks_excluded and known
                  else " (no detected sink)" if not known else
                  f" (detected sinks: {', '.join(map(str, known))})")
        return head + (f"soft position {pos} is not a detected sink{detail}: the shallow column score "
                       "ranks the soft rows the same way on every question, a property of the prompt "
                       "rather than of the question. Try locator='z' (each question against a dev "
                       "profile).")
    return head + (f"soft position {pos} may be an attention sink (sinks were not measured here). "
                   "Try sink_source='detected' with sink='exclude', or locator='z'.")


def locating_vs_modal(located_correct: Sequence[Any], modal_correct: Sequence[Any],
                      n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Does per-question locating beat always corrupting the modal position, on the same
    questions under the same trigger? ``diff = mean(located) - mean(modal)`` with its paired
    bootstrap 95% interval (:func:`~dpc_lens.evaluation.paired_bootstrap`)."""
    from ..evaluation import paired_bootstrap

    d, lo, hi = paired_bootstrap(located_correct, modal_correct, n_resamples, seed)
    return {"n": len(located_correct), "located": sum(map(float, located_correct)) / len(located_correct),
            "modal": sum(map(float, modal_correct)) / len(modal_correct), "diff": d, "ci95": [lo, hi],
            "method": f"paired bootstrap, {n_resamples} resamples"}


def trigger_auc(scores: Sequence[float], labels: Sequence[bool | None], n_resamples: int = 2000,
                seed: int = 0) -> dict[str, Any]:
    """Area under the ROC curve of a trigger statistic for a binary label, with a bootstrap 95%
    interval.

    ``AUC = P(score_pos > score_neg) + 1/2 P(score_pos = score_neg)`` over all (positive,
    negative) pairs (ties count half); 0.5 is chance. Instances whose label is ``None`` are left
    out. The interval resamples the instances with replacement (``n_resamples`` times, seeded);
    a resample holding no positive or no negative is skipped. Returns ``auc`` (``None`` when a
    class is empty), ``ci95``, ``n_pos``, ``n_neg``.
    """
    if len(scores) != len(labels):
        raise InputError(f"trigger_auc: {len(scores)} scores for {len(labels)} labels.")
    keep = [(float(s), bool(y)) for s, y in zip(scores, labels) if y is not None]
    pos = torch.tensor([s for s, y in keep if y], dtype=torch.float64)
    neg = torch.tensor([s for s, y in keep if not y], dtype=torch.float64)
    out: dict[str, Any] = {"n_pos": int(pos.numel()), "n_neg": int(neg.numel()), "auc": None,
                           "ci95": None, "method": f"bootstrap over instances, {n_resamples} resamples"}
    if not pos.numel() or not neg.numel():
        return out
    kern = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    out["auc"] = float(kern.mean())
    g = torch.Generator().manual_seed(seed)
    n = len(keep)
    is_pos = torch.tensor([y for _, y in keep])
    idx = torch.randint(0, n, (n_resamples, n), generator=g)
    w = torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_resamples, n, dtype=torch.float64))
    wp, wn = w[:, is_pos], w[:, ~is_pos]
    denom = wp.sum(1) * wn.sum(1)
    ok = denom > 0
    aucs = (((wp @ kern) * wn).sum(1)[ok] / denom[ok]).sort().values
    m = int(aucs.numel())
    if m >= 40:
        out["ci95"] = [float(aucs[int(0.025 * m)]), float(aucs[int(0.975 * m) - 1])]
    return out
