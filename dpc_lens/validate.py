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

__all__ = ["as_config", "check_device", "cli_device_words", "check_count", "check_keys", "is_int", "is_real"]


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


def as_config(value: Any, cls: type, name: str = "config", *, extra_keys: Sequence[str] = ()) -> Any:
    """``value`` as a ``cls`` config: ``None`` gives the defaults, an instance is kept, a dict
    goes through ``cls.from_dict`` after its keys are checked against the fields (an unknown key
    gets a "did you mean"); anything else is a :class:`ConfigError` naming what is accepted.

    ``extra_keys``: keys a saved file may carry besides the fields (e.g. ``kind``, ``version``).
    """
    import dataclasses

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    known = [f.name for f in dataclasses.fields(cls)] + list(extra_keys)
    if isinstance(value, Mapping):
        check_keys(value, known, f"{name} (a dict for {cls.__name__})")
        return cls.from_dict(dict(value))
    raise ConfigError(
        f"{name} must be a {cls.__name__} or a dict of its fields (read through "
        f"{cls.__name__}.from_dict), got {type(value).__name__}. For example {name}="
        f"{cls.__name__}() or {name}={{{known[0]!r}: ...}}."
    )


def is_int(x: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is not a layer index or a count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_device(device: Any, *, name: str = "device") -> Any:
    """``device`` if this machine has it; else an :class:`InputError` saying what exists.

    The one device check of dpc_lens (:func:`~dpc_lens.load_model`, ``SoftPrompt.to``,
    ``SoftPrompt.from_peft``, the CLI's ``--device``). Messages speak Python
    (``device='cuda'``); the CLI rewrites them to its ``--device cuda``. ``name`` is the
    argument's name as the caller spells it.
    """
    if device is None:
        return None
    shown = f"{name}={device!r}" if not isinstance(device, torch.device) else f"{name}={str(device)!r}"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InputError(
            f"{name}={device!r} is a {type(device).__name__}, not a device. Expected a string "
            f"such as {name}='cpu', {name}='cuda', {name}='cuda:0' or {name}='mps' (or a "
            "torch.device)."
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"{shown} is not a device name. Expected cpu, cuda, cuda:N or mps, e.g. {name}='cpu'."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{shown} asks for CUDA but this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}, cuda build: {torch.version.cuda}). Use {name}='cpu', or "
                f"leave {name} out (None) to pick CUDA only when present."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"{shown}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}). Pick one of them."
            )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"{shown}: MPS is not available here. Use {name}='cpu'.")
    return device


def cli_device_words(message: str) -> str:
    """A library message rewritten for the command line: ``device='cuda:0'`` becomes
    ``--device cuda:0`` and "leave device out (None)" becomes "leave --device out"."""
    import re

    message = re.sub(r"\bdevice=(['\"])(.*?)\1", r"--device \2", message)
    return message.replace("leave device out (None)", "leave --device out")


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
