"""Layer sets: THE layer grammar of dpc_lens, shared by DPC, IAP and the saliency engine.

Every place that takes "which layers" -- DPC's shallow and deep sets
(:class:`~dpc_lens.dpc.DetectorConfig`), IAP's question->prompt and rationale sets
(:class:`~dpc_lens.iap.IAPConfig`), calibration grids and :class:`~dpc_lens.saliency.SaliencyConfig`
-- reads the spec with :func:`normalize_layer_spec` and resolves it with :func:`resolve_layers`,
so one spec means the same layers in both methods.

The rule (the papers are silent; this is dpc_lens's choice, also in the README under "Choices
where the papers are silent"):

* a **fraction pair** ``(a, b)`` (any float in it makes it one; ``0 <= a < b <= 1``) selects the
  layers ``l`` with ``a <= l / n_layers < b``, i.e. ``range(ceil(a*n), ceil(b*n))``. Adjacent
  pairs such as ``(0, 1/3), (1/3, 2/3), (2/3, 1)`` partition the layers with no gap and no
  overlap. A pair that selects no layer of the model is an error, never silently widened.
  "The last third" of 32 layers is ``(2/3, 1)`` -> 22..31 (the layers at or past two thirds of
  the depth); of 12 layers 8..11.
* an **index list** (ints only): negative indices count from the end; out of range or a layer
  named twice is an error.
* the **names** ``"shallow"`` (the first third without layer 0, at least ``[1]``) and ``"deep"``
  (the last third, at least ``[n-1]``), which also work on 2- and 3-layer models where a third
  is less than one layer;
* the **names** ``"global"`` (the layers with full causal attention) and ``"sliding"`` (the
  sliding-window layers, e.g. Gemma 3's 15 of 18), which need the model's layer types
  (``windows=``, see :func:`attention_windows`).

Every malformed or unresolvable spec raises :class:`~dpc_lens.errors.ConfigError` (one error
class for both methods). Before this module, IAP rounded fraction boundaries half up (the last
third of 32 layers was 21..31, and of 4 layers the first third was [0] instead of [0, 1]) and
refused negative indices with another error class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch

from dpc_lens.errors import ConfigError
from dpc_lens.validate import is_int as _is_int
from dpc_lens.validate import is_real as _is_real

__all__ = ["LayerSpec", "LayerName", "attention_windows", "normalize_layer_spec", "resolve_layers",
           "layer_spec_json"]

LayerName = Literal["shallow", "deep", "global", "sliding"]
#: A layer set: a sequence of layer indices (negative counts from the end), a
#: ``(start_frac, end_frac)`` pair of floats, or one of the names ``"shallow"`` / ``"deep"`` /
#: ``"global"`` / ``"sliding"``.
LayerSpec = LayerName | Sequence[int] | tuple[float, float]

_LAYER_NAMES: tuple[str, ...] = get_args(LayerName)

# Fraction boundaries like 0.28 * 25 come out as 7.000000000000001 in floating point; the
# boundary must still count as 7, so ceil() is taken after subtracting this tolerance.
_FRACTION_EPS = 1e-9


def attention_windows(config: Any, n_layers: int) -> tuple[int | None, ...]:
    """Per layer, its sliding window (``None`` for a global layer), from a Hugging Face config
    (``layer_types`` with ``"sliding_attention"`` entries and ``sliding_window``; Gemma 2/3,
    Mistral, Qwen2, ... in transformers >= 5) or a TransformerLens config (``attn_types`` with
    ``"local"`` entries and ``window_size``). A config that names no layer types: every layer
    global."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    local = "sliding_attention"
    if types is None:
        types, local = getattr(config, "attn_types", None), "local"
        window = getattr(config, "window_size", None)
    if types is None or window is None:
        return (None,) * n_layers
    types = list(types)
    if len(types) != n_layers:
        raise ConfigError(f"The model config lists {len(types)} layer types for {n_layers} layers; "
                          "dpc_lens cannot tell which layers use a sliding window.")
    return tuple(int(window) if t == local else None for t in types)


def normalize_layer_spec(spec: Any, what: str = "layer spec") -> str | tuple[int, ...] | tuple[float, float]:
    """Check a layer spec's form (not its range, which needs n_layers) and make it hashable.

    Returns the name, a tuple of ints (index list) or a tuple of two floats (fraction pair).
    The rule that tells the two sequence forms apart: a sequence holding any ``float`` is a
    fraction pair and must have exactly two entries; a sequence of ``int`` only is an index
    list. So ``(0, 0.5)`` is a fraction pair and ``(0, 1)`` is the index list [0, 1].
    """
    if isinstance(spec, str):
        if spec not in _LAYER_NAMES:
            raise ConfigError(
                f"{what}={spec!r} is not a layer-set name; expected one of {_LAYER_NAMES}, "
                "a list of layer indices such as [1, 2, 3], or a fraction pair such as (0.0, 0.33)."
            )
        return spec
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    if not isinstance(spec, Sequence):
        raise ConfigError(
            f"{what}={spec!r} (type {type(spec).__name__}) is not a layer set; expected 'shallow', "
            "'deep', a list of layer indices such as [1, 2, 3], or a fraction pair such as "
            "(0.0, 0.33)."
        )
    items = list(spec)
    if not items:
        raise ConfigError(
            f"{what} is an empty list; give at least one layer index, a fraction pair, "
            "or 'shallow' / 'deep'."
        )
    if any(isinstance(x, float) for x in items):
        if len(items) != 2 or not all(_is_real(x) for x in items):
            raise ConfigError(
                f"{what}={spec!r} mixes floats into a layer list; a fraction pair is exactly two "
                "numbers (start_frac, end_frac) such as (0.0, 0.33), and an index list holds "
                "ints only."
            )
        start, end = float(items[0]), float(items[1])
        if not (0.0 <= start < end <= 1.0):
            raise ConfigError(
                f"{what}={spec!r} is not a valid fraction pair; expected 0.0 <= start_frac < "
                "end_frac <= 1.0, e.g. (0.0, 0.33) for the first third or (0.67, 1.0) for the last."
            )
        return (start, end)
    bad = [x for x in items if not _is_int(x)]
    if bad:
        raise ConfigError(
            f"{what}={spec!r} holds non-integer entries {bad!r}; layer indices are ints "
            "(negative ones count from the last layer)."
        )
    return tuple(int(x) for x in items)


def _fraction_layers(start: float, end: float, n_layers: int) -> list[int]:
    lo = math.ceil(start * n_layers - _FRACTION_EPS)
    hi = math.ceil(end * n_layers - _FRACTION_EPS)
    return list(range(max(lo, 0), min(hi, n_layers)))


def resolve_layers(spec: LayerSpec, n_layers: int,
                   windows: Sequence[int | None] | None = None) -> list[int]:
    """Turn a layer-set spec into a sorted list of distinct layer indices in ``[0, n_layers)``.

    Forms of ``spec``:

    * **index list** (ints): negative indices count from the end (``-1`` is the last layer).
      Every index must lie in ``[-n_layers, n_layers)`` and no layer may appear twice (two
      spellings of one layer, such as ``[3, -1]`` in a 4-layer model, count as a repeat: a
      repeated layer would be weighted twice in the sums).
    * **fraction pair** ``(start_frac, end_frac)`` (floats, ``0 <= start < end <= 1``): the
      layers l with ``start_frac <= l / n_layers < end_frac``, i.e.
      ``range(ceil(start_frac * n), ceil(end_frac * n))``.
    * ``"shallow"``: the first third of the layers without layer 0 -- the fraction pair
      ``(0, 1/3)`` minus layer 0, i.e. layers ``1 .. ceil(n/3) - 1``. When that is empty
      (n_layers = 2 or 3) it falls back to ``[1]``.
    * ``"deep"``: the last third -- the fraction pair ``(2/3, 1)``, i.e. layers
      ``ceil(2n/3) .. n-1`` (that is the last ``floor(n/3)`` layers). When that is empty
      (n_layers <= 2) it falls back to ``[n - 1]``.
    * ``"global"`` / ``"sliding"``: the layers whose ``windows`` entry is ``None`` / a window
      (``windows``: one entry per layer, :func:`attention_windows`; needed for these names).

    Defaults by model size (SPEC section 3 step 6; the paper gives none, and reports the
    strongest soft-prompt flow around layers 2-10 of 32-40-layer models)::

        n_layers   shallow        deep
        2          [1]            [1]      (the same layer: a 2-layer model has no better split)
        3          [1]            [2]
        4          [1]            [3]
        12         [1, 2, 3]      [8, 9, 10, 11]
        32         [1 .. 10]      [22 .. 31]
        40         [1 .. 13]      [27 .. 39]

    Raises:
        ConfigError: the spec is malformed, an index is out of range or repeated, a fraction
            pair selects no layer of this model, or ``"shallow"`` is asked of a 1-layer model.
    """
    if not _is_int(n_layers) or n_layers < 1:
        raise ConfigError(
            f"n_layers={n_layers!r} must be a positive int (the model's cfg.n_layers)."
        )
    norm = normalize_layer_spec(spec, "layer spec")
    if norm in ("global", "sliding"):
        if windows is None:
            raise ConfigError(
                f"the layer set {norm!r} needs the model's layer types (which layers use a sliding "
                "window); here only the layer count is known. Pass windows="
                "dpc_lens.layers.attention_windows(hf_config, n_layers), or list the layers.")
        if len(windows) != n_layers:
            raise ConfigError(f"windows has {len(windows)} entries for {n_layers} layers; "
                              "give one per layer.")
        layers = [i for i, w in enumerate(windows) if (w is None) == (norm == "global")]
        if not layers:
            raise ConfigError(f"the layer set {norm!r} selects no layer: this model has "
                              f"{'no global' if norm == 'global' else 'no sliding-window'} layer.")
        return layers
    if norm == "shallow":
        if n_layers < 2:
            raise ConfigError(
                "the layer set 'shallow' excludes layer 0, and a 1-layer model has no other "
                "layer; pass [0] explicitly (e.g. shallow_layers=[0]) to use layer 0."
            )
        layers = [layer for layer in _fraction_layers(0.0, 1.0 / 3.0, n_layers) if layer != 0]
        return layers or [1]
    if norm == "deep":
        return _fraction_layers(2.0 / 3.0, 1.0, n_layers) or [n_layers - 1]
    if isinstance(norm, tuple) and norm and isinstance(norm[0], float):
        start, end = norm
        layers = _fraction_layers(start, end, n_layers)
        if not layers:
            raise ConfigError(
                f"fraction pair ({start}, {end}) selects no layer of a {n_layers}-layer model "
                f"(it takes layers l with {start} <= l/{n_layers} < {end}); widen the range or "
                "pass layer indices explicitly."
            )
        return layers
    out: list[int] = []
    for idx in norm:  # type: ignore[union-attr]
        if not -n_layers <= idx < n_layers:
            raise ConfigError(
                f"layer index {idx} is out of range for a {n_layers}-layer model; valid indices "
                f"are 0..{n_layers - 1} or -{n_layers}..-1."
            )
        pos = idx % n_layers
        if pos in out:
            raise ConfigError(
                f"layer {pos} appears twice in {list(norm)!r} (for a {n_layers}-layer model); "
                "each layer may be listed once."
            )
        out.append(pos)
    return sorted(out)


def layer_spec_json(spec: Any) -> Any:
    """A normalised layer spec as JSON: a name, a list of ints, or a list of two floats."""
    return list(spec) if isinstance(spec, tuple) else spec

