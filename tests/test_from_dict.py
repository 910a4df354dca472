"""Saved configs and layouts read back with a misspelt or missing key: a dpc_lens error that
names the key, the likely intended one and the keys there are, never a bare TypeError/KeyError."""

from __future__ import annotations

import pytest

from dpc_lens.dpc.calibration import DPCCalibration
from dpc_lens.errors import ConfigError, DataError
from dpc_lens.generation import GenerationConfig
from dpc_lens.saliency import SaliencyConfig
from dpc_lens.segments import SegmentLayout


def test_generation_config_typo():
    good = GenerationConfig(max_new_tokens=7).to_dict()
    assert GenerationConfig.from_dict(good) == GenerationConfig(max_new_tokens=7)
    with pytest.raises(ConfigError, match=r"unknown key 'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        GenerationConfig.from_dict({**good, "max_new_token": 5})


def test_saliency_config_typo():
    good = SaliencyConfig(per_head=True).to_dict()
    assert SaliencyConfig.from_dict(good) == SaliencyConfig(per_head=True)
    with pytest.raises(ConfigError, match=r"unknown key 'per_heads' \(did you mean 'per_head'\?\)"):
        SaliencyConfig.from_dict({"per_heads": True})


def test_segment_layout_missing_and_misspelt():
    lay = SegmentLayout({"question": (0, 3)}, 3)
    assert SegmentLayout.from_dict(lay.to_dict()) == lay
    with pytest.raises(DataError, match=r"lacks \['length'\]"):
        SegmentLayout.from_dict({"spans": {"question": [0, 3]}})
    with pytest.raises(DataError, match=r"'lenght' \(did you mean 'length'\?\)"):
        SegmentLayout.from_dict({"spans": {}, "lenght": 3})


def test_dpc_calibration_file_with_a_missing_key():
    with pytest.raises(DataError, match=r"calibration.json\) lacks \['config'"):
        DPCCalibration.from_dict({"points": []})
