"""Shape aliases shared by every module, in TransformerLens's axis words.

Signatures say ``Float[Tensor, "batch head_index query_pos key_pos"]`` and so on; the test suite
checks them at run time through jaxtyping's import hook for the pure-maths module
``dpc_lens.flows`` (see ``tests/conftest.py``); the detector tests wrap its functions likewise.
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["Bool", "Float", "Int", "Tensor"]
