"""The shipped test bed, build time only: where its artefacts are, and the model notebooks use.

The artefacts live in ``dpc_lens/data/`` (kept at the package root: the wheel's package data and
the real test bed's ``dpc_lens/data/real/`` stay where they were):

* ``reasoner/`` -- a small Llama-architecture model with its word-level tokenizer, trained by
  :mod:`dpc_lens.testbed.reasoner` (``python -m dpc_lens.testbed.reasoner``);
* ``soft_prompt/``, ``dev.jsonl``, ``test.jsonl``, ``dpc_config.json`` -- built by
  :mod:`dpc_lens.testbed.build` (``python -m dpc_lens.testbed``);
* ``dpc-lens demo`` runs on them (:mod:`dpc_lens.testbed.demo`);
* the real test bed (SmolLM2-135M-Instruct with a tuned soft prompt, ``dpc_lens/data/real/``)
  is built by :mod:`dpc_lens.testbed.real` (``python -m dpc_lens.testbed.real build``).

Nothing here is imported by the library core: the test bed sits on top of it.
"""

from __future__ import annotations

import os

__all__ = ["data_dir", "shipped_artefacts", "shipped_path", "print_paths", "default_model"]


def data_dir() -> str:
    """The package's shipped-data directory (``dpc_lens/data``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def shipped_artefacts() -> dict[str, str] | None:
    """Paths of the shipped model, adapter, test/dev sets and config, or None if incomplete."""
    d = data_dir()
    paths = {
        "model": os.path.join(d, "reasoner"),
        "soft_prompt": os.path.join(d, "soft_prompt"),
        "test": os.path.join(d, "test.jsonl"),
        "dev": os.path.join(d, "dev.jsonl"),
        "config": os.path.join(d, "dpc_config.json"),
    }
    needed = ("model", "soft_prompt", "test")
    if all(os.path.exists(paths[k]) for k in needed):
        return paths
    return None


def shipped_path(value: str | None, key: str) -> str | None:
    """``'testbed'`` -> the shipped file for ``key`` (a :func:`shipped_artefacts` key); anything
    else unchanged. The command line's ``--model testbed``, ``--data testbed``, ..."""
    if value != "testbed":
        return value
    art = shipped_artefacts()
    if art is None or not os.path.exists(art[key]):
        from ..errors import DataError

        raise DataError(f"'testbed' names the shipped {key}, but it is not in this install "
                        "(dpc_lens/data). Reinstall dpc_lens, or pass a path.")
    return art[key]


def print_paths() -> int:
    """Print where the shipped test bed's files are (``dpc-lens paths``); 1 when absent."""
    art = shipped_artefacts()
    if art is None:
        print("The shipped test bed is not in this install (dpc_lens/data).")
        return 1
    for k in ("model", "soft_prompt", "config", "test", "dev"):
        print(f"{k:<12} {art[k]}")
    print("Each can be named 'testbed' instead: --model testbed --soft-prompt testbed "
          "--config testbed --data testbed (test set; dev set for calibrate) --task arith")
    return 0


def default_model(*, with_soft_prompt: bool = True, seed: int = 0):
    """``(model, soft_prompt)`` for notebooks and examples, chosen in this order:

    1. ``$DPC_LENS_MODEL`` (and ``$DPC_LENS_SOFT_PROMPT``, a PEFT adapter directory), a user's
       real checkpoint;
    2. the shipped reasoner and its soft prompt (:func:`shipped_artefacts`);
    3. a tiny random 4-layer Llama (:func:`dpc_lens.testing.boot_tiny`).

    Without a matching adapter (a user model with no ``$DPC_LENS_SOFT_PROMPT``, or the tiny
    model) the soft prompt is 8 vocabulary embeddings drawn with ``seed``. ``soft_prompt`` is
    ``None`` when ``with_soft_prompt`` is false.
    """
    import torch

    from ..model import as_adapter, load_model
    from ..soft_prompt import SoftPrompt

    user_model = os.environ.get("DPC_LENS_MODEL")
    user_soft = os.environ.get("DPC_LENS_SOFT_PROMPT")
    shipped = shipped_artefacts()
    if user_model:
        model = load_model(user_model)
    elif shipped:
        model = load_model(shipped["model"])
    else:
        from ..testing import boot_tiny

        model = boot_tiny("llama", n_layers=4)
    if not with_soft_prompt:
        return model, None
    if user_soft:
        return model, SoftPrompt.from_peft(user_soft)
    if shipped and not user_model:
        return model, SoftPrompt.from_peft(shipped["soft_prompt"])
    adapter = as_adapter(model)
    vocab = adapter.embedding_weight.shape[0]
    ids = torch.randint(4, vocab, (8,), generator=torch.Generator().manual_seed(seed))
    return model, SoftPrompt.from_tokens(adapter, ids)
