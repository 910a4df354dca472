"""dpc_lens's own small reasoning model: tokenizer, Llama config, deterministic training, greedy eval.

No real LLM can be downloaded where dpc_lens is developed, so the project trains and ships a tiny
Hugging Face Llama-architecture checkpoint (rotary positions, RMSNorm, grouped-query attention)
on the synthetic arithmetic task of :mod:`dpc_lens.tasks.arith`. It is a real test bed for DPC
and IAP: it loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and with TransformerLens
``TransformerBridge.boot_transformers(dir)``. The shipped copy lives in ``dpc_lens/data/reasoner/``.

**Text layout** (the one every caller must use; :func:`encode_example` builds it)::

    <bos> {question} {rationale} <eos>

as ids ``[bos] + tok(question) + tok(rationale) + [eos]`` with ``add_special_tokens=False``
for the two texts. The tokenizer is word level: a Metaspace pre-tokenizer (``"▁"`` marks a
preceding space, prepended to every text) followed by one token per digit and per punctuation
mark. Because every text gets the same leading ``"▁"``, ``tok(question) + tok(rationale) ==
tok(question + " " + rationale)``: the rationale is tokenised the same way whether it is fed,
generated or scored, and ``decode`` inverts it exactly (``"12-3=9."`` stays ``"12-3=9."``).
``tokenizer(question)`` (special tokens on) gives ``[bos] + tok(question)``, the prompt the DPC
pipeline feeds; it then generates the rationale greedily and stops at ``<eos>``.

**Training loss** is on the rationale and ``<eos>`` tokens only: the question's numbers are
drawn at random, so predicting them is noise that would cost capacity and make the loss curve
meaningless; the model is only ever used to answer questions it is given.

**The shipped checkpoint and the DPC regime** (measured with a plain-HF prompt-tuning prototype:
16 soft tokens, frozen base, AdamW lr 2e-2, batch 32, 600 steps, loss on rationale + ``<eos>``).
Trained on 95% ``train`` (1-3 steps) + 5% ``steps4``, greedy accuracy is 100% on ``test``, 98.5%
on ``steps4``, 4% on ``steps5``, 32% on ``alt`` (new phrasing) and 8.5% on ``new_templates``
(``training_log.json``). A soft prompt tuned on ``alt`` lifts ``alt`` (35 -> 56%: 77 gained,
13 lost of 300) and hurts standard phrasing (100 -> 83%), so on ``make_mixture("mixed_test",
600)`` base and prompt-tuned accuracy are 65.0% and 65.3%, with 69 problems right without the
prompt and wrong with it, 71 the other way, oracle 76.8% (prompt seed 1: 61.7%, 84 and 64,
oracle 75.7%): the paper's regime (LLaMA3-8B GSM8K 64.9 / 65.5). Tuned on ``mixed_train`` (the
evaluation distribution itself, the recommended setting): 65.0 -> 67.8%, 39 lost (25 of them
alt-phrased, so a trigger cannot just detect the phrasing), 56 gained, oracle 74.3%. A soft
prompt tuned on ``steps5`` instead learnt nothing (5%) and broke every other split (``test``
100 -> 3%): the wrong regime. The accuracies are measured with :func:`evaluate_reasoner`, i.e.
the library's own decoding loop (:func:`dpc_lens.generation.generate`); it reproduces every
number of the shipped ``training_log.json`` exactly.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpc_lens.errors import ConfigError
from dpc_lens.tasks.arith import SPLITS, generate_examples, make_split, vocabulary_texts
from dpc_lens.tasks.base import Example

if TYPE_CHECKING:  # heavy imports stay lazy: nothing heavy at import time
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from ..prompt_tuning import AccuracyResult

__all__ = [
    "SPECIAL_TOKENS",
    "HARD_PROMPTS",
    "SHIPPED_DIR",
    "ReasonerConfig",
    "TrainConfig",
    "build_tokenizer",
    "reasoner_config",
    "encode_example",
    "evaluate_reasoner",
    "EVAL_MAX_NEW_TOKENS",
    "train_base_model",
    "load_reasoner",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3 in this order

HARD_PROMPTS: tuple[str, ...] = (
    "Let's think step by step.",
    "Let's solve this problem by splitting it into steps.",
    "Let's work this out in a step by step way to be sure we have the right answer.",
    "First, let's think about this logically.",
    "Let's think like a detective step by step.",
    "Take a deep breath and work on this problem step-by-step.",
    "Let's be realistic and think step by step.",
    "Let's think about this carefully.",
    "Don't think. Just feel.",
    "Answer:",
)
"""Zero-shot CoT prompts (IAP's candidate pool): in the vocabulary so IAP can run on the model."""

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "reasoner"


def _pre_tokenizer():
    from tokenizers import pre_tokenizers as pt

    return pt.Sequence([
        pt.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pt.Digits(individual_digits=True),
        pt.Punctuation(),
    ])


def build_tokenizer(extra_texts: Iterable[str] = HARD_PROMPTS) -> "PreTrainedTokenizerFast":
    """The word-level tokenizer, as a ``transformers.PreTrainedTokenizerFast``.

    The vocabulary is every piece the pre-tokenizer makes of :func:`arith.vocabulary_texts`
    (every word the generator can produce) and of ``extra_texts``, sorted, after the special
    tokens ``<pad> <bos> <eos> <unk>`` (ids 0-3). Deterministic: same texts, same ids.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    pieces: set[str] = {str(d) for d in range(10)} | {"▁"}
    for text in list(vocabulary_texts()) + list(extra_texts):
        pieces.update(p for p, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for p in sorted(pieces - set(vocab)):
        vocab[p] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


@dataclass(frozen=True)
class ReasonerConfig:
    """Architecture of the reasoner (a Llama decoder)."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 256
    max_positions: int = 320
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ReasonerConfig.{name}={v!r} must be a positive int")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads="
                              f"{self.n_heads}; pick n_heads dividing d_model")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads="
                              f"{self.n_kv_heads} (grouped-query attention shares kv heads)")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("the head dimension d_model // n_heads must be even for rotary "
                              "embeddings")


def reasoner_config(tokenizer: "PreTrainedTokenizerFast",
                    config: ReasonerConfig = ReasonerConfig()) -> "LlamaConfig":
    """The Hugging Face ``LlamaConfig`` for ``config`` and this tokenizer's special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )


def encode_example(tokenizer: "PreTrainedTokenizerFast", question: str,
                   rationale: str | None = None) -> tuple[list[int], int]:
    """Ids of ``<bos> question [rationale <eos>]`` and the length of the prompt part.

    ``ids[:prompt_len]`` is what generation starts from; ``ids[prompt_len:]`` (when a rationale
    is given) is the rationale followed by ``<eos>``.
    """
    prompt = [tokenizer.bos_token_id] + tokenizer.encode(question, add_special_tokens=False)
    if rationale is None:
        return prompt, len(prompt)
    target = tokenizer.encode(rationale, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + target, len(prompt)


def _progress(iterable, *, total: int | None, desc: str, enabled: bool):
    """dpc_lens's one progress rule (:func:`dpc_lens.progress.bar`): ``enabled`` shows the bar
    when stderr is a terminal, never in a log."""
    if not enabled:
        return iterable
    from dpc_lens.progress import bar

    return bar(iterable, progress=None, total=total, desc=desc, leave=False)


#: how the reasoner is evaluated: greedy, up to 96 new tokens (rationales of 1-5 steps fit)
EVAL_MAX_NEW_TOKENS = 96


def evaluate_reasoner(model: Any, examples: Sequence[Example], *, soft_prompt: Any = None,
                      max_new_tokens: int = EVAL_MAX_NEW_TOKENS, batch_size: int = 64,
                      progress: bool = False) -> "AccuracyResult":
    """Greedy accuracy of a reasoner on arithmetic ``examples``, through the library's one
    decoding loop (:func:`dpc_lens.generation.generate` via
    :func:`dpc_lens.prompt_tuning.evaluate_accuracy`).

    ``model`` is a checkpoint directory or a model :func:`dpc_lens.load_model` returned. The
    layout is the library's, ``[soft][<bos>] question`` (:func:`encode_example`'s prompt after
    the soft prompt, as PEFT): there is no second soft-prompt layout. Returns the
    :class:`~dpc_lens.prompt_tuning.AccuracyResult` (``.accuracy``, ``.correct``, ``.texts``).
    """
    from ..generation import GenerationConfig
    from ..model import load_model
    from ..prompt_tuning import evaluate_accuracy

    if isinstance(model, (str, Path)):
        model = load_model(str(model), device="cpu")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return evaluate_accuracy(model, soft_prompt, examples, "arith", gen, add_bos=True,
                             progress=progress)


@dataclass(frozen=True)
class TrainConfig:
    """Training of the base reasoner.

    ``mix`` lists ``(split name, weight)``: each training example is drawn from a split of
    :data:`dpc_lens.tasks.arith.SPLITS` with probability proportional to its weight, all from
    one seeded stream, so the data and its order depend only on ``seed``.
    """

    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mix: tuple[tuple[str, float], ...] = (("train", 1.0),)
    eval_splits: tuple[str, ...] = ("test", "steps4", "steps5", "alt", "new_templates",
                                    "shifted")
    eval_n: int = 200
    eval_seed: int = 12345
    num_threads: int | None = 2
    progress: bool = True
    model: ReasonerConfig = field(default_factory=ReasonerConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"TrainConfig.{name}={v!r} must be a positive int")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr={self.lr!r} must be > 0")
        if not self.mix or any(s not in SPLITS or not w > 0 for s, w in self.mix):
            raise ConfigError(f"TrainConfig.mix={self.mix!r}: expected (split, weight > 0) "
                              f"pairs with splits from {sorted(SPLITS)}")
        for s in self.eval_splits:
            if s not in SPLITS:
                raise ConfigError(f"TrainConfig.eval_splits has unknown split {s!r}; "
                                  f"expected names from {sorted(SPLITS)}")


def training_examples(cfg: TrainConfig) -> list[Example]:
    """The exact training stream: ``steps * batch_size`` examples in training order."""
    total = cfg.steps * cfg.batch_size
    names = [s for s, _ in cfg.mix]
    weights = [w for _, w in cfg.mix]
    rng = random.Random(cfg.seed)
    counts = dict.fromkeys(names, 0)
    picks = rng.choices(names, weights=weights, k=total)
    for s in picks:
        counts[s] += 1
    pools = {
        s: iter(generate_examples(counts[s], seed=rng.randrange(2**62), split=s,
                                  id_prefix=f"arith-train-{s}", **SPLITS[s]))
        for s in names
    }
    return [next(pools[s]) for s in picks]


def _batch(tokenizer, examples: Sequence[Example]):
    import torch

    seqs, starts = zip(*(encode_example(tokenizer, e.question, e.rationale) for e in examples))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, st:len(s)] = torch.tensor(s[st:])  # rationale + <eos> only
    return ids, mask, labels


def train_base_model(out_dir: str | Path, *, seed: int | None = None, steps: int | None = None,
                     config: TrainConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Train the reasoner from scratch and save it to ``out_dir``; returns the training log.

    Deterministic: ``torch.manual_seed(seed)``, deterministic algorithms, a fixed thread count
    and a data stream fixed by ``seed`` (:func:`training_examples`). AdamW with linear warm-up
    and cosine decay; loss on rationale + ``<eos>`` tokens (see the module docstring).

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer
    files and ``training_log.json`` (config, seed, losses, wall time, greedy accuracy on
    ``eval_n`` problems of each ``eval_splits`` split). ``seed``, ``steps`` and any other
    :class:`TrainConfig` field given as a keyword override ``config`` (default ``TrainConfig()``).
    """
    import dataclasses

    import torch

    if seed is not None:
        overrides["seed"] = seed
    if steps is not None:
        overrides["steps"] = steps
    cfg = dataclasses.replace(config if config is not None else TrainConfig(), **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Thread count, determinism flag and RNG are process-wide: set them for this call only.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            if cfg.num_threads:
                torch.set_num_threads(cfg.num_threads)
            torch.manual_seed(cfg.seed)
            torch.use_deterministic_algorithms(True, warn_only=True)
            return _train(cfg, out)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(reasoner_config(tokenizer, cfg.model))
    n_params = sum(p.numel() for p in model.parameters())
    data = training_examples(cfg)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    losses: list[tuple[int, float]] = []
    model.train()
    t0 = time.time()
    bar = _progress(range(cfg.steps), total=cfg.steps, desc="train", enabled=cfg.progress)
    running = None
    for step in bar:
        ids, mask, labels = _batch(tokenizer, data[step * cfg.batch_size:(step + 1) * cfg.batch_size])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == cfg.steps - 1:
            losses.append((step, round(loss.item(), 5)))
            if cfg.progress:
                bar.set_postfix(loss=f"{running:.4f}")
    train_s = time.time() - t0

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Saved before evaluating, so a failing evaluation never costs the trained weights; the
    # evaluation reloads the saved checkpoint, as every user of it does.
    del model
    accuracy = {}
    for split in cfg.eval_splits:
        accuracy[split] = evaluate_reasoner(out, make_split(split, cfg.eval_n, cfg.eval_seed),
                                            progress=cfg.progress).accuracy
    eval_s = time.time() - t0 - train_s

    import tokenizers
    import transformers

    log = {
        "seed": cfg.seed,
        "config": json.loads(json.dumps(asdict(cfg))),
        "n_params": n_params,
        "n_train_examples": len(data),
        "train_wall_s": round(train_s, 1),
        "eval_wall_s": round(eval_s, 1),
        "accuracy": accuracy,
        "eval": {"n": cfg.eval_n, "seed": cfg.eval_seed, "decoding": "greedy",
                 "max_new_tokens": EVAL_MAX_NEW_TOKENS},
        "losses": losses,
        "text_layout": "<bos> {question} {rationale} <eos>; loss on rationale + <eos>",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "num_threads": torch.get_num_threads(),
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def load_reasoner(path: str | Path | None = None):
    """``(model, tokenizer)`` from ``path`` (default: the shipped ``dpc_lens/data/reasoner``),
    offline, in eval mode with eager attention (attention patterns need it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path) if path is not None else SHIPPED_DIR
    if not (p / "config.json").is_file():
        from dpc_lens.errors import ModelError

        raise ModelError(f"no reasoner checkpoint at {str(p)!r} (config.json missing); train "
                         "one with dpc_lens.testbed.reasoner.train_base_model(out_dir)")
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, attn_implementation="eager")
    model.eval()
    return model, tok


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpc_lens.testbed.reasoner --out DIR [--seed 0] [--steps 3000] [--mix train=0.95,...]``:
    the training script that made the shipped checkpoint (its command line is in the log)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dpc_lens.testbed.reasoner",
                                     description="Train the dpc_lens arithmetic reasoner.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--mix", default=None,
                        help="comma-separated split=weight pairs, e.g. train=0.95,steps4=0.05")
    parser.add_argument("--eval-n", type=int, default=TrainConfig.eval_n)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.mix:
        try:
            overrides["mix"] = tuple((k, float(v)) for k, v in
                                     (kv.split("=") for kv in args.mix.split(",")))
        except ValueError:
            raise ConfigError(f"--mix {args.mix!r}: expected split=weight pairs separated by "
                              "commas, e.g. train=0.95,steps4=0.05") from None
    log = train_base_model(args.out, seed=args.seed, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, eval_n=args.eval_n,
                           num_threads=args.threads, progress=not args.quiet, **overrides)
    print(json.dumps({k: log[k] for k in ("n_params", "train_wall_s", "accuracy")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
