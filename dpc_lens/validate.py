"""Checks of user-given values that several modules share (devices, counts).

Every check raises a dpc_lens error whose message names the option as the command line spells
it, what was expected, and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import ConfigError, DpcLensError, InputError

__all__ = ["check_device", "check_count", "check_keys", "is_int", "is_real"]


def check_keys(d: Any, known: Sequence[str], what: str, *, required: Sequence[str] = (),
               error: type[DpcLensError] = ConfigError) -> Mapping[str, Any]:
    """``d`` if it is a mapping whose keys are all in ``known`` and hold every ``required`` one;
    else ``error`` naming the unknown key (with a "did you mean") or the missing one."""
    if not isinstance(d, Mapping):
        raise error(f"{what} is a {type(d).__name__}; expected a JSON object (a dict) with keys "
                    f"{list(known)}.")
    for k in d:
        if k not in known:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"{what} has an unknown key {k!r}{hint}; its keys are {list(known)}.")
    missing = [k for k in required if k not in d]
    if missing:
        raise error(f"{what} lacks {missing}; a complete one has {list(known)}.")
    return d


def is_int(x: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is not a layer index or a count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_device(device: Any) -> Any:
    """``device`` if this machine has it; else an :class:`InputError` saying what exists."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(
            f"--device {device!r} is not a device name ({exc}). Expected cpu, cuda, cuda:N or mps."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device} asks for CUDA but this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}, cuda build: {torch.version.cuda}). Use --device cpu, or "
                "leave --device out to pick CUDA only when present."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}). Pick one of them."
            )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"--device {device}: MPS is not available here. Use --device cpu.")
    return device


def check_count(value: Any, flag: str, *, minimum: int = 1, allow_none: bool = True) -> Any:
    """``value`` when it is an int >= ``minimum`` (or ``None`` when allowed), else an error.

    Zero and negative counts never silently mean "all" or "the default"."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(
            f"{flag} {value!r} is not allowed: expected a whole number >= {minimum}. "
            f"Leave {flag} out to use the default, or give a positive count."
        )
    return value
