"""Soft-prompt corruption (DPC's Dynamic Corruption, SPEC section 3 step 5).

Two forms, which give the same logits:

* :func:`corrupt_soft_prompt` returns a *new* :class:`~dpc_lens.soft_prompt.SoftPrompt` with
  the chosen rows replaced (zero by default — positions are kept, the sequence length does not
  change), optionally followed by the Gamma% smallest-magnitude elimination on the remaining
  rows. The caller's soft prompt is never touched. Regenerate with the result.
* :func:`soft_row_hooks` is the hook-style form for any forward pass: a ``(hook_name, fn)``
  list on ``blocks.0.hook_resid_pre`` that swaps the chosen soft rows' embedding for the
  replacement, composable with the user's own hooks. The residual entering block 0 is the
  embedding (plus the positional embedding on absolute-position models), so the hook adds
  ``replacement - original`` at those positions: exactly what feeding the replacement vector
  as the embedding would give. (``hook_embed`` cannot be used: it does not fire for
  embedding input.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import hook_names
from ._typing import Float, Tensor
from .errors import ConfigError, InputError
from .soft_prompt import SoftPrompt

__all__ = ["CorruptionConfig", "corrupt_soft_prompt", "replacement_rows", "soft_row_hooks", "random_rows"]

Mode = Literal["zero", "mean", "scale"]


@dataclass(frozen=True)
class CorruptionConfig:
    """How chosen soft rows are corrupted.

    Attributes:
        mode: ``zero`` (the paper), ``mean`` (replace by the mean soft vector of the other rows)
            or ``scale`` (multiply by ``scale``).
        scale: the factor of ``scale`` mode (0 equals ``zero``).
        gamma: percent (0-100) of the smallest-magnitude entries of the *remaining* rows to zero
            as well (the ICLR submission's optional second step; it uses 10). 0 disables it.
    """

    mode: Mode = "zero"
    scale: float = 0.0
    gamma: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "mean", "scale"):
            raise ConfigError(f"Corruption mode must be 'zero', 'mean' or 'scale', got {self.mode!r}.")
        for name in ("scale", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"CorruptionConfig.{name} must be a number, got {v!r}.")
        if not 0.0 <= float(self.gamma) <= 100.0:
            raise ConfigError(f"gamma is a percentage in [0, 100], got {self.gamma}.")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scale": self.scale, "gamma": self.gamma}

    @classmethod
    def from_dict(cls, d: Any) -> "CorruptionConfig":
        from .validate import check_keys

        return cls(**check_keys(d, ["mode", "scale", "gamma"], "CorruptionConfig"))


def _check_rows(rows: Sequence[int], n: int) -> list[int]:
    out = []
    for r in rows:
        if not isinstance(r, int) and not (isinstance(r, torch.Tensor) and r.numel() == 1):
            raise InputError(f"Soft rows must be ints, got {r!r}.")
        r = int(r)
        if not -n <= r < n:
            raise InputError(f"Soft row {r} is out of range for a soft prompt of {n} tokens.")
        out.append(r % n)
    return sorted(set(out))


def replacement_rows(
    embeddings: Float[Tensor, "soft d_model"], rows: Sequence[int], config: CorruptionConfig
) -> Float[Tensor, "soft d_model"]:
    """A new ``[P, d_model]`` tensor with ``rows`` corrupted as ``config`` says (input untouched)."""
    P = embeddings.shape[0]
    idx = _check_rows(rows, P)
    out = embeddings.detach().clone()
    if idx:
        if config.mode == "zero":
            out[idx] = 0.0
        elif config.mode == "scale":
            out[idx] = out[idx] * config.scale
        else:
            keep = [i for i in range(P) if i not in idx]
            if not keep:
                raise InputError("mean mode needs at least one soft row left to average.")
            out[idx] = embeddings.detach()[keep].mean(0)
    if config.gamma > 0:
        keep = [i for i in range(P) if i not in idx]
        if keep:
            block = out[keep]
            n = int(round(block.numel() * config.gamma / 100.0))
            if n > 0:
                flat = block.abs().flatten()
                # ties broken by position so the count is exact
                order = torch.argsort(flat, stable=True)[:n]
                zeroed = block.flatten().clone()
                zeroed[order] = 0.0
                out[keep] = zeroed.view_as(block)
    return out


def corrupt_soft_prompt(soft: SoftPrompt, rows: Sequence[int],
                        config: CorruptionConfig | None = None) -> SoftPrompt:
    """A new soft prompt with ``rows`` corrupted (zeroed by default); ``soft`` is unchanged."""
    if not isinstance(soft, SoftPrompt):
        raise InputError(f"corrupt_soft_prompt expects a SoftPrompt, got {type(soft).__name__}.")
    from .validate import as_config

    cfg = as_config(config, CorruptionConfig)
    return soft.with_embeddings(replacement_rows(soft.embeddings, rows, cfg))


def random_rows(n_soft: int, k: int, generator: torch.Generator) -> list[int]:
    """``k`` distinct soft rows drawn uniformly (the random-corruption ablation)."""
    if not 0 < k <= n_soft:
        raise InputError(f"Cannot draw {k} of {n_soft} soft rows.")
    return sorted(torch.randperm(n_soft, generator=generator)[:k].tolist())


def soft_row_hooks(
    batch: Any,
    soft: SoftPrompt | Tensor,
    rows: Sequence[int] | Sequence[Sequence[int]],
    config: CorruptionConfig | None = None,
) -> list[tuple[str, Any]]:
    """Hooks that corrupt soft ``rows`` in any forward pass over ``batch``.

    ``batch`` is the :class:`~dpc_lens.segments.PromptBatch` being run (its layouts give each
    row's soft positions); ``rows`` is one list for every example or one list per example.
    Returns ``[(hook_name, fn)]`` for ``model.hooks(fwd_hooks=...)`` or ``run_with_hooks``.
    """
    from .validate import as_config

    cfg = as_config(config, CorruptionConfig)
    emb = soft.embeddings if isinstance(soft, SoftPrompt) else soft
    if batch.n_soft != emb.shape[0]:
        raise InputError(
            f"The batch has {batch.n_soft} soft positions but the soft prompt has {emb.shape[0]} rows.")
    per_example = rows and isinstance(rows[0], (list, tuple))
    row_lists = list(rows) if per_example else [list(rows)] * batch.batch_size
    if len(row_lists) != batch.batch_size:
        raise InputError(f"Give one row list per example ({batch.batch_size}), got {len(row_lists)}.")
    deltas = []
    for rl in row_lists:
        new = replacement_rows(emb, rl, cfg)
        deltas.append(new - emb.detach())
    starts = [lay.spans["soft"][0] for lay in batch.layouts]

    def fn(resid: Tensor, hook: Any) -> Tensor:
        resid = resid.clone()
        for b, (s, d) in enumerate(zip(starts, deltas)):
            resid[b, s:s + d.shape[0]] += d.to(resid.dtype).to(resid.device)
        return resid

    return [(hook_names.resid_pre(0), fn)]
