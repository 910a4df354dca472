"""Progress bars: one rule for when they show, used by every loop and by model loading.

``progress=None`` (the default of every dpc_lens function that loops) shows bars only when a
person can see them: stderr is a terminal, or the code runs in a Jupyter kernel. Logs of batch
jobs, CI and ``nohup`` runs are then not flooded with hundreds of carriage-return updates.
``progress=True`` forces the bars on, ``progress=False`` turns them off. transformers' own bars
("Loading weights", downloads, the GGUF dequantisation bar) follow the same switch through
:func:`hf_progress`, so ``load_model(..., progress=False)`` prints nothing either.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import InputError

__all__ = ["progress_on", "bar", "hf_progress"]


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    ip = get() if callable(get) else None
    return type(ip).__name__ == "ZMQInteractiveShell"


def progress_on(progress: bool | None) -> bool:
    """Whether bars show: ``progress`` when it is ``True`` or ``False``; for ``None``, when
    stderr is a terminal or the code runs in a Jupyter notebook."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        try:
            tty = bool(isatty()) if callable(isatty) else False
        except (ValueError, OSError):  # a closed or detached stream
            tty = False
        return tty or _in_notebook()
    if not isinstance(progress, (bool, int)):
        raise InputError(f"progress={progress!r} is not allowed: expected True (bars on), False "
                         "(off) or None (on only when stderr is a terminal).")
    return bool(progress)


def bar(iterable: Iterable[Any] | None = None, *, progress: bool | None, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar over ``iterable`` (or a manual one with ``total=``), shown by the rule
    of :func:`progress_on`; ``kwargs`` go to tqdm (``desc``, ``total``, ``leave`` ...)."""
    from tqdm.auto import tqdm

    kwargs["disable"] = bool(kwargs.get("disable", False)) or not progress_on(progress)
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' own progress bars (loading, saving, and the per-tensor GGUF
    dequantisation bar, which uses plain tqdm and ignores transformers' switch) on or off for the
    block, then restore the previous setting."""
    import functools

    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers
        gguf_utils = None
    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        if plain_tqdm is not None:
            gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        yield
    finally:
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
        if was_disabled:
            hf_logging.disable_progress_bar()
        else:
            hf_logging.enable_progress_bar()
