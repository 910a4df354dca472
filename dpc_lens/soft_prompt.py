"""Soft prompts: P learned vectors prepended to the input embeddings, in PEFT's format.

A :class:`SoftPrompt` is immutable from the library's side: every operation (corruption,
casting, moving) returns a new object, so the caller's soft prompt is never changed.

PEFT prompt-tuning adapters (SPEC section 6) are a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` (older: ``adapter_model.bin``), holding one tensor under the key
``prompt_embeddings`` of shape ``[num_virtual_tokens * num_transformer_submodules, token_dim]``.
PEFT puts the soft prompt first, before BOS, with a mask of ones and default positions; that is
exactly how :class:`dpc_lens.segments.PromptBatch` builds unpadded inputs, so a bridge fed a
PEFT adapter through dpc_lens gives PEFT's logits and greedy tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ._typing import Float, Tensor
from .errors import DataError, InputError

__all__ = ["SoftPrompt"]

_CONFIG = "adapter_config.json"
_SAFETENSORS = "adapter_model.safetensors"
_BIN = "adapter_model.bin"
_KEY = "prompt_embeddings"


@dataclass(frozen=True, eq=False)
class SoftPrompt:
    """``P x d_model`` soft-prompt embeddings plus the PEFT config they came with.

    Attributes:
        embeddings: the ``[n_tokens, d_model]`` tensor (never modified in place by dpc_lens).
        config: the PEFT ``adapter_config.json`` fields (kept for saving back).
    """

    embeddings: Float[Tensor, "soft d_model"]
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        e = self.embeddings
        if not isinstance(e, torch.Tensor) or e.dim() != 2:
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise InputError(
                f"A soft prompt is a 2-D tensor [n_tokens, d_model]; got {shape}. "
                "Reshape it, e.g. embeddings.view(n_tokens, d_model)."
            )
        if not e.is_floating_point():
            raise InputError(f"Soft-prompt embeddings must be floating point, got {e.dtype}.")
        if e.shape[0] == 0:
            raise InputError("A soft prompt needs at least one token (got 0 rows).")
        if not torch.isfinite(e).all():
            bad = (~torch.isfinite(e)).any(dim=1).nonzero().flatten().tolist()
            raise InputError(
                f"The soft prompt contains NaN or infinite values (rows {bad[:10]}). "
                "Check the training run that produced it, or re-initialise those rows."
            )

    # -------------------------------------------------------------- facts
    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return self.n_tokens

    # ------------------------------------------------------- new objects
    def with_embeddings(self, embeddings: Tensor) -> "SoftPrompt":
        """A new soft prompt with other embeddings and the same config."""
        return SoftPrompt(embeddings, dict(self.config))

    def to(self, device=None, dtype=None) -> "SoftPrompt":
        """A copy on ``device`` and/or in ``dtype`` (checked: a device this machine lacks is an
        :class:`InputError`, as in :func:`~dpc_lens.load_model`)."""
        from .validate import check_device

        check_device(device)
        return self.with_embeddings(self.embeddings.detach().to(device=device, dtype=dtype))

    def clone(self) -> "SoftPrompt":
        return self.with_embeddings(self.embeddings.detach().clone())

    def for_model(self, adapter: Any) -> Float[Tensor, "soft d_model"]:
        """The embeddings checked against ``adapter`` and cast to its device and dtype.

        Raises :class:`InputError` when the width differs from ``d_model``.
        """
        if self.d_model != adapter.d_model:
            raise InputError(
                f"Soft prompt width {self.d_model} does not match the model's d_model "
                f"{adapter.d_model}. A soft prompt only fits the base model it was trained on; "
                "load the adapter trained for this model."
            )
        return self.embeddings.to(device=adapter.device, dtype=adapter.dtype)

    # ------------------------------------------------------- construction
    @classmethod
    def from_tokens(cls, adapter: Any, token_ids: Tensor | list[int]) -> "SoftPrompt":
        """Initialise from vocabulary embeddings (PEFT's ``TEXT``/vocab init)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise InputError("from_tokens needs at least one token id.")
        with torch.no_grad():
            emb = adapter.embed_tokens(ids[None])[0].detach().clone()
        return cls(emb, {"prompt_tuning_init": "TEXT"})

    @classmethod
    def from_text(cls, adapter: Any, text: str, n_tokens: int | None = None) -> "SoftPrompt":
        """Initialise from the embeddings of ``text``, repeated or cut to ``n_tokens`` (as PEFT)."""
        tok = adapter.tokenizer
        if tok is None:
            raise InputError("from_text needs a model with a tokenizer.")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"Text {text!r} tokenises to nothing; give a non-empty init text.")
        if n_tokens is not None:
            reps = -(-n_tokens // len(ids))
            ids = (ids * reps)[:n_tokens]
        sp = cls.from_tokens(adapter, ids)
        return SoftPrompt(sp.embeddings, {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": text})

    # ------------------------------------------------------------- PEFT io
    @classmethod
    def from_peft(cls, path: str | os.PathLike, *, device=None, dtype=None) -> "SoftPrompt":
        """Load a PEFT prompt-tuning adapter directory (safetensors, or the older ``.bin``).

        The ``.bin`` file is read with ``torch.load(weights_only=True)``, which refuses
        anything but tensors (no arbitrary pickle code runs).
        """
        from .validate import check_device

        check_device(device)  # before reading anything
        path = os.fspath(path)
        cfg_path = os.path.join(path, _CONFIG)
        if not os.path.isdir(path):
            raise DataError(
                f"Soft-prompt directory {path!r} does not exist. Pass a PEFT prompt-tuning "
                f"adapter directory containing {_CONFIG} and {_SAFETENSORS}."
            )
        if not os.path.isfile(cfg_path):
            raise DataError(f"{path!r} has no {_CONFIG}; it is not a PEFT adapter directory.")
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"{cfg_path}: not valid JSON ({exc}).") from exc
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "PROMPT_TUNING":
            raise DataError(
                f"{cfg_path}: peft_type is {config.get('peft_type')!r}; dpc_lens reads "
                "'PROMPT_TUNING' adapters only (prefix tuning and LoRA change other weights)."
            )
        st, bn = os.path.join(path, _SAFETENSORS), os.path.join(path, _BIN)
        if os.path.isfile(st):
            from safetensors.torch import load_file

            try:
                tensors = load_file(st)
            except Exception as exc:  # safetensors raises its own SafetensorError / OSError
                raise DataError(
                    f"{st} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
                    "truncated or not safetensors at all. Copy the adapter again from where it was "
                    "trained, or save it anew with SoftPrompt.save_peft(dir)."
                ) from None
        elif os.path.isfile(bn):
            tensors = _load_bin(bn)
        else:
            raise DataError(f"{path!r} has neither {_SAFETENSORS} nor {_BIN}.")
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise DataError(
                f"The adapter weights in {path!r} are a {type(tensors).__name__}, not a mapping of "
                f"names to tensors; expected {{{_KEY!r}: tensor [num_virtual_tokens, token_dim]}}. "
                "Save the adapter with SoftPrompt.save_peft(dir) or PEFT's save_pretrained."
            )
        if _KEY not in tensors:
            raise DataError(
                f"The adapter weights in {path!r} have no {_KEY!r} tensor (found {sorted(tensors)})."
            )
        emb = tensors[_KEY]
        n_virtual = config.get("num_virtual_tokens")
        n_sub = int(config.get("num_transformer_submodules") or 1)
        token_dim = config.get("token_dim")
        if n_sub != 1:
            raise DataError(
                f"{cfg_path}: num_transformer_submodules is {n_sub}; causal LMs use 1 "
                "(2 is for encoder-decoder models, which dpc_lens does not support)."
            )
        if emb.dim() != 2:
            raise DataError(f"{_KEY} must be 2-D [tokens, token_dim]; got {tuple(emb.shape)}.")
        if n_virtual is not None and emb.shape[0] != int(n_virtual) * n_sub:
            raise DataError(
                f"{_KEY} has {emb.shape[0]} rows but the config says num_virtual_tokens="
                f"{n_virtual} x num_transformer_submodules={n_sub}."
            )
        if token_dim is not None and emb.shape[1] != int(token_dim):
            raise DataError(
                f"{_KEY} has width {emb.shape[1]} but the config says token_dim={token_dim}."
            )
        emb = emb.to(device=device, dtype=dtype if dtype is not None else emb.dtype)
        return cls(emb, config)

    def save_peft(self, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> str:
        """Write a PEFT prompt-tuning adapter directory that PEFT itself loads.

        ``base_model_name_or_path`` (or the one the soft prompt was loaded with) is recorded as a
        portable name: a local directory becomes its hub id or model name
        (:func:`dpc_lens.checkpoints.portable_model_name`), so the adapter embeds no local path.
        """
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        config = {
            "task_type": "CAUSAL_LM",
            "peft_type": "PROMPT_TUNING",
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "num_virtual_tokens": self.n_tokens,
            "token_dim": self.d_model,
            "num_transformer_submodules": 1,
            "num_attention_heads": None,
            "num_layers": None,
            "modules_to_save": None,
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }
        keep = {k: v for k, v in self.config.items() if k in config and v is not None}
        config.update(keep)
        config.update(num_virtual_tokens=self.n_tokens, token_dim=self.d_model,
                      num_transformer_submodules=1, peft_type="PROMPT_TUNING", task_type="CAUSAL_LM")
        if base_model_name_or_path is not None:
            config["base_model_name_or_path"] = base_model_name_or_path
        from .checkpoints import portable_model_name

        # a hub id or model name, never this machine's absolute path (see portable_model_name)
        for key in ("base_model_name_or_path", "tokenizer_name_or_path"):
            config[key] = portable_model_name(config.get(key))
        if config.get("prompt_tuning_init") == "TEXT" and not config.get("tokenizer_name_or_path"):
            # PEFT refuses a TEXT init without a tokenizer path; the trained weights are what
            # load anyway, so record the init as RANDOM (PEFT's neutral value)
            config["prompt_tuning_init"] = "RANDOM"
        with open(os.path.join(path, _CONFIG), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
        save_file({_KEY: self.embeddings.detach().to("cpu").contiguous()}, os.path.join(path, _SAFETENSORS))
        return path


def _load_bin(path: str) -> Any:
    """``torch.load(weights_only=True)`` of an ``adapter_model.bin``, with errors that say what
    the file holds and how to convert it -- never to switch the protection off."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise DataError(
                f"{path} holds non-tensor Python objects, which dpc_lens refuses to unpickle (a "
                "pickle can run arbitrary code). If you trust the file, convert it once to "
                "safetensors in a separate step, e.g. load it in the program that wrote it and call "
                "safetensors.torch.save_file({'prompt_embeddings': tensor}, "
                "'adapter_model.safetensors'), then delete the .bin."
            ) from None
        raise DataError(
            f"{path} is not a readable PyTorch file ({type(exc).__name__}: {exc}); it is truncated "
            "or not a checkpoint. Copy the adapter again, or save it anew with "
            "SoftPrompt.save_peft(dir)."
        ) from None

