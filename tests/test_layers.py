"""The one layer grammar (dpc_lens.layers): DPC, IAP and the saliency engine resolve every spec
to the same layers, and the rule itself is pinned on hand-worked cases."""

from __future__ import annotations

import itertools

import pytest

from dpc_lens.dpc.detector import DetectorConfig
from dpc_lens.dpc.detector import resolve_layers as dpc_resolve
from dpc_lens.errors import ConfigError
from dpc_lens.iap import FLOW_PR, FLOW_QP, FLOW_QR, IAPConfig
from dpc_lens.iap import resolve_layers as iap_resolve
from dpc_lens.layers import resolve_layers
from dpc_lens.saliency import SaliencyConfig

SPECS = [
    "shallow", "deep",
    (0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0), (0.0, 0.25), (0.5, 1.0), (0.75, 1.0), (0.0, 0.5),
    (0.28, 0.56), (0.0, 1.0), (0.1, 0.2),
    (0,), (0, 1), (-1,), (-1, 0), (1, 2, 3), (2, -2),
]


def _outcome(fn, spec, n):
    try:
        return tuple(fn(spec, n))
    except ConfigError:
        return "ConfigError"


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5, 6, 12, 24, 25, 32, 40])
def test_dpc_and_iap_resolve_every_spec_to_the_same_layers(n_layers):
    for spec in SPECS:
        via_dpc_config = _outcome(lambda s, n: dpc_resolve(DetectorConfig(deep_layers=s).deep_layers, n),
                                  spec, n_layers)
        via_iap_config = _outcome(lambda s, n: IAPConfig(qr_layers=s).layers(n)[FLOW_QR], spec, n_layers)
        via_saliency = _outcome(lambda s, n: SaliencyConfig(layers=s).resolved_layers(n), spec, n_layers)
        outcomes = {_outcome(dpc_resolve, spec, n_layers), _outcome(iap_resolve, spec, n_layers),
                    via_dpc_config, via_iap_config, via_saliency}
        assert len(outcomes) == 1, (spec, n_layers, outcomes)


def test_the_rule_by_hand():
    # fraction pair (a, b): the layers l with a <= l / n < b
    assert resolve_layers((2 / 3, 1.0), 32) == list(range(22, 32))  # "the last third" of 32
    assert resolve_layers((0.0, 1 / 3), 32) == list(range(0, 11))
    assert resolve_layers((2 / 3, 1.0), 12) == [8, 9, 10, 11]
    # adjacent thirds partition the layers: no gap, no overlap
    for n in range(3, 41):
        parts = [resolve_layers(p, n) for p in ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0))]
        assert sorted(itertools.chain(*parts)) == list(range(n))
    # names: shallow drops layer 0; both fall back to one layer on tiny models
    assert resolve_layers("shallow", 32) == list(range(1, 11))
    assert resolve_layers("deep", 32) == list(range(22, 32))
    assert resolve_layers("deep", 2) == [1] and resolve_layers("shallow", 2) == [1]
    # negative indices count from the end, in both methods
    assert IAPConfig(qp_layers=(-1,)).layers(4)[FLOW_QP] == (3,)
    assert IAPConfig().layers(32) == {FLOW_QP: tuple(range(0, 11)), FLOW_QR: tuple(range(22, 32)),
                                      FLOW_PR: tuple(range(22, 32))}


@pytest.mark.parametrize("spec, n, message", [
    ((0.3, 0.45), 4, r"selects no layer of a 4-layer model"),
    ((4,), 4, r"layer index 4 is out of range for a 4-layer model"),
    ((3, -1), 4, r"layer 3 appears twice"),
    ("middle", 4, r"'middle' is not a layer-set name"),
    ((0, 0.5, 1), 4, r"mixes floats"),
])
def test_one_error_class_and_message_for_both_methods(spec, n, message):
    for fn in (dpc_resolve, iap_resolve, lambda s, k: IAPConfig(qr_layers=s).layers(k)):
        with pytest.raises(ConfigError, match=message):
            fn(spec, n)
