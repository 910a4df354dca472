"""Models larger than one device: load_model(..., device_map=...) through accelerate.

On CPU the split that can run is layers on "cpu" and layers offloaded to "disk" (accelerate
reads them back layer by layer): saliency and generation must equal the single-device model
exactly. A GPU check with layers over two devices is benchmarks/check_multidevice.py.
"""

from __future__ import annotations

import pytest
import torch

from dpc_lens.errors import InputError, ModelError
from dpc_lens.generation import GenerationConfig, generate
from dpc_lens.model import load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import save_tiny_hf_model

PIECES = [[("question", "ann has 3 apples"), ("rationale", " bob gives 2 more . how many")],
          [("question", "the cat"), ("rationale", " has 3 pens and 2 books")]]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = save_tiny_hf_model("llama", tmp_path_factory.mktemp("m"), seed=2, n_layers=4)
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
          "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
          "model.rotary_emb": "cpu", "lm_head": "cpu"}
    one = load_model(d, device="cpu")
    two = load_model(d, device_map=dm, offload_folder=str(tmp_path_factory.mktemp("offload")))
    return d, one, two


def test_layers_really_are_offloaded(split):
    _, _, two = split
    hf = two.original_model
    assert hf.hf_device_map["model.layers.3"] == "disk"
    assert any(p.device.type == "meta" for p in hf.model.layers[3].parameters())


def test_saliency_equals_the_single_device_model(split):
    _, one, two = split
    g = torch.Generator().manual_seed(0)
    soft = SoftPrompt(torch.randn(3, one.cfg.d_model, generator=g) * 0.3)
    cfg = SaliencyConfig(keep_full=True, column_targets=("rationale",), row_sources=("question",))
    for memory in ("normal", "lean"):
        a = compute_saliency(one, PromptBatch.from_pieces(one, PIECES, soft), cfg)
        b = compute_saliency(two, PromptBatch.from_pieces(two, PIECES, soft),
                             SaliencyConfig(**{**cfg.to_dict(), "memory": memory}))
        torch.testing.assert_close(b.full, a.full, rtol=0, atol=0)
        torch.testing.assert_close(b.column_sums, a.column_sums, rtol=0, atol=0)
        assert a.full.abs().sum() > 0


def test_generation_equals_the_single_device_model(split):
    _, one, two = split
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    ids = [[5, 6, 7, 8], [9, 10]]
    assert generate(two, ids, None, cfg, progress=False) == generate(one, ids, None, cfg, progress=False)


def test_device_and_device_map_are_exclusive(split):
    with pytest.raises(InputError, match="either device='cpu' or device_map"):
        load_model(split[0], device="cpu", device_map="auto")


def test_disk_offload_without_a_folder_is_a_clear_error(split):
    with pytest.raises(InputError, match="offload_folder"):
        load_model(split[0], device_map={"": "disk"})


def test_device_map_needs_the_bridge(split):
    with pytest.raises(ModelError, match="family='bridge'"):
        load_model(split[0], device_map="auto", family="hooked")
