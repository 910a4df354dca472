"""DPC diagnostics over many trigger decisions and detector inputs (pure, no model): how often
the located token is the attention sink (:func:`sink_rate`), the paper's Fig. 5 contingency of
accumulation x deep-flow change (:func:`accumulation_deepflow_contingency`), threshold sweeps
without recomputation (:func:`fires_at_thresholds`) and the reference scale of
``sink="normalize"`` (:func:`fit_sink_scale`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
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
)

__all__ = ["sink_rate", "accumulation_deepflow_contingency", "fires_at_thresholds", "fit_sink_scale"]


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
    """Reference scale for ``sink="normalize"``: how much larger column 0 usually is.

    For each reference instance, with ``c`` the soft-column sums over ``config.shallow_layers``
    of the ``config.statistic`` tensor::

        ratio = c_0 / mean(c_1 .. c_{P-1})
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
        layers = resolve_layers(config.shallow_layers, x.n_layers)
        c = x.columns(config.statistic).detach().to("cpu", torch.float64)[layers].sum(dim=0)
        rest = float(c[1:].mean())
        if rest <= 0:
            raise InputError(
                f"fit_sink_scale: item {k} has no flow into soft columns 1..P-1 in "
                f"layers {layers}; it cannot serve as a reference."
            )
        ratios.append(float(c[0]) / rest)
    scale = float(statistics.median(ratios))
    if scale <= 0:
        raise InputError(
            "fit_sink_scale: column 0 carries no flow in the reference instances; "
            "there is no sink to normalise, use sink='keep'."
        )
    return scale
