"""Shared fixtures: tiny offline models, and the autouse check that no test leaks a hook."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from jaxtyping import install_import_hook

warnings.filterwarnings("ignore")

# Shapes in signatures are checked at run time for the pure-maths modules (STYLE item 8):
# jaxtyping + beartype wrap every annotated function of these modules when they are imported.
with install_import_hook(["dpc_lens.flows"], "beartype.beartype"):
    import dpc_lens.flows  # noqa: F401


def _live_models():
    from dpc_lens.model import ModelAdapter  # noqa: F401  (import check)

    out = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.nn.Module) and hasattr(obj, "hook_dict") and hasattr(obj, "cfg"):
                out.append(obj)
        except ReferenceError:
            continue
    return out


def _hook_counts(model) -> int:
    """Non-permanent hooks on the model's hook points (TransformerLens keeps a few permanent
    hooks of its own on some bridge architectures, e.g. OPT's MLP hook points)."""
    n = 0
    for hp in model.hook_dict.values():
        for handles in (getattr(hp, "fwd_hooks", []), getattr(hp, "bwd_hooks", [])):
            n += sum(1 for h in handles if not getattr(h, "is_permanent", False))
    return n


@pytest.fixture(autouse=True)
def no_leaked_hooks(request):
    """After every test, every TransformerLens model alive has no hook left on any hook point
    (besides the ones a test registered on purpose and marked with ``keeps_hooks``)."""
    yield
    if request.node.get_closest_marker("keeps_hooks"):
        return
    leaked = {type(m).__name__: _hook_counts(m) for m in _live_models() if _hook_counts(m)}
    assert not leaked, f"hooks left on models after the test: {leaked}"


@pytest.fixture(scope="session")
def tiny_llama():
    from dpc_lens.testing import boot_tiny

    return boot_tiny("llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from dpc_lens.testing import boot_tiny

    return boot_tiny("gpt2")


@pytest.fixture(scope="session")
def native_model():
    from dpc_lens.testing import boot_native

    return boot_native()
