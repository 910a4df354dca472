"""The DPC detector: information accumulation, deep-layer flow and the Dynamic Trigger.

This module owns SPEC section 3, steps 3 and 4, as pure tensor maths. It never sees a model,
a hook or a token: the saliency engine reduces the saliency maps I_l of one instance to the four
small tensors of :class:`DetectorInputs`, and everything here is a function of those tensors.
That split lets calibration re-run the detector for many configs on cached inputs without a
model, and lets the tests feed hand-built matrices whose answers are worked out by hand.

Why normalised statistics are the default (SPEC section 3, "measured on a small model"): raw
saliency I_l = |sum_h A * dL/dA| scales with the gradient of the loss, and a wrong generation
has a larger loss, so *every* raw flow is larger for wrong answers, including flows that do not
involve the soft prompt. A trigger on raw magnitudes measures the loss, not the soft prompt's
influence. The ``"normalized"`` statistic uses each target row's share of its incoming flow,
which is invariant to that overall scale; ``"raw"`` stays available so calibration can choose.

Pieces, bottom to top:

* :func:`~dpc_lens.layers.resolve_layers` (re-exported here) turns a layer-set spec (indices, a
  fraction pair, ``"shallow"`` or ``"deep"``) into sorted layer indices; the grammar is shared
  with IAP and lives in :mod:`dpc_lens.layers`.
* :func:`accumulation` (shallow layers) - how concentrated the soft-prompt column scores are,
  and which soft tokens to corrupt.
* :func:`deep_flow` (deep layers) - how many second-half rationale tokens lean on the soft
  prompt more than the first half did.
* :func:`dynamic_trigger` - both, plus the decision, in one :class:`TriggerDecision` that keeps
  every intermediate number and serialises to JSON.
* Batch helpers live in :mod:`dpc_lens.dpc.diagnostics`: sink rate, the Fig. 5 contingency,
  threshold sweeps without recomputation and the reference for ``sink="normalize"``.

Cost: every function works on tensors of size [n_layers, n_soft] and [n_layers, n_rationale]
(a few thousand numbers), in float64 on the CPU; :func:`dynamic_trigger` takes well under a
millisecond. R and the accumulation threshold do not change any statistic, so sweeping them
needs no recomputation at all (:func:`fires_at_thresholds`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from dpc_lens.errors import ConfigError, InputError
from dpc_lens.layers import LayerSpec, resolve_layers
from dpc_lens.validate import is_int as _is_int

from .detector_config import (  # noqa: F401 (re-exported)
    _BETA_MODES,
    _LOCATORS,
    _MEASURES,
    _NEW_FIELDS,
    _SINK_MODES,
    _SINK_SOURCES,
    _STATISTICS,
    AccumulationMeasure,
    BetaMode,
    DetectorConfig,
    Locator,
    SinkMode,
    SinkSource,
    _check_choice,
    _check_real,
)
from .inputs import _OPTIONAL_INPUTS, DetectorInputs, Statistic, _check_matrix  # noqa: F401 (re-exported)
from .locate import LocatorProfile, apply_sink_policy, argmax_locate, z_locate
from .sinks import detect_sinks, sinks_by_band


def _require_keys(d: Any, what: str, keys: Sequence[str]) -> None:
    """A saved ``what`` (a ``to_dict`` JSON) has every key its ``from_dict`` reads; else a
    :class:`~dpc_lens.errors.DataError` naming the missing ones (and a close unknown key, when a
    typo is the likely cause) instead of a bare KeyError."""
    import difflib

    from dpc_lens.errors import DataError

    if not isinstance(d, Mapping):
        raise DataError(f"a saved {what} is a {type(d).__name__}; expected a JSON object (a dict).")
    missing = [k for k in keys if k not in d]
    if not missing:
        return
    extra = [k for k in d if k not in keys]
    hints = [f"{e!r} (did you mean {c[0]!r}?)" for e in extra
             if (c := difflib.get_close_matches(str(e), missing, n=1))]
    raise DataError(f"a saved {what} has no {missing}" + (f"; it has {', '.join(hints)}" if hints else "")
                    + f"; {what}.to_dict() writes the keys {list(keys)}.")


_ACCUMULATION_KEYS = ("layers", "sink", "sink_scale", "column", "scores", "total", "max_share",
                      "max_over_mean", "entropy", "normalized_entropy", "top_indices",
                      "top_is_position0")
_DEEP_FLOW_KEYS = ("layers", "f", "n_first", "beta_mode", "beta", "affected_indices", "n_affected",
                   "affected_share", "defined", "note")
_TRIGGER_KEYS = ("config", "statistic", "shallow_layers", "deep_layers", "accumulation", "deep_flow",
                 "accumulation_value", "accumulation_present", "flow_triggered", "fired", "reason")

__all__ = [
    "LayerSpec",
    "Statistic",
    "BetaMode",
    "SinkMode",
    "AccumulationMeasure",
    "SinkSource",
    "Locator",
    "resolve_layers",
    "DetectorInputs",
    "DetectorConfig",
    "AccumulationStats",
    "DeepFlowStats",
    "TriggerDecision",
    "accumulation",
    "deep_flow",
    "dynamic_trigger",
]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _tensor_list(t: Tensor) -> list[float | None]:
    """A tensor as a JSON-safe list (NaN, an undefined entry, as null)."""
    return [None if x != x else float(x) for x in t.tolist()]


def _list_tensor(xs: Sequence[float | None]) -> Tensor:
    """Inverse of :func:`_tensor_list` (null -> NaN)."""
    return torch.tensor([float("nan") if x is None else x for x in xs], dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class AccumulationStats:
    """Concentration of the soft-prompt column scores over the shallow layers of one instance.

    Attributes:
        layers: the layers summed over.
        sink: the sink mode applied; ``sink_scale`` the divisor used for ``"normalize"``.
        column: ``c_j = sum_l columns[l, j]`` before sink handling, float64 ``[soft]``.
        scores: ``c`` after sink handling (``"exclude"``: position 0 set to 0 and left out of
            every statistic; ``"normalize"``: ``c_0 / sink_scale``), float64 ``[soft]``.
        total: sum of the scores over the positions taken into account.
        max_share: ``max scores / total``.
        max_over_mean: ``max scores / mean scores`` = n_counted * max_share (1 = even spread).
        entropy: ``H = -sum_j p_j ln p_j`` with ``p = scores / total`` (``0 ln 0 = 0``), in nats.
        normalized_entropy: ``H / ln(n_counted)`` in [0, 1] (1 = even; defined as 0 when only
            one position is counted).
        top_indices: the ``top_k`` located soft tokens, ORIGINAL soft positions, by descending
            score, ties broken by the lower position.
        top_is_position0: whether the top located token is soft position 0 (an attention sink
            suspect; :func:`sink_rate` counts these).
        sink_positions: the positions the sink policy treated as sinks (``(0,)`` for
            ``sink_source="position0"``; the detected ones otherwise, possibly none).
        locator: the locator that chose ``top_indices``; ``z``: its z-scores (``locator="z"``).
    """

    layers: tuple[int, ...]
    sink: SinkMode
    sink_scale: float | None
    column: Float[Tensor, " soft"]
    scores: Float[Tensor, " soft"]
    total: float
    max_share: float
    max_over_mean: float
    entropy: float
    normalized_entropy: float
    top_indices: tuple[int, ...]
    top_is_position0: bool
    sink_positions: tuple[int, ...] = (0,)
    locator: str = "argmax"
    z: Tensor | None = None

    @property
    def concentration(self) -> float:
        """``1 - normalized_entropy``: 0 for an even spread, 1 for a single column."""
        return 1.0 - self.normalized_entropy

    def measure(self, name: AccumulationMeasure) -> float:
        """The concentration measure called ``name`` (see :class:`DetectorConfig`)."""
        _check_choice(name, "accumulation_measure", _MEASURES)
        return float(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "sink": self.sink,
            "sink_scale": self.sink_scale,
            "column": _tensor_list(self.column),
            "scores": _tensor_list(self.scores),
            "total": self.total,
            "max_share": self.max_share,
            "max_over_mean": self.max_over_mean,
            "entropy": self.entropy,
            "normalized_entropy": self.normalized_entropy,
            "top_indices": list(self.top_indices),
            "top_is_position0": self.top_is_position0,
            "sink_positions": list(self.sink_positions),
            "locator": self.locator,
            **({"z": _tensor_list(self.z)} if self.z is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AccumulationStats:
        _require_keys(d, "AccumulationStats", _ACCUMULATION_KEYS)
        return cls(
            layers=tuple(int(x) for x in d["layers"]),
            sink=d["sink"],
            sink_scale=d["sink_scale"],
            column=_list_tensor(d["column"]),
            scores=_list_tensor(d["scores"]),
            total=float(d["total"]),
            max_share=float(d["max_share"]),
            max_over_mean=float(d["max_over_mean"]),
            entropy=float(d["entropy"]),
            normalized_entropy=float(d["normalized_entropy"]),
            top_indices=tuple(int(x) for x in d["top_indices"]),
            top_is_position0=bool(d["top_is_position0"]),
            # records written before sink detection existed: position 0 was the sink slot
            sink_positions=tuple(int(x) for x in d.get("sink_positions", (0,))),
            locator=str(d.get("locator", "argmax")),
            z=_list_tensor(d["z"]) if d.get("z") is not None else None,
        )


def _check_layers(layers: Sequence[int], n_layers: int, name: str) -> list[int]:
    out = [int(layer) for layer in layers]
    if not out:
        raise InputError(
            f"{name}: the layer list is empty; resolve a layer spec with resolve_layers()."
        )
    bad = [layer for layer in out if not 0 <= layer < n_layers]
    if bad:
        raise InputError(
            f"{name}: layers {bad} are outside 0..{n_layers - 1} of the input tensor; pass indices "
            "from resolve_layers(spec, n_layers)."
        )
    if len(set(out)) != len(out):
        raise InputError(f"{name}: layers {out} repeat an index; each layer may appear once.")
    return out


def accumulation(
    columns: Float[Tensor, "layer soft"],
    layers: Sequence[int],
    sink: SinkMode = "keep",
    top_k: int = 1,
    sink_scale: float | None = None,
    *,
    sink_positions: Sequence[int] = (0,),
    locator: Locator = "argmax",
    profile: LocatorProfile | None = None,
) -> AccumulationStats:
    """Information accumulation in the shallow layers (SPEC section 3, step 3).

    Formula, for soft tokens j = 0..P-1 and the chosen layers S::

        c_j        = sum_{l in S} columns[l, j]
        sink       keep:      s = c
                   exclude:   s = c with the sink positions dropped (n_counted = P - #sinks)
                   normalize: s = c with s_j = c_j / sink_scale for each sink j
                   (sinks: ``sink_positions``, position 0 by default)
        max_share  = max_j s_j / sum_j s_j
        max/mean   = max_j s_j / mean_j s_j         (= n_counted * max_share)
        p_j        = s_j / sum s;   H = -sum_j p_j ln p_j;   H_norm = H / ln(n_counted)
        top_k      = the k positions with the largest s_j (ties -> lower position first);
                     with locator="z", the k counted positions with the largest
                     z_j = (c_j / sum c - profile.mean_j) / profile.std_j

    With ``columns = soft_columns`` (sums over question and rationale rows) c is the paper's
    column score; with ``soft_columns_norm`` it is the sum of per-row shares. Computed in
    float64.

    Raises:
        InputError: a bad layer list, ``top_k`` larger than the positions counted, a missing
            ``sink_scale`` for ``"normalize"``, or all counted scores zero (the saliency pass
            delivered no flow into the soft prompt -- never silently read as "no accumulation").
    """
    _check_matrix(columns, "columns", "layer soft")
    _check_choice(sink, "sink", _SINK_MODES)
    n_layers, n_soft = columns.shape
    chosen = _check_layers(layers, n_layers, "accumulation")
    if not _is_int(top_k) or top_k < 1:
        raise InputError(f"top_k={top_k!r} must be an int >= 1.")
    _check_choice(locator, "locator", _LOCATORS)
    c = columns.detach().to(device="cpu", dtype=torch.float64)[chosen].sum(dim=0)
    sinks = tuple(sorted({int(j) for j in sink_positions}))
    scores, counted = apply_sink_policy(c, sinks, sink, sink_scale)
    if locator == "z" and profile is None:
        raise InputError("locator='z' needs the dev profile (LocatorProfile.fit).")
    n_counted = int(counted.sum())
    if n_counted < top_k:
        raise InputError(
            f"top_k={top_k} but only {n_counted} soft positions are counted (P={n_soft}, "
            f"sink={sink!r}); lower top_k."
        )
    s = scores[counted]
    total = float(s.sum())
    if total <= 0.0:
        raise InputError(
            f"all counted soft-column scores are zero in layers {chosen}; the saliency pass "
            "delivered no flow into the soft prompt (check that gradients reached these layers)."
        )
    p = s / total
    max_share = float(p.max())
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), 0.0)
    entropy = float(-plogp.sum())
    norm_entropy = entropy / math.log(n_counted) if n_counted > 1 else 0.0
    z = None
    if locator == "z":
        top, z = z_locate(c, profile, top_k, counted)  # type: ignore[arg-type]
    else:
        top = argmax_locate(scores, top_k, counted)  # stable: ties -> lower position first
    return AccumulationStats(
        layers=tuple(chosen),
        sink=sink,
        sink_scale=float(sink_scale) if sink == "normalize" else None,
        column=c,
        scores=scores,
        total=total,
        max_share=max_share,
        max_over_mean=max_share * n_counted,
        entropy=entropy,
        normalized_entropy=min(max(norm_entropy, 0.0), 1.0),
        top_indices=top,
        top_is_position0=top[0] == 0,
        sink_positions=sinks,
        locator=locator,
        z=z,
    )


@dataclass(frozen=True, eq=False)
class DeepFlowStats:
    """Deep-layer soft-prompt flow into the rationale of one instance (SPEC section 3, step 4).

    Attributes:
        layers: the layers averaged over.
        f: ``f_i`` per rationale token, float64 ``[rat]``.
        n_first: ``|r1| = floor(n / 2)``; r2 is tokens ``n_first .. n-1`` (``ceil(n/2)`` tokens).
        beta_mode, beta: the baseline mode and value (``None`` when undefined: too short).
        affected: ``[rat]`` bool mask, True for tokens of r2 with ``f_i > beta`` (r1 is False).
        n_affected: number of affected tokens.
        affected_share: ``n_affected / |r2|`` (0.0 when undefined).
        defined: False when the rationale is too short to judge (then nothing is affected and
            the trigger cannot fire); ``note`` says why.
        n_judged: the r2 tokens judged, when some were left out because they see the soft
            prompt in none of the layers (sliding windows, :func:`deep_flow`'s ``visible``);
            ``None`` when every r2 token was judged. Their ``f`` is NaN.
    """

    layers: tuple[int, ...]
    f: Float[Tensor, " rat"]
    n_first: int
    beta_mode: BetaMode
    beta: float | None
    affected: Bool[Tensor, " rat"]
    n_affected: int
    affected_share: float
    defined: bool
    note: str
    n_judged: int | None = None

    @property
    def n_second(self) -> int:
        """``|r2|``: the second-half tokens judged (all of them unless some see no soft token)."""
        return int(self.f.shape[0]) - self.n_first if self.n_judged is None else self.n_judged

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "f": _tensor_list(self.f),
            "n_first": self.n_first,
            "beta_mode": self.beta_mode,
            "beta": self.beta,
            "affected_indices": [int(i) for i in torch.nonzero(self.affected).flatten().tolist()],
            "n_affected": self.n_affected,
            "affected_share": self.affected_share,
            "defined": self.defined,
            "note": self.note,
            **({} if self.n_judged is None else {"n_judged": self.n_judged}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepFlowStats:
        _require_keys(d, "DeepFlowStats", _DEEP_FLOW_KEYS)
        f = _list_tensor(d["f"])
        mask = torch.zeros(f.shape[0], dtype=torch.bool)
        idx = [int(i) for i in d["affected_indices"]]
        if idx:
            mask[idx] = True
        return cls(
            layers=tuple(int(x) for x in d["layers"]),
            f=f,
            n_first=int(d["n_first"]),
            beta_mode=d["beta_mode"],
            beta=None if d["beta"] is None else float(d["beta"]),
            affected=mask,
            n_affected=int(d["n_affected"]),
            affected_share=float(d["affected_share"]),
            defined=bool(d["defined"]),
            note=str(d["note"]),
            n_judged=None if d.get("n_judged") is None else int(d["n_judged"]),
        )


def deep_flow(
    rows: Float[Tensor, "layer rat"],
    layers: Sequence[int],
    beta_mode: BetaMode = "first_half_mean",
    beta_value: float | None = None,
    *,
    visible: Tensor | None = None,
) -> DeepFlowStats:
    """Deep-layer flow from the soft prompt into the rationale, and the affected tokens.

    Formula, for rationale tokens i = 0..n-1 and the chosen layers S::

        f_i            = mean_{l in S} rows[l, i]
        r1             = tokens 0 .. floor(n/2) - 1,   r2 = tokens floor(n/2) .. n-1
                         (odd n: the middle token goes to r2, so |r2| = |r1| + 1)
        beta           = mean_{i in r1} f_i            (beta_mode="first_half_mean", the paper's)
                       = beta_value                    (beta_mode="fixed")
        affected_i     = f_i > beta  for i in r2       (strict)
        affected_share = #affected / |r2|

    With ``rows = rationale_rows``, ``f_i`` is the paper's mean over deep layers of the mean
    soft->token-i saliency; with ``rationale_rows_norm`` it is the share of token i's incoming
    flow that comes from the soft prompt. The threshold R is applied by
    :func:`dynamic_trigger`, so one DeepFlowStats serves every R.

    ``visible`` (``[layer, rat]`` bool, :attr:`DetectorInputs.rationale_visible`): in a
    sliding-window layer a rationale token a window or more past the soft prompt cannot attend to
    it, and its zero flow there is structural, not measured. ``f_i`` is then the mean over the
    chosen layers where token i sees the soft prompt; a token that sees it in none of them has no
    ``f_i`` (NaN) and is left out of beta, of the affected count and of ``|r2|``
    (``n_second``). ``None``: every (layer, token) counts.

    Short rationales give a defined no-trigger result (``defined=False``, share 0, no affected
    token, ``note`` says why) instead of an error, so one empty generation does not stop a
    batch run: n = 0 always, n = 1 with ``"first_half_mean"`` (r1 is empty, beta undefined).
    With a fixed beta, n = 1 is judged normally (r2 is the single token).

    Raises:
        InputError: a bad layer list, an unknown ``beta_mode``, or ``"fixed"`` without a value.
    """
    _check_matrix(rows, "rows", "layer rat")
    _check_choice(beta_mode, "beta_mode", _BETA_MODES)
    n_layers, n = rows.shape
    chosen = _check_layers(layers, n_layers, "deep_flow")
    if beta_mode == "fixed" and (beta_value is None or not math.isfinite(float(beta_value))):
        raise InputError(f"beta_mode='fixed' needs a finite beta_value, got {beta_value!r}.")
    r = rows.detach().to(device="cpu", dtype=torch.float64)[chosen]
    seen = None
    if visible is not None:
        if tuple(visible.shape) != tuple(rows.shape) or visible.dtype != torch.bool:
            raise InputError(f"visible must be a bool tensor of the rows' shape {tuple(rows.shape)}, "
                             f"got {visible.dtype} {tuple(visible.shape)}.")
        vis = visible.detach().cpu()[chosen]
        if bool(vis.all()):
            vis = None
    else:
        vis = None
    if vis is None:
        f = r.mean(dim=0)
    else:
        k = vis.sum(0)
        f = torch.where(k > 0, (r * vis).sum(0) / k.clamp(min=1), torch.full_like(r[0], float("nan")))
        seen = k > 0
    n_first = n // 2
    mask = torch.zeros(n, dtype=torch.bool)
    blind = "" if seen is None else (
        f"; {int((~seen).sum())} of {n} rationale tokens see the soft prompt in none of the deep "
        f"layers {list(chosen)} (a window or more past it) and are left out")

    def undefined(note: str) -> DeepFlowStats:
        return DeepFlowStats(tuple(chosen), f, n_first, beta_mode, None, mask, 0, 0.0, False, note,
                             None if seen is None else int(seen[n_first:].sum()))

    if n == 0:
        return undefined("empty rationale: nothing to judge, the trigger cannot fire")
    first_ok = torch.ones(n_first, dtype=torch.bool) if seen is None else seen[:n_first]
    second_ok = torch.ones(n - n_first, dtype=torch.bool) if seen is None else seen[n_first:]
    if beta_mode == "first_half_mean":
        if n_first == 0:
            return undefined(
                f"rationale has {n} token; the first-half mean needs at least 2 tokens, "
                "the trigger cannot fire"
            )
        if not bool(first_ok.any()):
            return undefined("no first-half rationale token sees the soft prompt in the deep "
                             "layers, so beta is undefined; the trigger cannot fire" + blind)
        beta = float(f[:n_first][first_ok].mean())
    else:
        beta = float(beta_value)  # type: ignore[arg-type]
    n_second = int(second_ok.sum())
    if n_second == 0:
        return undefined("no second-half rationale token sees the soft prompt in the deep layers; "
                         "the trigger cannot fire" + blind)
    mask[n_first:] = (f[n_first:] > beta) & second_ok
    n_aff = int(mask.sum())
    return DeepFlowStats(
        layers=tuple(chosen),
        f=f,
        n_first=n_first,
        beta_mode=beta_mode,
        beta=beta,
        affected=mask,
        n_affected=n_aff,
        affected_share=n_aff / n_second,
        defined=True,
        note=blind.lstrip("; "),
        n_judged=None if seen is None else n_second,
    )


# --------------------------------------------------------------------------------------------
# The Dynamic Trigger
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TriggerDecision:
    """The Dynamic Trigger's verdict for one instance, with everything that led to it.

    Attributes:
        config: the detector config used.
        statistic: ``"raw"`` or ``"normalized"`` (which input tensors were read).
        shallow_layers, deep_layers: the resolved layer lists.
        accumulation: shallow-layer :class:`AccumulationStats` (its ``top_indices`` are the
            soft tokens Dynamic Corruption zeroes when ``fired``).
        deep_flow: deep-layer :class:`DeepFlowStats`.
        accumulation_value: ``accumulation.measure(config.accumulation_measure)``.
        accumulation_present: ``accumulation_value >= config.accumulation_threshold``
            (computed whether or not it gates the trigger, for the Fig. 5 contingency).
        flow_triggered: ``deep_flow.defined and deep_flow.affected_share > config.R``.
        fired: ``flow_triggered and (accumulation_present or not config.require_accumulation)``.
        reason: one human-readable sentence saying why it fired or not.
        sinks: the soft positions that are sinks in each band of layers
            (:func:`~dpc_lens.dpc.sinks.sinks_by_band`), when the inputs carry attention received;
            ``None`` otherwise.
    """

    config: DetectorConfig
    statistic: Statistic
    shallow_layers: tuple[int, ...]
    deep_layers: tuple[int, ...]
    accumulation: AccumulationStats
    deep_flow: DeepFlowStats
    accumulation_value: float
    accumulation_present: bool
    flow_triggered: bool
    fired: bool
    reason: str
    sinks: list[dict[str, Any]] | None = None

    @property
    def corrupt_indices(self) -> tuple[int, ...]:
        """Soft positions to zero: the located top-k when fired, else none."""
        return self.accumulation.top_indices if self.fired else ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (floats, ints, bools, strings, lists) for a JSONL record."""
        return {
            "config": self.config.to_dict(),
            "statistic": self.statistic,
            "shallow_layers": list(self.shallow_layers),
            "deep_layers": list(self.deep_layers),
            "accumulation": self.accumulation.to_dict(),
            "deep_flow": self.deep_flow.to_dict(),
            "accumulation_value": self.accumulation_value,
            "accumulation_present": self.accumulation_present,
            "flow_triggered": self.flow_triggered,
            "fired": self.fired,
            "reason": self.reason,
            **({"sinks": self.sinks} if self.sinks is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TriggerDecision:
        _require_keys(d, "TriggerDecision", _TRIGGER_KEYS)
        return cls(
            config=DetectorConfig.from_dict(d["config"]),
            statistic=d["statistic"],
            shallow_layers=tuple(int(x) for x in d["shallow_layers"]),
            deep_layers=tuple(int(x) for x in d["deep_layers"]),
            accumulation=AccumulationStats.from_dict(d["accumulation"]),
            deep_flow=DeepFlowStats.from_dict(d["deep_flow"]),
            accumulation_value=float(d["accumulation_value"]),
            accumulation_present=bool(d["accumulation_present"]),
            flow_triggered=bool(d["flow_triggered"]),
            fired=bool(d["fired"]),
            reason=str(d["reason"]),
            sinks=d.get("sinks"),
        )


def _resolve_field(config: DetectorConfig, name: str, n_layers: int,
                   windows: Sequence[int | None] | None = None) -> list[int]:
    try:
        return resolve_layers(getattr(config, name), n_layers, windows)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None


def dynamic_trigger(
    inputs: DetectorInputs, config: DetectorConfig | None = None
) -> TriggerDecision:
    """Decide whether the soft prompt harms this instance (DPC's Dynamic Trigger).

    Reads ``soft_columns[_norm]`` and ``rationale_rows[_norm]`` according to
    ``config.statistic``, resolves the layer sets against ``inputs.n_layers``, then::

        acc   = accumulation(columns, shallow, sink, top_k)
        flow  = deep_flow(rows, deep, beta_mode, beta_value)
        present        = acc.<accumulation_measure> >= accumulation_threshold
        flow_triggered = flow.affected_share > R        (strict: a share equal to R does not fire)
        fired          = flow_triggered and (present or not require_accumulation)

    Pure torch on tensors of a few thousand numbers: well under a millisecond per call, so
    calibration can re-run it for many configs on cached :class:`DetectorInputs`.
    """
    if config is None:
        config = DetectorConfig()
    if not isinstance(inputs, DetectorInputs):
        raise InputError(f"inputs must be DetectorInputs, got {type(inputs).__name__}.")
    if not isinstance(config, DetectorConfig):
        raise InputError(f"config must be DetectorConfig, got {type(config).__name__}.")
    shallow = _resolve_field(config, "shallow_layers", inputs.n_layers, inputs.windows)
    deep = _resolve_field(config, "deep_layers", inputs.n_layers, inputs.windows)
    acc = accumulation(
        inputs.columns(config.statistic), shallow, config.sink, config.top_k, config.sink_scale,
        sink_positions=sink_positions(inputs, config, shallow), locator=config.locator,
        profile=config.locator_profile,
    )
    flow = deep_flow(inputs.rows(config.statistic), deep, config.beta_mode, config.beta_value,
                     visible=inputs.rationale_visible)
    value = acc.measure(config.accumulation_measure)
    present = value >= config.accumulation_threshold
    flow_triggered = flow.defined and flow.affected_share > config.R
    fired = flow_triggered and (present or not config.require_accumulation)

    acc_txt = (
        f"accumulation {config.accumulation_measure}={value:.4g} "
        f"{'>=' if present else '<'} {config.accumulation_threshold:.4g}"
    )
    if not flow.defined:
        reason = f"not fired: {flow.note}"
    else:
        flow_txt = (
            f"{flow.n_affected}/{flow.n_second} second-half rationale tokens have deep "
            f"soft-prompt flow > beta={flow.beta:.4g} (share {flow.affected_share:.4g} "
            f"{'>' if flow_triggered else '<='} R={config.R:.4g})"
        )
        if fired:
            reason = f"fired: {flow_txt}"
            if config.require_accumulation:
                reason += f" and {acc_txt}"
        elif not flow_triggered:
            reason = f"not fired: {flow_txt}"
        else:
            reason = f"not fired: {flow_txt} but {acc_txt} and require_accumulation=True"
    return TriggerDecision(
        config=config,
        statistic=config.statistic,
        shallow_layers=tuple(shallow),
        deep_layers=tuple(deep),
        accumulation=acc,
        deep_flow=flow,
        accumulation_value=value,
        accumulation_present=present,
        flow_triggered=flow_triggered,
        fired=fired,
        reason=reason,
        sinks=(sinks_by_band(inputs.soft_attention, config.sink_threshold)
               if inputs.soft_attention is not None else None),
    )


def sink_positions(inputs: DetectorInputs, config: DetectorConfig,
                   shallow: Sequence[int] | None = None) -> tuple[int, ...]:
    """The soft positions ``config``'s sink policy treats as sinks for this instance:
    ``(0,)`` for ``sink_source="position0"``; for ``"detected"``, the positions whose attention
    multiple (and, with ``sink_residual_threshold``, residual multiple), averaged over the shallow
    layers, reaches the threshold (:func:`~dpc_lens.dpc.sinks.detect_sinks`).

    Raises:
        InputError: ``"detected"`` on inputs measured without attention received.
    """
    if config.sink_source == "position0":
        return (0,)
    if inputs.soft_attention is None:
        raise InputError(
            "sink_source='detected' needs the attention each soft position receives, but these "
            "detector inputs were measured without it (soft_attention is None); re-run "
            "dpc_lens.dpc.analyse, which records it, or use sink_source='position0'."
        )
    layers = list(shallow) if shallow is not None else _resolve_field(config, "shallow_layers",
                                                                     inputs.n_layers, inputs.windows)
    return detect_sinks(inputs.soft_attention, layers, config.sink_threshold,
                        inputs.soft_residual, config.sink_residual_threshold)
