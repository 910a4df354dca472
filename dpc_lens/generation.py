"""Batched generation from ``[soft; prompt]`` embeddings on both TransformerLens families.

Soft prompts go into the input embedding tensor (``hook_embed`` does not fire for embedding
input, SPEC section 5). Rows are left-padded with the pads *before* the soft prompt and
positions taken from the mask (see :mod:`dpc_lens.segments`), so each row generates exactly
what it generates alone.

Decoding paths:

* ``TransformerBridge`` over a Hugging Face model: one prefill over the embeddings, then
  incremental steps with Hugging Face's own KV cache (explicit ``position_ids`` and the
  growing attention mask).
* ``HookedTransformer`` and models without a KV cache (the TransformerLens-native bridge):
  the whole sequence is re-run every step. HookedTransformer's ``generate(embeds)`` cache path
  returns wrong tokens for absolute-position models from the third new token on (SPEC section
  5); the full re-run is exact for every positional scheme.

Greedy by default; sampling (temperature, top-k) is seeded per call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from .errors import ConfigError, InputError
from .model import as_adapter
from .progress import bar
from .segments import PromptBatch, SegmentLayout

__all__ = ["GenerationConfig", "Generation", "generate", "encode_prompts", "token_texts",
           "TURN_END_TOKENS", "tokenizer_stop_ids"]

StopReason = Literal["eos", "stop_token", "stop_string", "max_new_tokens"]

#: Tokens that end a chat turn, by family: a tokenizer that has one as a special token stops
#: generation there (``stop_at_eos``): Gemma's ``<end_of_turn>``, ChatML's ``<|im_end|>``
#: (SmolLM2, Qwen), Llama 3's ``<|eot_id|>``, Phi-3's ``<|end|>``.
TURN_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def tokenizer_stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids a row stops at with ``stop_at_eos``: the tokenizer's EOS, then the
    :data:`TURN_END_TOKENS` it names as special tokens (in that order, no repeats)."""
    if tokenizer is None:
        return ()
    out: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        out.append(eos)
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    for t in TURN_END_TOKENS:
        if t in special or t in added:
            i = tokenizer.convert_tokens_to_ids(t)
            unk = getattr(tokenizer, "unk_token_id", None)
            if isinstance(i, int) and i != unk and i not in out:
                out.append(i)
    return tuple(out)


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    Attributes:
        max_new_tokens: at most this many new tokens per row.
        do_sample: sample instead of greedy argmax.
        temperature / top_k: sampling knobs (ignored when greedy).
        seed: seed of the sampling generator (``None``: unseeded).
        stop_at_eos: stop a row at the tokenizer's EOS and at the turn-end token it names
            (Gemma's ``<end_of_turn>``, SmolLM2's ``<|im_end|>``; :func:`tokenizer_stop_ids`);
            the stop token is not part of the output.
        stop_token_ids: more token ids that stop a row (not part of the output), whatever
            ``stop_at_eos`` says; reason ``"stop_token"``.
        stop_strings: stop a row once its decoded text contains one of these (the text is cut
            before it).
        batch_size: rows generated together.
        use_kv_cache: use the bridge's KV cache where available (results are identical).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = 0
    stop_at_eos: bool = True
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    batch_size: int = 16
    use_kv_cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}.")
        if self.temperature <= 0:
            raise ConfigError(
                f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy.")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 or None, got {self.top_k}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        ids = self.stop_token_ids
        ids = (ids,) if isinstance(ids, int) else ids
        if isinstance(ids, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"stop_token_ids must be token ids (ints >= 0), got {self.stop_token_ids!r}; "
                              "find one with tokenizer.convert_tokens_to_ids('<end_of_turn>').")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        else:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_strings"] = list(self.stop_strings)
        d["stop_token_ids"] = list(self.stop_token_ids)
        if not self.stop_token_ids:  # runs saved before the field existed resume unchanged
            del d["stop_token_ids"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        from .validate import check_keys

        d = dict(check_keys(d, [f.name for f in fields(cls)], "GenerationConfig"))
        d["stop_strings"] = tuple(d.get("stop_strings", ()))
        d["stop_token_ids"] = tuple(d.get("stop_token_ids", ()))
        return cls(**d)


@dataclass(frozen=True)
class Generation:
    """One generated continuation: its token ids (no EOS), text and why it stopped."""

    token_ids: tuple[int, ...]
    text: str
    stop_reason: StopReason
    #: whether the KV cache was used (decided by behaviour, see ModelAdapter.supports_kv_cache)
    kv_cache: bool = field(default=False, compare=False)


def encode_prompts(adapter: Any, prompts: Sequence[str | Sequence[int]], *,
                   add_bos: bool = False) -> list[list[int]]:
    """Token ids of each prompt (texts tokenised without special tokens; BOS prepended on request)."""
    tok = adapter.tokenizer
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise InputError("Text prompts need a model with a tokenizer; pass token ids instead.")
            ids = list(tok(p, add_special_tokens=False)["input_ids"])
        else:
            ids = [int(t) for t in p]
        if add_bos:
            bos = getattr(tok, "bos_token_id", None)
            if bos is None:
                raise InputError("add_bos=True but the tokenizer has no BOS token.")
            ids = [int(bos)] + ids
        out.append(ids)
    return out


def _pick(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def check_room(adapter: Any, max_new_tokens: int, fixed: int, what: str) -> None:
    """Refuse, before any model work, a run where no question can fit the model's context:
    ``fixed`` tokens every prompt has whatever the question (soft prompt, BOS, a prompt
    template's own tokens), plus at least one question token, plus ``max_new_tokens``. Without
    this, a too-large ``max_new_tokens`` skips every question and a run ends with ``n = 0``."""
    n_ctx = as_adapter(adapter).n_ctx
    need = fixed + 1 + int(max_new_tokens)
    if n_ctx is None or need <= n_ctx:
        return
    room = n_ctx - fixed - 1
    fix = (f"Lower max_new_tokens to at most {room} (GenerationConfig.max_new_tokens; "
           "--max-new-tokens on the command line)" if room >= 1 else
           "Use a shorter soft prompt or template, or a model with a longer context")
    raise ConfigError(
        f"No question can fit this model's context: n_ctx={n_ctx} tokens, but every {what} needs "
        f"{fixed} fixed token(s) + at least 1 question token + max_new_tokens={max_new_tokens} = "
        f"{need}. Nothing was run. {fix}."
    )


@torch.no_grad()
def _generate_batch(adapter: Any, seqs: list[list[int]], soft: Any, cfg: GenerationConfig,
                    gen: torch.Generator | None) -> list[Generation]:
    layouts = [SegmentLayout({"prompt": (0, len(s))}, len(s)) for s in seqs]
    batch = PromptBatch.build(adapter, seqs, layouts, soft)
    B = batch.batch_size
    n_ctx = adapter.n_ctx
    if n_ctx is not None and batch.seq_len + cfg.max_new_tokens > n_ctx:
        raise InputError(
            f"Prompt length {batch.seq_len} + max_new_tokens {cfg.max_new_tokens} exceeds the "
            f"model's context n_ctx={n_ctx}; lower max_new_tokens or shorten the prompt."
        )
    tok = adapter.tokenizer
    eos_ids = tokenizer_stop_ids(tok) if cfg.stop_at_eos else ()
    stops = {i: ("eos" if k == 0 and i == getattr(tok, "eos_token_id", None) else "stop_token")
             for k, i in enumerate(eos_ids)}
    stops.update({i: "stop_token" for i in cfg.stop_token_ids if i not in stops})
    pad = adapter.pad_token_id()
    embeds, mask, pos = batch.embeds, batch.attention_mask, batch.position_ids
    use_cache = cfg.use_kv_cache and adapter.supports_kv_cache
    with adapter.decoding_session(), adapter.kv_cache_session() if use_cache else contextlib.nullcontext():
        cache = None
        if use_cache:
            logits, cache = adapter.prefill(embeds, mask, pos)
        else:
            logits = adapter.forward_embeds(embeds, mask, pos)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        reason: list[StopReason] = ["max_new_tokens"] * B
        texts = [""] * B
        last_pos = pos[:, -1]
        for _step in range(cfg.max_new_tokens):
            nxt = _pick(logits[:, -1], cfg, gen)
            for b in range(B):
                if done[b]:
                    continue
                t = int(nxt[b])
                if t in stops:
                    done[b], reason[b] = True, stops[t]
                    continue
                out[b].append(t)
                if cfg.stop_strings and tok is not None:
                    text = tok.decode(out[b], skip_special_tokens=True)
                    hit = [text.find(s) for s in cfg.stop_strings if s in text]
                    if hit:
                        texts[b] = text[: min(hit)]
                        # keep only the tokens whose text lies before the stop string
                        while out[b] and len(tok.decode(out[b], skip_special_tokens=True)) > len(texts[b]):
                            out[b].pop()
                        done[b], reason[b] = True, "stop_string"
            if all(done) or _step == cfg.max_new_tokens - 1:
                break  # no forward pass whose logits nobody reads
            feed = torch.where(torch.tensor(done, device=nxt.device), torch.full_like(nxt, pad), nxt)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            last_pos = last_pos + 1
            if use_cache:
                logits, cache = adapter.forward_step(feed[:, None], mask, last_pos[:, None], cache)
            else:
                embeds = torch.cat([embeds, adapter.embed_tokens(feed[:, None])], dim=1)
                pos = torch.cat([pos, last_pos[:, None]], dim=1)
                logits = adapter.forward_embeds(embeds, mask, pos)
    results = []
    for b in range(B):
        if reason[b] != "stop_string":
            texts[b] = tok.decode(out[b], skip_special_tokens=True) if tok is not None else ""
        results.append(Generation(tuple(out[b]), texts[b], reason[b], kv_cache=use_cache))
    return results


def generate(
    model: Any,
    prompts: Sequence[str | Sequence[int]],
    soft_prompt: Any = None,
    config: GenerationConfig | None = None,
    *,
    add_bos: bool = False,
    progress: bool | None = None,
    desc: str = "generate",
) -> list[Generation]:
    """Generate a continuation for every prompt, with the soft prompt (if any) first.

    Args:
        model: a ``TransformerBridge``/``HookedTransformer`` or an adapter.
        prompts: texts (tokenised without special tokens) or token-id lists.
        soft_prompt: a :class:`~dpc_lens.soft_prompt.SoftPrompt`, a ``[P, d_model]`` tensor, a list
            with one of those per prompt (same length), or None.
        config: :class:`GenerationConfig` (greedy, 64 new tokens by default).
        add_bos: prepend the tokenizer's BOS to every prompt (after the soft prompt, as PEFT).
        progress: a tqdm bar over batches: ``True`` on, ``False`` off, ``None`` (default) on
            when stderr is a terminal (:func:`dpc_lens.progress.progress_on`).

    Returns one :class:`Generation` per prompt, in order.
    """
    from .validate import as_config

    cfg = as_config(config, GenerationConfig)
    adapter = as_adapter(model)
    if cfg.use_kv_cache and adapter.declares_kv_cache and not adapter.supports_kv_cache:
        warnings.warn(
            f"{type(adapter._hf_model).__name__}: cached decoding did not reproduce a full re-run, "
            "so every decoding step re-runs the whole sequence: "
            "the same tokens, slower. Each Generation records kv_cache=False.",
            RuntimeWarning, stacklevel=2,
        )
    seqs = encode_prompts(adapter, prompts, add_bos=add_bos)
    if isinstance(soft_prompt, (list, tuple)) and len(soft_prompt) != len(seqs):
        raise InputError(f"{len(soft_prompt)} soft prompts for {len(seqs)} prompts; give one per prompt.")
    gen = None
    if cfg.do_sample and cfg.seed is not None:
        gen = torch.Generator().manual_seed(int(cfg.seed))
    # Greedy rows are batched by length (stable sort, so little padding) and put back in input
    # order: each row generates exactly what it generates alone, so this changes no token.
    # Sampling keeps the input order, so a seed draws the same tokens as before.
    order = list(range(len(seqs)))
    if not cfg.do_sample:
        order.sort(key=lambda i: len(seqs[i]))
    per_row_soft = isinstance(soft_prompt, (list, tuple))
    results: list[Generation | None] = [None] * len(seqs)
    starts = range(0, len(seqs), cfg.batch_size)
    for s in bar(starts, progress=progress, desc=desc, disable=len(seqs) <= cfg.batch_size, leave=False):
        idx = order[s:s + cfg.batch_size]
        soft = [soft_prompt[i] for i in idx] if per_row_soft else soft_prompt
        for i, g in zip(idx, _generate_batch(adapter, [seqs[i] for i in idx], soft, cfg, gen)):
            results[i] = g
    return results  # type: ignore[return-value]


def token_texts(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """The text each token adds, in order: ``"".join(token_texts(tok, ids)) == tok.decode(ids)``
    (special tokens skipped, as :func:`generate` decodes). Decoded incrementally, so a byte-level
    BPE token that is half of a UTF-8 character, or a word-level tokenizer's joining space, lands
    on the token where the text actually grows (the token view of a rationale labels itself)."""
    ids = [int(t) for t in token_ids]
    if tokenizer is None:
        return [f"<{t}>" for t in ids]
    out, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        out.append(text[len(prev):] if text.startswith(prev) else text)
        prev = text
    return out
