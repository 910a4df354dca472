"""The autouse leak guard of conftest.py really fails a test that leaves a hook behind.

The guard tracks the models a run creates (registered at construction) instead of walking every
live object; these tests prove it still sees what it must: a hook left through TransformerLens,
a raw torch hook left on any submodule, on a model built inside the test and on a session model.
"""

from __future__ import annotations

import gc

from conftest import hooks_left, leaked_hooks

from dpc_lens.testing import boot_tiny


def _noop(*args, **kwargs):
    return None


def test_a_lens_hook_left_on_a_model_built_in_the_test_is_reported():
    model = boot_tiny("llama", n_layers=1)
    assert hooks_left(model) == 0
    model.blocks[0].attn.hook_pattern.add_hook(_noop)
    try:
        assert hooks_left(model) == 1
        assert leaked_hooks().get(type(model).__name__, 0) >= 1
    finally:
        model.reset_hooks()
    assert hooks_left(model) == 0
    assert leaked_hooks() == {}


def test_a_raw_torch_hook_on_a_submodule_and_a_backward_lens_hook_are_reported(tiny_gpt2):
    handle = tiny_gpt2.blocks[0].attn.register_forward_pre_hook(_noop)
    try:
        assert hooks_left(tiny_gpt2) == 1
        tiny_gpt2.blocks[0].attn.hook_pattern.add_hook(_noop, dir="bwd")
        assert hooks_left(tiny_gpt2) == 2
    finally:
        handle.remove()
        tiny_gpt2.reset_hooks()
    assert leaked_hooks() == {}


def test_a_model_that_was_freed_is_no_longer_checked():
    model = boot_tiny("llama", n_layers=1)
    model.blocks[0].attn.hook_pattern.add_hook(_noop)
    assert leaked_hooks()
    del model
    gc.collect()
    assert leaked_hooks() == {}
