"""Shared fixtures: tiny offline models, and the autouse check that no test leaks a hook.

The whole run is offline (set here, before anything imports ``huggingface_hub``, which reads the
variables once at import): no test waits on the network. Export ``HF_HUB_OFFLINE=0`` to override.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import functools  # noqa: E402
import weakref  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

# Shapes in signatures are checked at run time for the pure-maths modules (STYLE item 8):
# jaxtyping + beartype wrap every annotated function of these modules when they are imported.
with install_import_hook(["dpc_lens.flows"], "beartype.beartype"):
    import dpc_lens.flows  # noqa: F401

# ------------------------------------------------------------------ models the tests create
# Every TransformerLens model constructed during the run (by a fixture, a dpc_lens.testing
# builder, load_model or a test's own boot_*) is registered here at construction, weakly: the
# leak check walks these models only, not every live Python object (gc.get_objects() after each
# test cost ~200 s of a ~290 s run).
_MODELS: weakref.WeakSet = weakref.WeakSet()


def _track_instances(cls: type) -> None:
    if getattr(cls.__init__, "_dpc_lens_tracked", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _MODELS.add(self)

    __init__._dpc_lens_tracked = True
    cls.__init__ = __init__


def _model_classes() -> list[type]:
    from dpc_lens.model import _bridge_class, hooked_transformer_class

    return [c for c in (_bridge_class(), hooked_transformer_class()) if c is not None]


for _cls in _model_classes():
    _track_instances(_cls)


def _is_library_internal(fn) -> bool:
    """Hooks TransformerLens / transformers / torch wire into a model themselves (e.g. TL 4.3's
    lazily added layer-norm capture pre-hooks) are not a test's leak."""
    mod = getattr(fn, "__module__", None) or ""
    return mod.split(".")[0] in ("transformer_lens", "transformers", "torch", "accelerate", "peft")


def hooks_left(model) -> int:
    """Hooks a test or dpc_lens left on ``model``: TransformerLens hooks on hook points (except
    the permanent ones TL installs itself, e.g. 6 on OPT's MLP hook points), plus raw torch
    forward / pre / backward hooks on any of its modules that are not library internals."""
    n = 0
    lens_ids = set()
    for hp in model.hook_dict.values():
        for handles in (getattr(hp, "fwd_hooks", []), getattr(hp, "bwd_hooks", [])):
            for h in handles:
                lens_ids.add(getattr(getattr(h, "hook", None), "id", None))
                if not getattr(h, "is_permanent", False):
                    n += 1
    for module in model.modules():
        for table in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                      getattr(module, "_backward_pre_hooks", {})):
            for hid, fn in table.items():
                if hid in lens_ids or _is_library_internal(fn):
                    continue
                n += 1
    return n


def leaked_hooks() -> dict[str, int]:
    """``{model class: hooks left}`` over every tracked model still alive."""
    out: dict[str, int] = {}
    for m in list(_MODELS):
        k = hooks_left(m)
        if k:
            out[type(m).__name__] = out.get(type(m).__name__, 0) + k
    return out


@pytest.fixture(autouse=True)
def no_leaked_hooks(request):
    """After every test, no model the run created has a hook left on it (besides the ones a
    test registered on purpose and marked with ``keeps_hooks``)."""
    yield
    if request.node.get_closest_marker("keeps_hooks"):
        return
    leaked = leaked_hooks()
    assert not leaked, f"hooks left on models after the test: {leaked}"


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models on shared CPUs run several times faster on one thread (no oversubscription:
    two oversubscribed processes ran ~10x slower, not 2x). Restored after the run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_arith_bed(root, *, n_questions: int = 5, init_range: float | None = None,
                   soft_scale: float = 0.1):
    """A tiny Llama with the arith tokenizer (n_ctx 256), a 4-token PEFT adapter and
    ``n_questions`` arith test questions under ``root``: ``(root, model_dir, adapter, data)``.
    The offline test bed the CLI, bad-input and run-safety tests run on."""
    import transformers as tf

    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks.arith import make_split
    from dpc_lens.tasks.io import write_jsonl
    from dpc_lens.testbed.reasoner import build_tokenizer

    model_dir = root / "model"
    tok = build_tokenizer()
    tok.save_pretrained(model_dir)
    extra = {} if init_range is None else {"initializer_range": init_range}
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    adapter = root / "adapter"
    SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * soft_scale).save_peft(adapter)
    data = root / "test.jsonl"
    write_jsonl(data, make_split("test", n_questions, seed=3))
    return root, model_dir, adapter, data


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
