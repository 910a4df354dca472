"""The exceptions dpc_lens raises.

One base class, :class:`DpcLensError`, so callers can catch everything the library raises on
purpose, and a few subclasses for the kind of mistake. Messages always say what was wrong, what
was expected, and how to fix it. Subclasses of ``ValueError`` stay catchable as ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "DpcLensError",
    "ConfigError",
    "InputError",
    "DataError",
    "ModelError",
    "HookError",
    "SaliencyError",
    "RunError",
    "DpcLensWarning",
]


class DpcLensError(Exception):
    """Base class of every error dpc_lens raises on purpose."""


class ConfigError(DpcLensError, ValueError):
    """A config field has a value outside what it accepts."""


class InputError(DpcLensError, ValueError):
    """A tensor, soft prompt, segment layout or argument does not fit the model or the call."""


class DataError(DpcLensError, ValueError):
    """A data file is missing or malformed (the message names the file, line and field)."""


class ModelError(DpcLensError):
    """A model cannot be loaded or lacks what dpc_lens needs (attention patterns, hooks)."""


class HookError(DpcLensError):
    """A hook name does not exist on the model, or a hook did not deliver what it should."""


class SaliencyError(DpcLensError):
    """The saliency pass could not produce a result (a layer delivered no gradient, bad loss)."""


class RunError(InputError):
    """An output directory cannot take this run: it is locked by another run, not writable, or
    holds another command's results (the message names the holder or the path and the fix)."""


class DpcLensWarning(UserWarning):
    """A result that is well defined but probably not what was meant (a flow that causality
    forbids, text that tokenizes to unknown tokens only)."""
