"""Vanilla prompt tuning through dpc_lens's own soft-prompt path, and accuracy evaluation.

DPC (SPEC section 1) starts from a model with a *tuned* soft prompt: P learned vectors
prepended to the input embeddings of a frozen LLM (Lester et al., 2021). This module trains one
on a task's training split, so the whole pipeline runs on models and data the user has locally,
and the prompt it produces is a PEFT prompt-tuning adapter (:meth:`SoftPrompt.save_peft`).

Training goes through exactly the input path every other part of dpc_lens uses:
:class:`~dpc_lens.segments.PromptBatch` builds ``[pad][soft][<bos>][prompt][target]`` from
the ``[P, d_model]`` soft tensor (kept in the autograd graph), the adapter runs it with
``forward_embeds``, and the loss is :func:`~dpc_lens.saliency.target_nll`. A prompt tuned
here therefore sees the same positions, masks and layout at training, generation and saliency
time; an unpadded row is PEFT's own layout, so the adapter behaves identically in PEFT.

**Text layout and loss** (what :class:`PromptTuningConfig` controls), per example::

    [soft x P] [<bos>]  template.format(question=...)  target_template.format(...)  [<eos>]
               add_bos  ---------- no loss ----------  --------- loss (segment "rationale") ---

The prompt and target texts are tokenised separately without special tokens and concatenated,
which for the shipped reasoner is exactly :func:`dpc_lens.testbed.reasoner.encode_example`
(``<bos> question rationale <eos>``). With the defaults the target is the gold ``rationale``
(which ends with the answer sentence, e.g. ``"... The answer is 9."``) followed by EOS. The
loss is the teacher-forced negative log-likelihood of the target tokens (EOS included), averaged
over each example's target tokens and then over the examples of the batch (every example weighs
the same, whatever its length). No loss is put on the question: it is given, never generated.

The model is frozen while training: every weight has ``requires_grad=False`` and the model is
in eval mode (no dropout), so only the soft tensor (a float32 leaf, cast to the model's dtype
on the way in) receives a gradient; flags and mode are restored on exit, even after an
exception, and the weights are bit-identical afterwards. The optimiser is AdamW at a constant
learning rate with gradient-norm clipping; batches are drawn from a seeded shuffle, so the same
seed gives the same soft prompt. With a dev split the dev loss is measured every ``eval_every``
steps, the best prompt is kept and training stops after ``patience`` evaluations without
improvement.

Defaults are for the small models dpc_lens ships and tests with (16 tokens, lr 1e-2). The DPC
paper used 100 soft tokens and lr 1e-3 on 7-13B models (LLaMA2-13B, LLaMA3-8B, Mistral-7B).
"""

from __future__ import annotations

import json
import math
import os
import random
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from ._typing import Float, Tensor
from .errors import ConfigError, DataError, InputError
from .model import as_adapter, frozen_for_saliency
from .segments import PromptBatch, SegmentLayout, encode_pieces
from .soft_prompt import SoftPrompt

__all__ = [
    "PromptTuningConfig",
    "TrainRecord",
    "PromptTuningResult",
    "AccuracyResult",
    "initial_soft_prompt",
    "input_embedding_rms",
    "encode_training_example",
    "train_soft_prompt",
    "evaluate_accuracy",
    "TARGET_SEGMENT",
]

InitKind = Literal["vocab", "text", "random"]
TARGET_SEGMENT = "rationale"
"""The segment name of the loss tokens (target text + EOS) in every training layout."""

_FIELDS = ("question", "answer", "rationale")
_LOG = "prompt_tuning.json"


def _template_fields(template: str, name: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"{name}={template!r} is not a valid str.format template ({exc}); write fields as "
            "{question}, {answer} or {rationale} and double literal braces ({{ }})."
        ) from None
    used = {f for _, f, _, _ in parsed if f is not None}
    bad = sorted(used - set(_FIELDS))
    if bad or "" in used:
        raise ConfigError(
            f"{name}={template!r} uses fields {bad or ['{}']}; only {{question}}, {{answer}} and "
            "{rationale} are filled from each example."
        )
    return used


@dataclass(frozen=True)
class PromptTuningConfig:
    """How to tune a soft prompt (see the module docstring for the layout and the loss).

    Attributes:
        n_tokens: soft-prompt length P (DPC paper: 100 on 7-13B models).
        init: ``"vocab"`` — P rows of the embedding matrix drawn at random (seeded, special
            tokens excluded; PEFT's ``SAMPLE_VOCAB``); ``"text"`` — the embeddings of
            ``init_text`` repeated or cut to P tokens (PEFT's ``TEXT``); ``"random"`` — normal
            noise scaled to the root-mean-square of the model's input embeddings (the embedding
            layer's output, so Gemma's ``sqrt(d_model)`` scale is included). Every init lives
            at the scale the first layer sees: vocab and text rows go through the embedding
            layer itself.
        init_text: the text for ``init="text"`` (required there, refused otherwise).
        lr: AdamW learning rate, constant. 1e-2 suits the small models dpc_lens ships; the DPC
            paper used 1e-3 with 100 tokens on 7-13B models.
        weight_decay: AdamW weight decay on the soft prompt (0 keeps its scale free).
        steps: at most this many optimiser steps (fewer when early stopping fires).
        batch_size: examples per step (drawn without replacement from a seeded shuffle that is
            redrawn every epoch).
        eval_every: dev loss every this many steps (and after the last step).
        patience: stop after this many dev evaluations without improvement (``None``: never
            stop early). The best prompt by dev loss is returned either way.
        min_delta: an evaluation improves only when the dev loss drops by more than this.
        seed: seeds the initialisation and the batch order.
        max_grad_norm: clip the soft prompt's gradient norm to this (``None``: no clipping).
        add_bos: put the tokenizer's BOS after the soft prompt (as PEFT and the reasoner do).
        template: the prompt text, filled from the example (default ``"{question}"``).
        target_template: the loss text, filled from the example (default ``"{rationale}"``;
            ``"The answer is {answer}."`` trains on answers alone for data without rationales).
        add_eos: append the tokenizer's EOS to the target (it is part of the loss), so the tuned
            model learns to stop.
        dev_batch_size: examples per forward pass when measuring the dev loss.
    """

    n_tokens: int = 16
    init: InitKind = "vocab"
    init_text: str | None = None
    lr: float = 1e-2
    weight_decay: float = 0.0
    steps: int = 300
    batch_size: int = 16
    eval_every: int = 25
    patience: int | None = 4
    min_delta: float = 0.0
    seed: int = 0
    max_grad_norm: float | None = 1.0
    add_bos: bool = True
    template: str = "{question}"
    target_template: str = "{rationale}"
    add_eos: bool = True
    dev_batch_size: int = 32

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}.")

        for name in ("n_tokens", "steps", "batch_size", "eval_every", "dev_batch_size"):
            positive_int(name)
        if self.init not in ("vocab", "text", "random"):
            raise ConfigError(
                f"init must be 'vocab' (random vocabulary rows), 'text' (with init_text) or "
                f"'random' (scaled normal noise); got {self.init!r}."
            )
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ConfigError(
                "init='text' needs init_text, the text whose token embeddings start the prompt, "
                "e.g. init_text=\"Let's think step by step.\"."
            )
        if self.init != "text" and self.init_text is not None:
            raise ConfigError(
                f"init_text is only read with init='text' (init is {self.init!r}); set "
                "init='text' or drop init_text."
            )
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(
                f"lr must be a finite number > 0, got {self.lr!r}. Try 1e-2 on small models; "
                "the DPC paper used 1e-3 with 100 soft tokens on 7-13B models."
            )
        if not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if self.patience is not None:
            positive_int("patience")
        if not isinstance(self.min_delta, (int, float)) or not self.min_delta >= 0:
            raise ConfigError(f"min_delta must be >= 0, got {self.min_delta!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}.")
        if self.max_grad_norm is not None and not (
            isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0
        ):
            raise ConfigError(
                f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}."
            )
        for name in ("add_bos", "add_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if "question" not in _template_fields(self.template, "template"):
            raise ConfigError(
                f"template={self.template!r} never uses {{question}}; the prompt must show the "
                "question, e.g. '{question}' or 'Q: {question} A:'."
            )
        target = _template_fields(self.target_template, "target_template")
        if not target & {"rationale", "answer"}:
            raise ConfigError(
                f"target_template={self.target_template!r} uses neither {{rationale}} nor "
                "{answer}; the loss text must contain what the model should produce."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptTuningConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"Unknown PromptTuningConfig fields {unknown}; known fields are {sorted(known)}."
            )
        return cls(**dict(d))


@dataclass(frozen=True)
class TrainRecord:
    """One row of the training history.

    Attributes:
        step: optimiser steps done (0: the initial prompt, before any update).
        train_loss: mean loss of this step's batch (``None`` on the step-0 row).
        dev_loss: mean dev loss after this step (``None`` where the dev loss was not measured).
        seconds: wall-clock seconds since training started.
    """

    step: int
    train_loss: float | None
    dev_loss: float | None
    seconds: float


@dataclass(frozen=True, eq=False)
class PromptTuningResult:
    """A tuned soft prompt and how it was obtained.

    Attributes:
        soft_prompt: the best prompt (lowest dev loss; the last one without a dev split).
        config: the :class:`PromptTuningConfig` used.
        history: one :class:`TrainRecord` per step (plus step 0 when a dev split was given).
        best_step: the step ``soft_prompt`` comes from.
        best_dev_loss: its dev loss (``None`` without a dev split).
        stopped_early: whether patience ran out before ``config.steps``.
        n_train / n_dev: examples in the two splits.
        meta: free-form facts (model name, d_model, init details).
    """

    soft_prompt: SoftPrompt
    config: PromptTuningConfig
    history: tuple[TrainRecord, ...]
    best_step: int
    best_dev_loss: float | None
    stopped_early: bool
    n_train: int
    n_dev: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_done(self) -> int:
        return max((r.step for r in self.history), default=0)

    @property
    def seconds(self) -> float:
        return max((r.seconds for r in self.history), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the prompt's tensor, as JSON-ready values."""
        return {
            "config": self.config.to_dict(),
            "history": [asdict(r) for r in self.history],
            "best_step": self.best_step,
            "best_dev_loss": self.best_dev_loss,
            "stopped_early": self.stopped_early,
            "n_train": self.n_train,
            "n_dev": self.n_dev,
            "steps_done": self.steps_done,
            "seconds": self.seconds,
            "meta": self.meta,
        }

    def to_dataframe(self):
        """The history as a table: columns ``step, train_loss, dev_loss, seconds``."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.history],
                            columns=["step", "train_loss", "dev_loss", "seconds"])

    def save(self, path: str | os.PathLike) -> str:
        """Write :meth:`to_dict` (config, history, summary) as a JSON file at ``path``.

        The prompt itself is a tensor: write it with ``result.soft_prompt.save_peft(dir)``, or
        use :meth:`save_adapter` for both in one directory.
        """
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1)
        return path

    def save_adapter(self, path: str | os.PathLike, *,
                     base_model_name_or_path: str | None = None) -> str:
        """Write a PEFT adapter directory (loads in PEFT and :meth:`SoftPrompt.from_peft`) with
        ``prompt_tuning.json`` (:meth:`save`) beside it; :meth:`load` reads it back."""
        path = self.soft_prompt.save_peft(
            path, base_model_name_or_path=base_model_name_or_path
            or self.meta.get("base_model_name_or_path"))
        self.save(os.path.join(path, _LOG))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptTuningResult":
        """Read back a directory written by :meth:`save_adapter`."""
        path = os.fspath(path)
        log = os.path.join(path, _LOG)
        if not os.path.isfile(log):
            raise DataError(
                f"{path!r} has no {_LOG}; it is not a directory written by "
                "PromptTuningResult.save_adapter (a bare PEFT adapter loads with "
                "SoftPrompt.from_peft)."
            )
        with open(log, encoding="utf-8") as fh:
            d = json.load(fh)
        return cls(
            soft_prompt=SoftPrompt.from_peft(path),
            config=PromptTuningConfig.from_dict(d["config"]),
            history=tuple(TrainRecord(**r) for r in d["history"]),
            best_step=int(d["best_step"]),
            best_dev_loss=d["best_dev_loss"],
            stopped_early=bool(d["stopped_early"]),
            n_train=int(d["n_train"]),
            n_dev=int(d["n_dev"]),
            meta=dict(d.get("meta") or {}),
        )


# ---------------------------------------------------------------------------- initialisation
def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            ids.add(int(v))
    return ids


def _tokenizer_name(adapter: Any) -> str | None:
    name = getattr(adapter.tokenizer, "name_or_path", None)
    return str(name) if name else None


def initial_soft_prompt(model: Any, config: PromptTuningConfig) -> SoftPrompt:
    """The untrained prompt ``config.init`` describes (float32, on the model's device).

    The config carries PEFT's matching ``prompt_tuning_init`` (``SAMPLE_VOCAB``, ``TEXT`` or
    ``RANDOM``) so a saved adapter says how it started; ``TEXT`` also needs the tokenizer's
    path, which PEFT requires for that init, and falls back to ``RANDOM`` without one.
    """
    adapter = as_adapter(model)
    gen = torch.Generator().manual_seed(int(config.seed))
    P = config.n_tokens
    if config.init == "vocab":
        W = adapter.embedding_weight
        special = _special_ids(adapter.tokenizer) if adapter.tokenizer is not None else set()
        allowed = torch.tensor([i for i in range(W.shape[0]) if i not in special], dtype=torch.long)
        if allowed.numel() == 0:
            raise InputError("init='vocab' found no ordinary token in the vocabulary; use "
                             "init='random'.")
        ids = allowed[torch.randint(0, allowed.numel(), (P,), generator=gen)]
        emb = SoftPrompt.from_tokens(adapter, ids).embeddings
        cfg: dict[str, Any] = {"prompt_tuning_init": "SAMPLE_VOCAB"}
    elif config.init == "text":
        emb = SoftPrompt.from_text(adapter, config.init_text, n_tokens=P).embeddings
        tok_name = _tokenizer_name(adapter)
        cfg = ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": config.init_text,
                "tokenizer_name_or_path": tok_name} if tok_name
               else {"prompt_tuning_init": "RANDOM"})
    else:
        rms = input_embedding_rms(adapter)
        noise = torch.randn(P, adapter.d_model, generator=gen)
        emb = noise * rms.cpu()
        cfg = {"prompt_tuning_init": "RANDOM"}
    emb = emb.detach().to(device=adapter.device, dtype=torch.float32).clone()
    return SoftPrompt(emb, cfg)


def input_embedding_rms(model: Any, chunk: int = 8192) -> Tensor:
    """The root mean square of the model's *input* embeddings over the whole vocabulary: the
    embedding layer's own output (``embed_tokens``), so a model that scales its embeddings
    (Gemma: by ``sqrt(d_model)``, ~25x at d_model = 640) is measured at the scale its first
    layer sees, not at the raw matrix's. Computed in chunks of ``chunk`` rows (float64 sum)."""
    adapter = as_adapter(model)
    n = int(adapter.embedding_weight.shape[0])
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, chunk):
            ids = torch.arange(start, min(start + chunk, n))[None]
            total += adapter.embed_tokens(ids).double().pow(2).sum().cpu()
    return (total / (n * adapter.d_model)).sqrt().float()


# ------------------------------------------------------------------------------ tokenisation
def _fill_template(template: str, example: Any, name: str, index: int) -> str:
    values = {}
    for f in _FIELDS:
        v = getattr(example, f, None)
        if v is None and "{" + f + "}" in template:
            raise DataError(
                f"Example {index} (id {getattr(example, 'id', '?')!r}) has no {f}, but "
                f"{name}={template!r} needs it. Give examples with a {f}, or set {name} to a "
                "template they can fill (e.g. target_template='The answer is {answer}.')."
            )
        values[f] = "" if v is None else str(v)
    return template.format(**values)


def encode_training_example(
    model: Any, example: Any, config: PromptTuningConfig, *, index: int = 0
) -> tuple[list[int], SegmentLayout]:
    """Token ids and layout (``bos``, ``question``, ``rationale``) of one training example.

    ``rationale`` is the loss segment (:data:`TARGET_SEGMENT`): the target text and EOS.
    """
    adapter = as_adapter(model)
    tok = adapter.tokenizer
    if tok is None:
        raise InputError("Prompt tuning needs a model with a tokenizer.")
    pieces: list[tuple[str, Any]] = []
    if config.add_bos:
        if tok.bos_token_id is None:
            raise InputError("add_bos=True but the tokenizer has no BOS token; set add_bos=False.")
        pieces.append(("bos", [int(tok.bos_token_id)]))
    pieces.append(("question", _fill_template(config.template, example, "template", index)))
    target = list(tok(_fill_template(config.target_template, example, "target_template", index),
                      add_special_tokens=False)["input_ids"])
    if config.add_eos:
        if tok.eos_token_id is None:
            raise InputError("add_eos=True but the tokenizer has no EOS token; set add_eos=False.")
        target.append(int(tok.eos_token_id))
    if not target:
        raise DataError(
            f"Example {index} (id {getattr(example, 'id', '?')!r}) has an empty target, so it "
            "gives no loss; give it a rationale or set add_eos=True."
        )
    pieces.append((TARGET_SEGMENT, target))
    return encode_pieces(tok, pieces)


def _encode_all(adapter: Any, examples: Sequence[Any], config: PromptTuningConfig, what: str):
    encoded = [encode_training_example(adapter, ex, config, index=i) for i, ex in enumerate(examples)]
    n_ctx = adapter.n_ctx
    if n_ctx is not None and encoded:
        worst = max(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        total = len(encoded[worst][0]) + config.n_tokens
        if total > n_ctx:
            raise InputError(
                f"{what} example {worst} needs {total} positions ({config.n_tokens} soft + "
                f"{total - config.n_tokens} tokens) but the model's context is n_ctx={n_ctx}. "
                "Use fewer soft tokens or drop the longest examples."
            )
    return encoded


# ----------------------------------------------------------------------------------- training
def _batch_loss(adapter: Any, encoded: Sequence[tuple[list[int], SegmentLayout]],
                soft: Float[Tensor, "soft d_model"]) -> Float[Tensor, " batch"]:
    from .saliency import scored_positions, target_nll

    seqs = [ids for ids, _ in encoded]
    lays = [lay for _, lay in encoded]
    batch = PromptBatch.build(adapter, seqs, lays, soft)
    if adapter.keeps_logits_subset:  # unembed only where the loss reads (Gemma: 262,144 words)
        keep = scored_positions(batch, (TARGET_SEGMENT,))
        logits = adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids,
                                        logits_at=keep)
        return target_nll(logits, batch, (TARGET_SEGMENT,), positions=keep)
    logits = adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
    return target_nll(logits, batch, (TARGET_SEGMENT,))


def _dev_loss(adapter: Any, encoded, soft: Tensor, batch_size: int) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(encoded), batch_size):
            losses = _batch_loss(adapter, encoded[s:s + batch_size], soft)
            total += float(losses.sum())
            n += losses.numel()
    return total / n


def _batch_order(n: int, batch_size: int, rng: random.Random):
    """Endless batches of indices: a fresh seeded shuffle every epoch, no example twice in one
    batch (batches never straddle two epochs; a short last batch is kept)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, n, batch_size):
            yield order[s:s + batch_size]


def train_soft_prompt(
    model: Any,
    examples: Sequence[Any],
    config: PromptTuningConfig | None = None,
    *,
    dev_examples: Sequence[Any] | None = None,
    init: SoftPrompt | None = None,
    progress: bool | None = None,
    callback: Callable[[TrainRecord, SoftPrompt], bool | None] | None = None,
) -> PromptTuningResult:
    """Tune a soft prompt on ``examples`` with the model frozen (see the module docstring).

    Args:
        model: a ``TransformerBridge``/``HookedTransformer`` or an adapter. Its weights are
            never changed; ``requires_grad`` flags and train/eval mode are restored on return
            and on error.
        examples: :class:`~dpc_lens.tasks.Example` records (anything with ``question``,
            ``answer`` and ``rationale`` attributes).
        config: :class:`PromptTuningConfig` (defaults when ``None``).
        dev_examples: a dev split for early stopping and choosing the best prompt.
        init: start from this prompt instead of ``config.init`` (its length must equal
            ``config.n_tokens``).
        progress: a tqdm bar over steps (``None``: only when stderr is a terminal).
        callback: called after every step with the step's :class:`TrainRecord` and a detached
            copy of the current prompt; returning ``True`` stops training there. An exception
            it raises propagates (the model is restored first).

    Returns:
        :class:`PromptTuningResult` with the best prompt (float32, on the model's device).
        ``result.soft_prompt.save_peft(dir)`` writes the adapter, ``result.save(file)`` the
        history as JSON, ``result.save_adapter(dir)`` both.
    """
    from .progress import bar as progress_bar
    from .validate import as_config

    cfg = as_config(config, PromptTuningConfig)
    adapter = as_adapter(model)
    examples = list(examples)
    if not examples:
        raise InputError("train_soft_prompt needs at least one training example.")
    dev = list(dev_examples) if dev_examples is not None else []
    if dev_examples is not None and not dev:
        raise InputError("dev_examples is empty; pass None to train without a dev split.")
    train_enc = _encode_all(adapter, examples, cfg, "Training")
    dev_enc = _encode_all(adapter, dev, cfg, "Dev") if dev else []

    start = initial_soft_prompt(adapter, cfg) if init is None else init
    if start.n_tokens != cfg.n_tokens:
        raise InputError(
            f"init has {start.n_tokens} soft tokens but config.n_tokens is {cfg.n_tokens}; make "
            "them equal."
        )
    start.for_model(adapter)  # width check
    soft = start.embeddings.detach().to(device=adapter.device, dtype=torch.float32).clone()
    soft.requires_grad_(True)
    sp_config = dict(start.config)
    opt = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = _batch_order(len(train_enc), cfg.batch_size, random.Random(cfg.seed))

    def snapshot() -> SoftPrompt:
        return SoftPrompt(soft.detach().clone(), dict(sp_config))

    history: list[TrainRecord] = []
    best, best_step, best_loss = snapshot(), 0, None
    stale, stopped_early = 0, False
    t0 = time.perf_counter()
    with frozen_for_saliency(adapter.model):
        if dev_enc:
            best_loss = _dev_loss(adapter, dev_enc, soft, cfg.dev_batch_size)
            history.append(TrainRecord(0, None, best_loss, time.perf_counter() - t0))
        bar = progress_bar(range(1, cfg.steps + 1), progress=progress, desc="prompt tuning", leave=False)
        try:
            for step in bar:
                idx = next(batches)
                loss = _batch_loss(adapter, [train_enc[i] for i in idx], soft).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([soft], cfg.max_grad_norm)
                opt.step()
                train_loss = float(loss.detach())
                if not math.isfinite(train_loss):
                    raise InputError(
                        f"The training loss became {train_loss} at step {step}; lower lr "
                        f"(now {cfg.lr}) or set max_grad_norm."
                    )
                dev_loss = None
                if dev_enc and (step % cfg.eval_every == 0 or step == cfg.steps):
                    dev_loss = _dev_loss(adapter, dev_enc, soft, cfg.dev_batch_size)
                    if dev_loss < best_loss - cfg.min_delta:
                        best, best_step, best_loss, stale = snapshot(), step, dev_loss, 0
                    else:
                        stale += 1
                record = TrainRecord(step, train_loss, dev_loss, time.perf_counter() - t0)
                history.append(record)
                if not bar.disable:
                    post = {"loss": f"{train_loss:.4f}"}
                    if best_loss is not None:
                        post["best_dev"] = f"{best_loss:.4f}"
                    bar.set_postfix(post)
                stop = bool(callback(record, snapshot())) if callback is not None else False
                if cfg.patience is not None and dev_enc and stale >= cfg.patience:
                    stopped_early = True
                    stop = True
                if stop:
                    break
        finally:
            bar.close()
    if not dev_enc:
        best, best_step = snapshot(), history[-1].step if history else 0
    from .checkpoints import portable_model_name

    hf = getattr(adapter, "_hf_model", None) if adapter.family == "bridge" else None
    name = getattr(getattr(hf, "config", None), "_name_or_path", None) if hf is not None else None
    meta = {
        "d_model": adapter.d_model,
        "family": adapter.family,
        "base_model_name_or_path": portable_model_name(name) if name else None,
        "target_segment": TARGET_SEGMENT,
        "init": sp_config.get("prompt_tuning_init"),
    }
    return PromptTuningResult(
        soft_prompt=best,
        config=cfg,
        history=tuple(history),
        best_step=best_step,
        best_dev_loss=best_loss,
        stopped_early=stopped_early,
        n_train=len(examples),
        n_dev=len(dev),
        meta=meta,
    )


# ---------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class AccuracyResult:
    """Greedy (or configured) generation scored against gold answers.

    Attributes:
        accuracy: fraction correct (a missing answer counts as wrong).
        predictions: the extracted answer per example (``None`` when none was found).
        texts: the generated continuation per example.
        correct: per example, whether the prediction matches the gold answer.
        ids: the example ids, in order.
    """

    accuracy: float
    predictions: tuple[str | None, ...]
    texts: tuple[str, ...]
    correct: tuple[bool, ...]
    ids: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "predictions": list(self.predictions),
                "texts": list(self.texts), "correct": list(self.correct), "ids": list(self.ids)}

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"id": list(self.ids), "text": list(self.texts),
                             "prediction": list(self.predictions), "correct": list(self.correct)})


def evaluate_accuracy(
    model: Any,
    soft_prompt: SoftPrompt | Tensor | None,
    examples: Sequence[Any],
    task: Any,
    generation_config: Any = None,
    *,
    add_bos: bool = True,
    template: str = "{question}",
    progress: bool | None = None,
) -> AccuracyResult:
    """Generate an answer for every example (soft prompt first, if any) and score it.

    Uses :func:`dpc_lens.generation.generate` with the same prompt layout as training
    (``[soft][<bos>] template.format(question=...)``) and the task's ``extract_answer`` /
    ``is_correct``. ``task`` is a task object or a name for :func:`dpc_lens.tasks.get_task`.
    """
    from .generation import GenerationConfig, generate
    from .tasks import resolve_task

    task = resolve_task(task)
    examples = list(examples)
    if not examples:
        raise InputError("evaluate_accuracy needs at least one example.")
    _template_fields(template, "template")
    prompts = [_fill_template(template, ex, "template", i) for i, ex in enumerate(examples)]
    from .validate import as_config

    gen_cfg = as_config(generation_config, GenerationConfig, "generation_config")
    gens = generate(model, prompts, soft_prompt, gen_cfg,
                    add_bos=add_bos, progress=progress, desc="evaluate")
    texts = tuple(g.text for g in gens)
    from .evaluation import grade

    graded = [grade(task, t, e) for t, e in zip(texts, examples, strict=True)]
    preds = tuple(a for a, _ in graded)
    correct = tuple(c for _, c in graded)
    return AccuracyResult(
        accuracy=sum(correct) / len(correct),
        predictions=preds,
        texts=texts,
        correct=correct,
        ids=tuple(str(getattr(ex, "id", i)) for i, ex in enumerate(examples)),
    )
