"""Tests for dpc_lens.dpc.detector: every expected number is worked out by hand in the test.

The public functions are wrapped with jaxtyping + beartype here, so the shape annotations in
their signatures are checked at run time on every call in this file.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from beartype import beartype
from jaxtyping import jaxtyped

from dpc_lens import dpc as D
from dpc_lens.dpc.detector import DetectorConfig, DetectorInputs, TriggerDecision, resolve_layers
from dpc_lens.errors import ConfigError, InputError


def _checked(fn):
    return jaxtyped(typechecker=beartype)(fn)


accumulation = _checked(D.accumulation)
deep_flow = _checked(D.deep_flow)
dynamic_trigger = _checked(D.dynamic_trigger)
sink_rate = _checked(D.sink_rate)
contingency = _checked(D.accumulation_deepflow_contingency)
fires_at_thresholds = _checked(D.fires_at_thresholds)
fit_sink_scale = _checked(D.fit_sink_scale)


def t(x) -> torch.Tensor:
    # float64 so that hand-written decimals such as 0.1 arrive exactly as written
    return torch.tensor(x, dtype=torch.float64)


def make_inputs(
    shallow_cols: list[float],
    deep_rows: list[float],
    *,
    norm_cols: list[float] | None = None,
    norm_rows: list[float] | None = None,
) -> DetectorInputs:
    """A 4-layer instance (defaults: shallow = [1], deep = [3]) with decoys in layers 0 and 2.

    The decoy layers hold values that would change every statistic if the detector read the
    wrong layers: column 0 huge and the rationale flow rising steadily. The normalised rows
    default to ``deep_rows / 10`` (they are shares, at most 1).
    """
    p, n = len(shallow_cols), len(deep_rows)
    decoy_cols = [100.0] + [0.5] * (p - 1)
    decoy_rows = [0.01 * (i + 1) for i in range(n)]
    cols = t([decoy_cols, shallow_cols, decoy_cols, decoy_cols])
    rows = t([decoy_rows, decoy_rows, decoy_rows, deep_rows])
    ncols = t([decoy_cols, norm_cols or shallow_cols, decoy_cols, decoy_cols])
    nrows = t([decoy_rows, decoy_rows, decoy_rows, norm_rows or [v / 10 for v in deep_rows]])
    return DetectorInputs(cols, ncols, rows, nrows)


# ------------------------------------------------------------------------------------------
# Layer sets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, shallow, deep",
    [
        (2, [1], [1]),
        (3, [1], [2]),
        (4, [1], [3]),
        (12, [1, 2, 3], [8, 9, 10, 11]),
        (32, list(range(1, 11)), list(range(22, 32))),
        (40, list(range(1, 14)), list(range(27, 40))),
    ],
)
def test_named_layer_sets(n, shallow, deep):
    assert resolve_layers("shallow", n) == shallow
    assert resolve_layers("deep", n) == deep


def test_shallow_needs_two_layers():
    with pytest.raises(ConfigError, match=r"1-layer model has no other layer; pass \[0\]"):
        resolve_layers("shallow", 1)
    assert resolve_layers("deep", 1) == [0]


def test_index_lists_negative_sorted():
    assert resolve_layers([-1, 0], 4) == [0, 3]
    assert resolve_layers((2, 1), 12) == [1, 2]
    assert resolve_layers([-12], 12) == [0]


def test_index_errors():
    with pytest.raises(
        ConfigError,
        match=r"layer index 4 is out of range for a 4-layer model; valid indices are 0..3",
    ):
        resolve_layers([4], 4)
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers([-5], 4)
    with pytest.raises(ConfigError, match="layer 3 appears twice"):
        resolve_layers([3, -1], 4)
    with pytest.raises(ConfigError, match="positive int"):
        resolve_layers("deep", 0)


def test_fraction_pairs():
    # l / n in [start, end): n=4 -> l/4 in [0.25, 0.75) -> {1, 2}
    assert resolve_layers((0.25, 0.75), 4) == [1, 2]
    assert resolve_layers((0.0, 0.5), 4) == [0, 1]
    assert resolve_layers((0, 0.5), 4) == [0, 1]  # any float makes it a fraction pair
    assert resolve_layers((0.5, 1.0), 40) == list(range(20, 40))
    assert resolve_layers((2 / 3, 1.0), 12) == [8, 9, 10, 11]
    assert resolve_layers((0.0, 1 / 3), 12) == [0, 1, 2, 3]
    # Floating point: 0.28 * 25 = 7.000000000000001 and 0.56 * 25 = 14.000000000000002, yet
    # 7/25 >= 0.28 (layer 7 is in) and 14/25 is not < 0.56 (layer 14 is out).
    assert resolve_layers((0.28, 0.56), 25) == list(range(7, 14))


def test_fraction_pair_selecting_nothing():
    # ceil(0.3 * 4) = 2 and ceil(0.45 * 4) = 2 -> empty
    with pytest.raises(ConfigError, match=r"selects no layer of a 4-layer model.*widen the range"):
        resolve_layers((0.3, 0.45), 4)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("middle", r"'middle' is not a layer-set name; expected one of "
                   r"\('shallow', 'deep', 'global', 'sliding'\)"),
        ([], "empty list"),
        ((0.5, 0.2), r"0.0 <= start_frac < end_frac <= 1.0"),
        ((0.0, 1.5), r"0.0 <= start_frac < end_frac <= 1.0"),
        ([1, 2.0, 3], "mixes floats"),
        (["1"], "non-integer entries"),
        ([True], "non-integer entries"),
        (3, "is not a layer set"),
    ],
)
def test_layer_spec_validation(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_layers(spec, 12)
    with pytest.raises(ConfigError, match=message):
        DetectorConfig(shallow_layers=spec)


# ------------------------------------------------------------------------------------------
# Accumulation
# ------------------------------------------------------------------------------------------


def test_accumulation_statistics_by_hand():
    a = accumulation(t([[1, 2, 7], [0, 0, 0]]), [0])
    # c = [1, 2, 7], sum 10
    assert a.max_share == pytest.approx(0.7)
    assert a.max_over_mean == pytest.approx(7 / (10 / 3))  # 2.1
    h = -(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.7 * math.log(0.7))
    assert a.entropy == pytest.approx(h)
    assert a.normalized_entropy == pytest.approx(h / math.log(3))
    assert a.concentration == pytest.approx(1 - h / math.log(3))
    assert a.top_indices == (2,)
    assert a.top_is_position0 is False
    assert a.total == pytest.approx(10.0)
    assert a.column.tolist() == [1.0, 2.0, 7.0]


def test_accumulation_sums_only_chosen_layers():
    cols = t([[1, 2, 7], [3, 0, 0], [9, 0, 0]])
    a = accumulation(cols, [0, 1])  # c = [4, 2, 7], sum 13
    assert a.column.tolist() == [4.0, 2.0, 7.0]
    assert a.max_share == pytest.approx(7 / 13)
    b = accumulation(cols, [2])  # c = [9, 0, 0]
    assert b.max_share == pytest.approx(1.0)
    assert b.entropy == pytest.approx(0.0)
    assert b.normalized_entropy == pytest.approx(0.0)
    assert b.max_over_mean == pytest.approx(3.0)
    assert b.top_indices == (0,)
    assert b.top_is_position0 is True


def test_accumulation_even_spread():
    a = accumulation(t([[1, 1, 1, 1]]), [0])
    assert a.max_share == pytest.approx(0.25)
    assert a.max_over_mean == pytest.approx(1.0)
    assert a.entropy == pytest.approx(math.log(4))
    assert a.normalized_entropy == pytest.approx(1.0)


def test_accumulation_ties_go_to_lower_position():
    assert accumulation(t([[2, 5, 5, 1]]), [0], top_k=2).top_indices == (1, 2)
    assert accumulation(t([[1, 5, 2, 5]]), [0], top_k=3).top_indices == (1, 3, 2)
    assert accumulation(t([[3, 1, 3]]), [0]).top_indices == (0,)
    assert accumulation(t([[5, 5, 5]]), [0], top_k=3).top_indices == (0, 1, 2)


def test_sink_exclude():
    a = accumulation(t([[10, 1, 3]]), [0], sink="exclude", top_k=2)
    # counted: positions 1, 2 -> [1, 3], sum 4
    assert a.max_share == pytest.approx(0.75)
    assert a.max_over_mean == pytest.approx(1.5)
    assert a.top_indices == (2, 1)  # original positions
    assert a.top_is_position0 is False
    assert a.column.tolist() == [10.0, 1.0, 3.0]
    assert a.scores.tolist() == [0.0, 1.0, 3.0]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert a.normalized_entropy == pytest.approx(h / math.log(2))
    # ties among the remaining columns still go to the lower original position
    assert accumulation(t([[9, 4, 4]]), [0], sink="exclude").top_indices == (1,)
    with pytest.raises(InputError, match=r"top_k=3 but only 2 soft positions are counted"):
        accumulation(t([[10, 1, 3]]), [0], sink="exclude", top_k=3)


def test_sink_normalize():
    a = accumulation(t([[10, 1, 3]]), [0], sink="normalize", sink_scale=5.0)
    # s = [2, 1, 3], sum 6
    assert a.scores.tolist() == [2.0, 1.0, 3.0]
    assert a.max_share == pytest.approx(0.5)
    assert a.top_indices == (2,)
    b = accumulation(t([[10, 1, 3]]), [0], sink="normalize", sink_scale=2.0)
    # s = [5, 1, 3], sum 9: position 0 still exceeds its usual sink level
    assert b.max_share == pytest.approx(5 / 9)
    assert b.top_indices == (0,)
    assert b.top_is_position0 is True
    with pytest.raises(InputError, match="sink_scale > 0"):
        accumulation(t([[10, 1, 3]]), [0], sink="normalize")


def test_accumulation_input_errors():
    with pytest.raises(InputError, match="delivered no flow"):
        accumulation(t([[0, 0, 0], [1, 1, 1]]), [0])
    with pytest.raises(InputError, match="negative values"):
        accumulation(t([[1, -1, 0]]), [0])
    with pytest.raises(InputError, match="NaN or inf"):
        accumulation(t([[1, float("nan"), 0]]), [0])
    with pytest.raises(InputError, match=r"layers \[2\] are outside 0..1"):
        accumulation(t([[1, 2], [3, 4]]), [2])
    with pytest.raises(InputError, match="repeat"):
        accumulation(t([[1, 2], [3, 4]]), [1, 1])
    with pytest.raises(InputError, match="2-D"):
        D.accumulation(t([1, 2, 7]), [0])  # unwrapped: our own message, not jaxtyping's


def test_fit_sink_scale_median():
    ins = [make_inputs(c, [1.0, 1.0]) for c in ([6, 1, 3], [4, 2, 2], [10, 1, 1])]
    # ratios c0 / mean(c1..): 6/2 = 3, 4/2 = 2, 10/1 = 10 -> median 3
    assert fit_sink_scale(ins, DetectorConfig()) == pytest.approx(3.0)
    with pytest.raises(InputError, match="no inputs"):
        fit_sink_scale([], None)


# ------------------------------------------------------------------------------------------
# Deep flow
# ------------------------------------------------------------------------------------------


def test_deep_flow_by_hand_and_layer_mean():
    rows = t([[1, 1, 1, 2, 3, 0], [3, 3, 3, 0, 0, 9]])
    a = deep_flow(rows, [0])  # f = rows[0]; beta = 1; r2 = [2, 3, 0] -> {3, 4}
    assert a.beta == pytest.approx(1.0)
    assert a.n_first == 3 and a.n_second == 3
    assert a.affected.tolist() == [False, False, False, True, True, False]
    assert a.n_affected == 2
    assert a.affected_share == pytest.approx(2 / 3)
    b = deep_flow(rows, [0, 1])  # f = [2, 2, 2, 1, 1.5, 4.5]; beta = 2 -> {5}
    assert b.f.tolist() == [2.0, 2.0, 2.0, 1.0, 1.5, 4.5]
    assert b.affected.tolist() == [False] * 5 + [True]
    assert b.affected_share == pytest.approx(1 / 3)
    assert b.defined is True


def test_deep_flow_odd_length_middle_token_goes_to_second_half():
    # n = 5: r1 = tokens 0, 1 (beta = (1 + 3) / 2 = 2); r2 = tokens 2, 3, 4 = [2, 2.5, 0]
    # 2 > 2 is false (strict), 2.5 > 2 true -> 1 of 3. (A ceil split would give 1 of 2.)
    s = deep_flow(t([[1, 3, 2, 2.5, 0]]), [0])
    assert s.n_first == 2 and s.n_second == 3
    assert s.beta == pytest.approx(2.0)
    assert s.affected.tolist() == [False, False, False, True, False]
    assert s.affected_share == pytest.approx(1 / 3)


def test_deep_flow_fixed_beta():
    s = deep_flow(t([[5, 5, 0.4, 0.6]]), [0], beta_mode="fixed", beta_value=0.5)
    assert s.beta == 0.5
    assert s.affected.tolist() == [False, False, False, True]
    assert s.affected_share == pytest.approx(0.5)
    with pytest.raises(InputError, match="needs a finite beta_value"):
        deep_flow(t([[1, 2]]), [0], beta_mode="fixed")


def test_deep_flow_short_rationales():
    one = deep_flow(t([[0.9]]), [0])
    assert one.defined is False and one.beta is None
    assert one.affected_share == 0.0 and one.n_affected == 0
    assert "at least 2 tokens" in one.note
    empty = deep_flow(torch.zeros(1, 0), [0])
    assert empty.defined is False and "empty rationale" in empty.note
    # fixed beta judges a single token: r1 empty, r2 = [0.9]
    fixed = deep_flow(t([[0.9]]), [0], beta_mode="fixed", beta_value=0.1)
    assert fixed.defined is True and fixed.affected_share == 1.0
    two = deep_flow(t([[1, 2]]), [0])  # beta = 1, r2 = [2]
    assert two.affected_share == 1.0


# ------------------------------------------------------------------------------------------
# Dynamic trigger
# ------------------------------------------------------------------------------------------


def test_trigger_share_equal_to_R_does_not_fire():
    # deep f = [1, 1, 2, 0]: beta 1, r2 = [2, 0] -> share exactly 0.5
    x = make_inputs([1, 2, 7], [1, 1, 2, 0])
    d = dynamic_trigger(x, DetectorConfig(R=0.5))
    assert d.deep_flow.affected_share == 0.5
    assert d.fired is False and d.flow_triggered is False
    assert d.reason.startswith("not fired") and "<= R=0.5" in d.reason
    assert d.corrupt_indices == ()
    d2 = dynamic_trigger(x, DetectorConfig(R=0.49))
    assert d2.fired is True
    assert d2.reason.startswith("fired: 1/2 second-half rationale tokens")
    assert d2.corrupt_indices == (2,)


def test_trigger_uses_default_layer_sets_and_records_them():
    x = make_inputs([1, 2, 7], [1, 1, 2, 0])
    d = dynamic_trigger(x, DetectorConfig(R=0.0))
    assert d.shallow_layers == (1,) and d.deep_layers == (3,)
    # decoy layers would make column 0 the top and every rationale token affected
    assert d.accumulation.top_indices == (2,)
    assert d.accumulation.max_share == pytest.approx(0.7)
    assert d.deep_flow.f.tolist() == pytest.approx([0.1, 0.1, 0.2, 0.0])
    assert d.deep_flow.beta == pytest.approx(0.1)
    assert d.statistic == "normalized"


def test_trigger_statistic_selects_tensors():
    # raw: deep f = [1, 1, 5, 5] -> share 1.0 (fires); normalised: [0.5, 0.5, 0.1, 0.1] -> 0.0
    x = make_inputs([1, 2, 7], [1, 1, 5, 5], norm_cols=[5, 1, 1], norm_rows=[0.5, 0.5, 0.1, 0.1])
    raw = dynamic_trigger(x, DetectorConfig(statistic="raw"))
    norm = dynamic_trigger(x, DetectorConfig(statistic="normalized"))
    assert raw.fired is True and raw.accumulation.top_indices == (2,)
    assert norm.fired is False and norm.accumulation.top_indices == (0,)
    assert norm.accumulation.max_share == pytest.approx(5 / 7)
    assert dynamic_trigger(x).statistic == "normalized"  # the default


def test_require_accumulation_gates_the_trigger():
    x = make_inputs([1, 2, 7], [1, 1, 5, 5])  # max_share 0.7, max/mean 2.1, flow share 1.0
    base = dict(require_accumulation=True)
    d = dynamic_trigger(x, DetectorConfig(**base, accumulation_threshold=2.5))
    assert d.flow_triggered is True and d.accumulation_present is False and d.fired is False
    assert "max_over_mean=2.1 < 2.5" in d.reason and "require_accumulation=True" in d.reason
    d = dynamic_trigger(x, DetectorConfig(**base, accumulation_threshold=2.0))
    assert d.fired is True and "max_over_mean=2.1 >= 2" in d.reason
    # threshold on max share: 0.7 >= 0.7 present, 0.71 not
    ms = dict(base, accumulation_measure="max_share")
    assert dynamic_trigger(x, DetectorConfig(**ms, accumulation_threshold=0.7)).fired is True
    assert dynamic_trigger(x, DetectorConfig(**ms, accumulation_threshold=0.71)).fired is False
    # without the gate the same instance fires even with no accumulation
    d = dynamic_trigger(x, DetectorConfig(accumulation_threshold=2.5))
    assert d.fired is True and d.accumulation_present is False


def test_trigger_concentration_measure():
    x = make_inputs([1, 1, 1, 1], [1, 1, 5, 5])  # even spread: concentration 0
    cfg = DetectorConfig(
        require_accumulation=True, accumulation_measure="concentration", accumulation_threshold=0.01
    )
    d = dynamic_trigger(x, cfg)
    assert d.accumulation_value == pytest.approx(0.0, abs=1e-12)
    assert d.fired is False


def test_trigger_short_rationale_never_fires():
    d = dynamic_trigger(make_inputs([1, 2, 7], [0.9]), DetectorConfig(R=0.0))
    assert d.fired is False and d.flow_triggered is False
    assert (
        d.reason
        == "not fired: rationale has 1 token; the first-half mean needs at least 2 tokens, "
        "the trigger cannot fire"
    )


def test_trigger_top_k_and_sink_from_config():
    x = make_inputs([9, 4, 6, 4], [1, 1, 5, 5])
    d = dynamic_trigger(x, DetectorConfig(top_k=3))
    assert d.accumulation.top_indices == (0, 2, 1)
    d = dynamic_trigger(x, DetectorConfig(top_k=2, sink="exclude"))
    assert d.corrupt_indices == (2, 1)
    d = dynamic_trigger(x, DetectorConfig(sink="normalize", sink_scale=3.0))  # s0 = 3
    assert d.accumulation.top_indices == (2,)


def test_to_dict_json_round_trip():
    x = make_inputs([1, 2, 7], [1, 1, 2, 0])
    d = dynamic_trigger(x, DetectorConfig(R=0.25, shallow_layers=(0.25, 0.5), deep_layers=[-1]))
    rec = d.to_dict()
    text = json.dumps(rec, allow_nan=False)
    back = json.loads(text)
    assert back == rec
    assert back["fired"] is True
    assert back["shallow_layers"] == [1] and back["deep_layers"] == [3]
    assert back["accumulation"]["top_indices"] == [2]
    assert back["accumulation"]["max_share"] == pytest.approx(0.7)
    assert back["deep_flow"]["affected_indices"] == [2]
    assert back["deep_flow"]["beta"] == pytest.approx(0.1)
    assert back["config"]["shallow_layers"] == [0.25, 0.5]
    again = TriggerDecision.from_dict(back)
    assert again.to_dict() == rec
    assert again.config == d.config
    assert again.deep_flow.affected.tolist() == [False, False, True, False]
    # an undefined deep flow (beta None) serialises too
    short = dynamic_trigger(make_inputs([1, 2, 7], [0.5]))
    assert json.loads(json.dumps(short.to_dict(), allow_nan=False))["deep_flow"]["beta"] is None


# ------------------------------------------------------------------------------------------
# Batch helpers
# ------------------------------------------------------------------------------------------


def _decisions():
    cfg = DetectorConfig(accumulation_measure="max_share", accumulation_threshold=0.5)
    specs = [
        ([1, 2, 7], [1, 1, 5, 5]),  # accum (0.7), change (share 1)
        ([6, 1, 1], [1, 1, 5, 5]),  # accum (0.75, top 0), change
        ([1, 1, 1], [1, 1, 5, 0]),  # no accum (1/3, tie -> top 0), no change (share 0.5)
        ([7, 2, 1], [1, 1, 0, 0]),  # accum (0.7, top 0), no change
        ([2, 3, 3], [2, 2, 9, 9]),  # no accum (0.375), change
    ]
    return [dynamic_trigger(make_inputs(c, r), cfg) for c, r in specs]


def test_sink_rate():
    # top is position 0 for the 2nd and 4th, and for the 3rd by the tie rule (even spread)
    assert sink_rate(_decisions()) == pytest.approx(3 / 5)
    with pytest.raises(InputError, match="got no decisions"):
        sink_rate([])


def test_contingency_counts():
    c = contingency(_decisions())
    assert c["accum_change"] == 2 and c["accum_no_change"] == 1
    assert c["no_accum_change"] == 1 and c["no_accum_no_change"] == 1
    assert c["n"] == 5
    assert c["p_change_given_accum"] == pytest.approx(2 / 3)
    assert c["p_change_given_no_accum"] == pytest.approx(1 / 2)
    # raising the threshold to 0.72 keeps only the 0.75 instance as accumulated
    c = contingency(_decisions(), 0.72)
    assert (
        c["accum_change"],
        c["accum_no_change"],
        c["no_accum_change"],
        c["no_accum_no_change"],
    ) == (1, 0, 2, 2)
    # max/mean >= 2.2 (0.75 * 3 = 2.25 only) with another measure
    c = contingency(_decisions(), 2.2, "max_over_mean")
    assert c["accum_change"] == 1 and c["accum_no_change"] == 0
    c = contingency(_decisions(), 0.99)
    assert c["p_change_given_accum"] is None


def test_fires_at_thresholds():
    ds = _decisions()  # shares [1, 1, 0.5, 0, 1]; max shares [0.7, 0.75, 1/3, 0.7, 0.375]
    out = fires_at_thresholds(ds, [0.4, 0.5])
    assert out.shape == (2, 1, 5)
    assert out[0, 0].tolist() == [True, True, True, False, True]
    assert out[1, 0].tolist() == [True, True, False, False, True]
    assert out[1, 0].tolist() == [d.fired for d in ds]  # R = 0.5 is the config the decisions used
    gated = fires_at_thresholds(ds, [0.4], [0.5, 0.72])
    assert gated.shape == (1, 2, 5)
    assert gated[0, 0].tolist() == [True, True, False, False, False]
    assert gated[0, 1].tolist() == [False, True, False, False, False]
    short = dynamic_trigger(make_inputs([1, 2, 7], [0.5]))
    assert fires_at_thresholds([short], [0.0]).tolist() == [[[False]]]


# ------------------------------------------------------------------------------------------
# Config and inputs validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(statistic="Raw"),
            r"statistic='Raw' is not allowed; expected one of \('raw', 'normalized'\)",
        ),
        (dict(beta_mode="median"), "beta_mode='median' is not allowed"),
        (dict(beta_mode="fixed"), "beta_mode='fixed' needs beta_value"),
        (dict(beta_mode="fixed", beta_value=-1.0), "must be >= 0"),
        (dict(beta_value=0.3), "only used with beta_mode='fixed'"),
        (dict(R=1.5), r"R=1.5 must be in \[0, 1\]"),
        (dict(R=float("nan")), "must be a finite number"),
        (dict(sink="drop"), "sink='drop' is not allowed"),
        (dict(sink="normalize"), "fit_sink_scale"),
        (dict(sink="normalize", sink_scale=0.0), "sink_scale=0.0 must be > 0"),
        (dict(sink_scale=2.0), "only used with sink='normalize'"),
        (dict(top_k=0), "top_k=0 must be an int >= 1"),
        (dict(top_k=1.0), "must be an int"),
        (dict(require_accumulation="yes"), "must be True or False"),
        (dict(accumulation_measure="gini"), "accumulation_measure='gini' is not allowed"),
        (dict(accumulation_threshold=0.5), "max_over_mean is always >= 1"),
        (
            dict(accumulation_measure="max_share", accumulation_threshold=2.0),
            r"must be in \(0, 1\]",
        ),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DetectorConfig(**kwargs)


def test_config_is_frozen_hashable_and_round_trips():
    cfg = DetectorConfig(shallow_layers=[1, 2], deep_layers=(0.5, 1.0))
    assert cfg.shallow_layers == (1, 2)  # lists stored as tuples
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.R = 0.1  # type: ignore[misc]
    back = DetectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.deep_layers == (0.5, 1.0)
    with pytest.raises(ConfigError, match=r"DetectorConfig has an unknown key 'r'; its keys are"):
        DetectorConfig.from_dict({"r": 0.5})
    with pytest.raises(ConfigError, match=r"unknown key 'beta_mod' \(did you mean 'beta_mode'\?\)"):
        DetectorConfig.from_dict({"beta_mod": "fixed"})
    defaults = DetectorConfig()
    assert (defaults.statistic, defaults.R, defaults.top_k, defaults.sink) == (
        "normalized",
        0.5,
        1,
        "keep",
    )


def test_config_layers_out_of_range_for_model():
    x = make_inputs([1, 2, 7], [1, 1, 2, 0])  # 4 layers
    with pytest.raises(
        ConfigError, match="^deep_layers: layer index 7 is out of range for a 4-layer"
    ):
        dynamic_trigger(x, DetectorConfig(deep_layers=[7]))
    one_layer = DetectorInputs(t([[1, 2]]), t([[1, 2]]), t([[0.1, 0.2]]), t([[0.1, 0.2]]))
    with pytest.raises(ConfigError, match="^shallow_layers: the layer set 'shallow' excludes"):
        dynamic_trigger(one_layer)
    assert dynamic_trigger(one_layer, DetectorConfig(shallow_layers=[0])).deep_layers == (0,)


def test_inputs_validation():
    ok = torch.rand(4, 3)
    rows = torch.rand(4, 5)
    with pytest.raises(InputError, match="both must cover every model layer"):
        DetectorInputs(ok, ok, torch.rand(3, 5), torch.rand(3, 5))
    with pytest.raises(InputError, match="soft_columns_norm has"):
        DetectorInputs(ok, torch.rand(4, 2), rows, rows)
    with pytest.raises(InputError, match="did you pass the raw rows"):
        DetectorInputs(ok, ok, rows, rows + 2.0)
    with pytest.raises(InputError, match="negative values"):
        DetectorInputs(-ok - 0.1, ok, rows, rows)
    with pytest.raises(InputError, match="floating-point"):
        DetectorInputs(torch.ones(4, 3, dtype=torch.long), ok, rows, rows)
    with pytest.raises(InputError, match=r"must be 2-D \[layer rat\]"):
        DetectorInputs(ok, ok, torch.rand(5), rows)
    x = DetectorInputs(ok, ok, rows, rows)
    assert (x.n_layers, x.n_soft, x.n_rationale) == (4, 3, 5)
    y = DetectorInputs.from_tensors(x.to_tensors())
    assert torch.equal(y.rationale_rows, rows)
    with pytest.raises(InputError, match="lack"):
        DetectorInputs.from_tensors({"soft_columns": ok})
