"""Offline tiny models for tests, notebooks and benchmarks (no network, no downloaded weights).

* :func:`tiny_tokenizer` — a word-level Hugging Face tokenizer over a small fixed vocabulary
  (words used by the examples, digits split one by one, punctuation).
* :func:`save_tiny_hf_model` — a randomly initialised Hugging Face checkpoint of a given
  architecture (``gpt2``, ``llama`` with grouped-query attention, ``mistral``, ``opt``,
  ``qwen2``) saved with its tokenizer to a directory, so it boots through
  ``TransformerBridge.boot_transformers(dir)`` exactly like a user's checkpoint.
* :func:`boot_tiny` — that, booted; :func:`boot_native` — a TransformerLens-native bridge;
  :func:`hooked_tiny` — a ``HookedTransformer`` (TransformerLens < 4 only).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Literal

import torch

from .errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "tiny_tokenizer",
    "save_tiny_hf_model",
    "boot_tiny",
    "boot_native",
    "hooked_tiny",
]

ARCHITECTURES = ("gpt2", "llama", "mistral", "opt", "qwen2")
Arch = Literal["gpt2", "llama", "mistral", "opt", "qwen2"]

_WORDS = (
    "the a an is are was of to and in on for with how many what much has have had buys sells "
    "gives away more less left total each apples pens books cats dogs coins cards eggs boxes "
    "ann bob cat dan eve question answer rationale let's think step by so then now first "
    "next finally plus minus times equals we get it he she they take add subtract multiply "
    "logically just feel don't beautiful day quickly problem solve check careful"
).split()
_SYMBOLS = list("0123456789") + [".", ",", "?", "!", ":", "=", "+", "-", "*", "/", "(", ")", "'", "#"]
SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


def tiny_tokenizer(path: str | os.PathLike | None = None, extra_words: tuple[str, ...] = ()) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (digits split, lower-cased, left padding),
    saved to ``path`` (a new temporary directory by default) and loaded back from it."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = list(SPECIAL.values()) + _SYMBOLS + sorted(set(_WORDS) | set(extra_words))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[a-z']+|\d|[^\sa-z\d]"), behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
    ])
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
        padding_side="left",
    )
    # TransformerLens re-creates tokenizers from ``name_or_path``, which an in-memory tokenizer
    # lacks (SPEC section 5): save it and load it back from the directory.
    from transformers import AutoTokenizer

    d = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="dpc_lens_tok_")
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def _hf_config(arch: str, vocab_size: int, tok: Any, *, n_layers: int, d_model: int,
               n_heads: int, n_kv_heads: int, n_ctx: int) -> Any:
    import transformers as tf

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers,
                             n_head=n_heads, n_positions=n_ctx, **ids)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                            num_attention_heads=n_heads, ffn_dim=2 * d_model,
                            max_position_embeddings=n_ctx, word_embed_proj_dim=d_model, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv_heads, max_position_embeddings=n_ctx, **ids)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    raise ConfigError(f"Unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}.")


def save_tiny_hf_model(
    arch: Arch,
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    n_ctx: int = 128,
) -> str:
    """Save a random tiny checkpoint of ``arch`` with the tiny tokenizer; return the directory."""
    import transformers as tf

    if arch not in ARCHITECTURES:
        raise ConfigError(f"Unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}.")
    path = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix=f"dpc_lens_{arch}_")
    tok = tiny_tokenizer()
    cfg = _hf_config(arch, len(tok), tok, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, n_ctx=n_ctx)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def boot_tiny(arch: Arch = "llama", path: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """Save (if needed) and boot a tiny ``arch`` checkpoint as a frozen ``TransformerBridge``."""
    from .model import load_model

    if path is None or not os.path.isfile(os.path.join(os.fspath(path), "config.json")):
        path = save_tiny_hf_model(arch, path, **kwargs)
    return load_model(os.fspath(path), device="cpu")


def boot_native(*, seed: int = 0, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
                n_ctx: int = 128, positional: str = "standard") -> Any:
    """A TransformerLens-native random bridge with the tiny tokenizer, frozen, in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    tok = tiny_tokenizer()
    cfg = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
               d_mlp=2 * d_model, d_vocab=len(tok), n_ctx=n_ctx, act_fn="gelu",
               normalization_type="LN", positional_embedding_type=positional, seed=seed)
    model = TransformerBridge.boot_native(cfg, tokenizer=tok, device="cpu")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hooked_tiny(*, seed: int = 0, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
                n_ctx: int = 128, positional: str = "standard") -> Any:
    """A random ``HookedTransformer`` with the tiny tokenizer (TransformerLens < 4 only)."""
    from .model import hooked_transformer_class

    ht = hooked_transformer_class()
    if ht is None:
        raise ConfigError("HookedTransformer needs transformer-lens < 4 (it was removed in 4.0).")
    from transformer_lens import HookedTransformerConfig  # type: ignore[attr-defined]

    tok = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=2 * d_model, d_vocab=len(tok), n_ctx=n_ctx, act_fn="gelu",
        normalization_type="LN", positional_embedding_type=positional, seed=seed,
        default_prepend_bos=False,
    )
    model = ht(cfg, tokenizer=tok)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
