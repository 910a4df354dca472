"""Every TransformerLens hook name dpc_lens uses is built here, and checked here.

Both model families (``TransformerBridge`` and ``HookedTransformer``) share these names
(SPEC section 5). Names are validated against ``model.hook_dict`` before anything is
registered, so a typo fails early with the close matches instead of half-way through a list.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from .errors import HookError

__all__ = ["pattern", "resid_pre", "embed", "check_hook_names"]


def pattern(layer: int) -> str:
    """The post-softmax attention pattern of ``layer``: ``[batch, head_index, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def resid_pre(layer: int) -> str:
    """The residual stream entering block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def embed() -> str:
    """The token embedding hook (does not fire for embedding input: see SPEC section 5)."""
    return "hook_embed"


def check_hook_names(hook_dict: Mapping[str, object], names: Iterable[str]) -> None:
    """Raise :class:`HookError` for the first name not in ``hook_dict``, suggesting close ones."""
    for name in names:
        if name not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise HookError(
                f"Hook {name!r} does not exist on this model.{hint} "
                "Hook names come from model.hook_dict; build them with dpc_lens.hook_names."
            )
