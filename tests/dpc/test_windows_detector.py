"""Sliding-window layers in the DPC detector, on hand-built inputs: the layer sets "global" and
"sliding" resolve from the inputs' own layer types, and the deep-flow means leave out the
(layer, token) pairs a window hides (expected values written out by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpc_lens.dpc import DetectorConfig, DetectorInputs, dynamic_trigger
from dpc_lens.dpc.detector import DeepFlowStats, deep_flow
from dpc_lens.errors import ConfigError, InputError
from dpc_lens.iap import IAPConfig

# 3 layers (0 and 2 sliding, window 5; 1 global), 2 soft tokens, 4 rationale tokens
ROWS = torch.tensor([[1.0, 2.0, 0.0, 0.0],
                     [3.0, 5.0, 7.0, 7.0],
                     [2.0, 4.0, 6.0, 0.0]], dtype=torch.float64)
VISIBLE = torch.tensor([[True, True, False, False],
                        [True, True, True, True],
                        [True, True, True, False]])
WINDOWS = torch.tensor([5, 0, 5])


def inputs(**kw):
    cols = torch.tensor([[1.0, 3.0], [2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    return DetectorInputs(cols, cols / 4, ROWS, ROWS / 10, **kw)


def test_deep_flow_means_over_the_layers_that_see_the_soft_prompt():
    d = deep_flow(ROWS, [0, 1, 2], visible=VISIBLE)
    # token 0: (1 + 3 + 2) / 3; token 1: (2 + 5 + 4) / 3; token 2: (7 + 6) / 2; token 3: 7 / 1
    assert d.f.tolist() == pytest.approx([2.0, 11 / 3, 6.5, 7.0])
    assert d.beta == pytest.approx((2.0 + 11 / 3) / 2)
    assert d.affected.tolist() == [False, False, True, True] and d.affected_share == 1.0
    # without the mask the zeros pull tokens 2 and 3 down to 13 / 3 and 7 / 3 (token 3 below beta)
    plain = deep_flow(ROWS, [0, 1, 2])
    assert plain.f.tolist() == pytest.approx([2.0, 11 / 3, 13 / 3, 7 / 3])
    assert plain.affected.tolist() == [False, False, True, False]


def test_a_token_no_chosen_layer_shows_the_soft_prompt_is_not_judged():
    d = deep_flow(ROWS, [0], visible=VISIBLE)  # layer 0 hides tokens 2 and 3 (all of r2)
    assert math.isnan(d.f[2]) and math.isnan(d.f[3])
    assert not d.defined and d.n_affected == 0 and d.n_second == 0
    assert "2 of 4 rationale tokens see the soft prompt in none of the deep layers [0]" in d.note
    d = deep_flow(ROWS, [2], visible=VISIBLE)  # layer 2 hides token 3 only: r2 = {2}
    assert d.n_judged == 1 and d.n_second == 1 and d.defined
    assert d.beta == pytest.approx(3.0) and d.affected.tolist() == [False, False, True, False]
    back = DeepFlowStats.from_dict(d.to_dict())  # NaN f survives JSON as null
    assert math.isnan(back.f[3]) and back.n_judged == 1 and back.n_second == 1


def test_global_and_sliding_resolve_from_the_inputs():
    x = inputs(layer_windows=WINDOWS, rationale_visible=VISIBLE)
    assert x.windows == (5, None, 5)
    dec = dynamic_trigger(x, DetectorConfig(shallow_layers="sliding", deep_layers="global",
                                            statistic="raw", R=0.1))
    assert dec.shallow_layers == (0, 2) and dec.deep_layers == (1,)
    assert dec.deep_flow.f.tolist() == pytest.approx([3.0, 5.0, 7.0, 7.0])
    with pytest.raises(ConfigError, match="deep_layers: the layer set 'global' needs the model's layer"):
        dynamic_trigger(inputs(), DetectorConfig(shallow_layers=[1], deep_layers="global"))


def test_new_fields_are_checked_and_round_trip(tmp_path):
    x = inputs(layer_windows=WINDOWS, rationale_visible=VISIBLE)
    save_file(x.to_tensors(), tmp_path / "x.safetensors")
    y = DetectorInputs.from_tensors(load_file(tmp_path / "x.safetensors"))
    assert torch.equal(y.layer_windows, WINDOWS) and torch.equal(y.rationale_visible, VISIBLE)
    with pytest.raises(InputError, match="rationale_visible has shape"):
        inputs(rationale_visible=VISIBLE[:, :3])
    with pytest.raises(InputError, match="layer_windows has 2 entries for 3 layers"):
        inputs(layer_windows=WINDOWS[:2])
    with pytest.raises(InputError, match="bool"):
        inputs(rationale_visible=VISIBLE.float())


def test_iap_layer_sets_take_the_names():
    cfg = IAPConfig(qp_layers="global", qr_layers="sliding", pr_layers=[0])
    assert cfg.layers(3, (5, None, 5)) == {"question->prompt": (1,), "question->rationale": (0, 2),
                                           "prompt->rationale": (0,)}
    with pytest.raises(ConfigError, match="needs the model's layer types"):
        cfg.layers(3)
