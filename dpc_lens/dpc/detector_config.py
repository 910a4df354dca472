"""The DPC detector's configuration: :class:`DetectorConfig` and its choice types (split from
:mod:`dpc_lens.dpc.detector`, which re-exports them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from dpc_lens.errors import ConfigError
from dpc_lens.layers import LayerSpec, normalize_layer_spec
from dpc_lens.validate import check_keys
from dpc_lens.validate import is_int as _is_int
from dpc_lens.validate import is_real as _is_real

from .inputs import Statistic
from .locate import LocatorProfile
from .sinks import SINK_ATTENTION_THRESHOLD

BetaMode = Literal["first_half_mean", "fixed"]
SinkMode = Literal["keep", "exclude", "normalize"]
AccumulationMeasure = Literal["max_share", "max_over_mean", "concentration"]
SinkSource = Literal["position0", "detected"]
Locator = Literal["argmax", "z"]

_STATISTICS: tuple[str, ...] = get_args(Statistic)
_BETA_MODES: tuple[str, ...] = get_args(BetaMode)
_SINK_MODES: tuple[str, ...] = get_args(SinkMode)
_MEASURES: tuple[str, ...] = get_args(AccumulationMeasure)
_SINK_SOURCES: tuple[str, ...] = get_args(SinkSource)
_LOCATORS: tuple[str, ...] = get_args(Locator)

# --------------------------------------------------------------------------------------------
# Inputs and config
# --------------------------------------------------------------------------------------------



def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not allowed; expected one of {choices}.")


def _check_real(value: Any, name: str) -> float:
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ConfigError(f"{name}={value!r} must be a finite number.")
    return float(value)


@dataclass(frozen=True)
class DetectorConfig:
    """Every knob of the DPC detector (SPEC section 3, steps 3-4), validated on construction.

    Attributes:
        shallow_layers: layers for information accumulation (:func:`resolve_layers` forms).
            Default ``"shallow"``: first third of the layers without layer 0.
        deep_layers: layers for the deep flow. Default ``"deep"``: last third of the layers.
        statistic: ``"normalized"`` (default) uses the row-share tensors of
            :class:`DetectorInputs`, ``"raw"`` the raw saliency sums. Normalised is the default
            because raw saliency grows with the generation's loss (see the module docstring).
        beta_mode: ``"first_half_mean"`` (the paper's default: beta = mean f over the first half
            of the rationale) or ``"fixed"`` (beta = ``beta_value``).
        beta_value: the fixed beta; required (>= 0) when ``beta_mode="fixed"``, must be ``None``
            otherwise.
        R: affected-share threshold in [0, 1]; the trigger fires when the share of affected
            second-half tokens is strictly greater than R (R = 1 never fires). The paper gives
            no value. Default 0.5: fire when most of the second half leans on the soft prompt
            more than the first half did on average -- a neutral start that calibration on a
            labelled dev split should replace.
        sink: what to do with the sink columns (column 0, or the detected sinks: see
            ``sink_source``): ``"keep"`` (default, the paper's behaviour; watch the run's
            located-position histogram), ``"exclude"`` (drop the sink columns from every
            accumulation statistic and from the top-k), ``"normalize"`` (divide them by
            ``sink_scale``, see :func:`fit_sink_scale`).
        sink_scale: for ``sink="normalize"`` only (required there, ``None`` otherwise): the
            typical ratio of a sink column to the mean ordinary column on reference instances.
            After dividing, a sink competes as an ordinary column that is large only when it
            exceeds its usual sink level.
        top_k: how many soft tokens to locate for corruption (default 1, the paper's k).
        require_accumulation: when True the trigger also needs accumulation in the shallow
            layers (``accumulation_measure >= accumulation_threshold``). Default False: the
            paper triggers on the deep flow alone and uses accumulation to locate the tokens.
        accumulation_measure: the concentration measure that decides "accumulation present":
            ``"max_over_mean"`` (default; c_max / mean c, = P_eff * max_share, comparable across
            prompt lengths), ``"max_share"`` (c_max / sum c, in (0, 1]) or ``"concentration"``
            (1 - normalised entropy, in [0, 1]).
        accumulation_threshold: accumulation is present when the measure is >= this. Default
            4.0 on ``max_over_mean``: the top column carries at least four times an even share
            (the SPEC's small model showed 5x: 31% vs 6.25% with 16 tokens). Bounds: > 0 and
            <= 1 for ``max_share``/``concentration``, >= 1 for ``max_over_mean``.
        sink_source: which soft positions the ``sink`` policy treats as sinks: ``"position0"``
            (default; the SPEC's assumption that sinks sit first) or ``"detected"`` (the
            positions that receive at least ``sink_threshold`` times a typical token's attention,
            averaged over the shallow layers, wherever they sit; :mod:`dpc_lens.dpc.sinks`).
            ``"detected"`` needs inputs measured with their attention (``soft_attention``,
            which :func:`~dpc_lens.dpc.analyse` records).
        sink_threshold: attention multiple at or above which a soft position is a sink
            (default 10: the trained SmolLM2 sink row takes ~100x, an ordinary row ~1x).
        sink_residual_threshold: also call a position a sink when its residual norm, averaged
            over the shallow layers, is at least this multiple of the median position's
            (e.g. 3.0); ``None`` (default) uses attention alone.
        locator: how the tokens to corrupt are chosen (:mod:`dpc_lens.dpc.locate`):
            ``"argmax"`` (default, the paper's: the top-k column scores after the sink policy)
            or ``"z"`` (the top-k z-scores of each position's share against the dev profile).
        locator_profile: for ``locator="z"`` only: the
            :class:`~dpc_lens.dpc.locate.LocatorProfile` fitted on dev inputs with this config's
            ``statistic`` and ``shallow_layers``.
    """

    shallow_layers: LayerSpec = "shallow"
    deep_layers: LayerSpec = "deep"
    statistic: Statistic = "normalized"
    beta_mode: BetaMode = "first_half_mean"
    beta_value: float | None = None
    R: float = 0.5
    sink: SinkMode = "keep"
    sink_scale: float | None = None
    top_k: int = 1
    require_accumulation: bool = False
    accumulation_measure: AccumulationMeasure = "max_over_mean"
    accumulation_threshold: float = 4.0
    sink_source: SinkSource = "position0"
    sink_threshold: float = SINK_ATTENTION_THRESHOLD
    sink_residual_threshold: float | None = None
    locator: Locator = "argmax"
    locator_profile: LocatorProfile | None = None

    def __post_init__(self) -> None:
        self._check_sinks_and_locator()
        object.__setattr__(
            self, "shallow_layers", normalize_layer_spec(self.shallow_layers, "shallow_layers")
        )
        object.__setattr__(
            self, "deep_layers", normalize_layer_spec(self.deep_layers, "deep_layers")
        )
        _check_choice(self.statistic, "statistic", _STATISTICS)
        _check_choice(self.beta_mode, "beta_mode", _BETA_MODES)
        if self.beta_mode == "fixed":
            if self.beta_value is None:
                raise ConfigError(
                    "beta_mode='fixed' needs beta_value (a number >= 0 on the scale of the chosen "
                    "statistic); or use beta_mode='first_half_mean'."
                )
            bv = _check_real(self.beta_value, "beta_value")
            if bv < 0:
                raise ConfigError(
                    f"beta_value={bv} must be >= 0 (saliency flows are non-negative)."
                )
            object.__setattr__(self, "beta_value", bv)
        elif self.beta_value is not None:
            raise ConfigError(
                f"beta_value={self.beta_value!r} is only used with beta_mode='fixed'; set "
                "beta_mode='fixed' or leave beta_value=None."
            )
        r = _check_real(self.R, "R")
        if not 0.0 <= r <= 1.0:
            raise ConfigError(
                f"R={r} must be in [0, 1]: it is a threshold on the share of affected second-half "
                "rationale tokens (the trigger fires when the share is > R)."
            )
        object.__setattr__(self, "R", r)
        _check_choice(self.sink, "sink", _SINK_MODES)
        if self.sink == "normalize":
            if self.sink_scale is None:
                raise ConfigError(
                    "sink='normalize' needs sink_scale (the typical c_0 / mean(c_1..) ratio); "
                    "fit it "
                    "on reference instances with fit_sink_scale(inputs, config), or use "
                    "sink='exclude'."
                )
            s = _check_real(self.sink_scale, "sink_scale")
            if s <= 0:
                raise ConfigError(f"sink_scale={s} must be > 0.")
            object.__setattr__(self, "sink_scale", s)
        elif self.sink_scale is not None:
            raise ConfigError(
                f"sink_scale={self.sink_scale!r} is only used with sink='normalize'; set "
                "sink='normalize' or leave sink_scale=None."
            )
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k!r} must be an int >= 1 (soft tokens to corrupt).")
        if not isinstance(self.require_accumulation, bool):
            raise ConfigError(
                f"require_accumulation={self.require_accumulation!r} must be True or False."
            )
        _check_choice(self.accumulation_measure, "accumulation_measure", _MEASURES)
        t = _check_real(self.accumulation_threshold, "accumulation_threshold")
        if self.accumulation_measure == "max_over_mean":
            if t < 1.0:
                raise ConfigError(
                    f"accumulation_threshold={t} is below 1, but max_over_mean is always >= 1 "
                    "(1 = even spread); use e.g. 4.0 for 'top column >= 4x an even share'."
                )
        elif not 0.0 < t <= 1.0:
            raise ConfigError(
                f"accumulation_threshold={t} must be in (0, 1] for "
                f"accumulation_measure={self.accumulation_measure!r}."
            )
        object.__setattr__(self, "accumulation_threshold", t)

    def _check_sinks_and_locator(self) -> None:
        _check_choice(self.sink_source, "sink_source", _SINK_SOURCES)
        st = _check_real(self.sink_threshold, "sink_threshold")
        if st <= 0:
            raise ConfigError(f"sink_threshold={st} must be > 0 (a multiple of a typical token's "
                              f"attention received; default {SINK_ATTENTION_THRESHOLD}).")
        object.__setattr__(self, "sink_threshold", st)
        if self.sink_residual_threshold is not None:
            rt = _check_real(self.sink_residual_threshold, "sink_residual_threshold")
            if rt <= 0:
                raise ConfigError(f"sink_residual_threshold={rt} must be > 0 (a multiple of the "
                                  "median residual norm, e.g. 3.0), or None to use attention alone.")
            object.__setattr__(self, "sink_residual_threshold", rt)
        _check_choice(self.locator, "locator", _LOCATORS)
        prof = self.locator_profile
        if isinstance(prof, Mapping):
            from .locate import LocatorProfile as _LP

            prof = _LP.from_dict(prof)
            object.__setattr__(self, "locator_profile", prof)
        if self.locator == "z":
            if prof is None:
                raise ConfigError("locator='z' needs locator_profile, the dev split's per-position "
                                  "share profile: LocatorProfile.fit(dev_inputs, statistic, "
                                  "shallow_layers); or use locator='argmax'.")
            if self.sink == "normalize":
                raise ConfigError("locator='z' already compares each position with its dev profile, "
                                  "so sink='normalize' has nothing left to do; use sink='keep' or "
                                  "'exclude'.")
            shallow = normalize_layer_spec(self.shallow_layers, "shallow_layers")
            if prof.statistic != self.statistic or prof.shallow_layers != shallow:
                raise ConfigError(
                    f"locator_profile was fitted with statistic={prof.statistic!r}, shallow_layers="
                    f"{prof.shallow_layers!r}, but this config uses statistic={self.statistic!r}, "
                    f"shallow_layers={shallow!r}; refit the profile with these settings."
                )
        elif prof is not None:
            raise ConfigError("locator_profile is only used with locator='z'; set locator='z' or "
                              "leave locator_profile=None.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; layer specs become a name, a list of ints or a list of two floats.

        The sink-detection and locator fields are left out while at their defaults, so a config
        saved before they existed reads back and compares equal (resume checks, records)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _NEW_FIELDS and v == f.default:
                continue
            if f.name == "locator_profile":
                out[f.name] = v.to_dict()
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        check_keys(d, [f.name for f in fields(cls)], "DetectorConfig")
        return cls(**d)


#: DetectorConfig fields added with sink detection and the locators (issue 19)
_NEW_FIELDS = ("sink_source", "sink_threshold", "sink_residual_threshold", "locator", "locator_profile")
