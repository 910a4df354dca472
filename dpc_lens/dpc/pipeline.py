"""Dynamic Prompt Corruption end to end (SPEC section 3): analyse, trigger, corrupt, regenerate.

Each step is a function a researcher can call alone; :func:`run_dpc` composes them:

1. :func:`analyse` — generate the rationale with the soft prompt (greedy), then one
   teacher-forced forward + backward over ``[soft; bos; question; rationale]`` reduced at once
   into the four detector tensors (:class:`~dpc_lens.detector.DetectorInputs`) and the per-layer
   DPC flows (``soft->question``, ``soft->rationale``, ``question->rationale``).
2. :func:`~dpc_lens.detector.dynamic_trigger` on those tensors.
3. :func:`~dpc_lens.patching.corrupt_soft_prompt` of the located top-k tokens, and a fresh
   generation with the corrupted prompt (all triggered instances regenerated together).

Baselines on the same questions (the paper's ablations): the base model without the soft
prompt, vanilla prompt tuning (step 1's answer), corruption on every instance, and random
corruption of the same number of tokens (seeded). Cost per instance: one generation and one
forward/backward, plus one generation when the trigger fires (and one per baseline asked for).

Each question's record is a :class:`~dpc_lens.dpc.DPCRecord`, appended as its JSON dict to a
JSONL file as soon as it is final, so a killed run can be resumed (:func:`run_dpc` with
``out_dir`` and ``resume=True``).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..analysis import measure_flows
from ..errors import ConfigError, DataError, InputError
from ..evaluation import answer_record, prompt_text
from ..generation import Generation, GenerationConfig, encode_prompts, generate, token_texts
from ..model import as_adapter
from ..patching import CorruptionConfig, corrupt_soft_prompt, random_rows
from ..progress import bar as progress_bar
from ..runs import (
    append_jsonl,
    check_unique_ids,
    read_json,
    read_records,
    resume_run,
    rewrite_jsonl,
    write_json,
)
from ..saliency import SaliencyConfig
from ..segments import SegmentLayout
from ..soft_prompt import SoftPrompt
from ..tasks.base import Example
from .detector import DetectorConfig, DetectorInputs, TriggerDecision, dynamic_trigger
from .locate import candidate_positions
from .records import AnswerRecord, DPCRecord
from .sinks import measure_sink_inputs
from .summary import BASELINES, print_summary, summarize  # noqa: F401 (re-exported)

__all__ = [
    "DPCConfig",
    "Analysis",
    "analyse",
    "run_dpc",
    "summarize",
    "print_summary",
    "read_records",
    "DPC_FLOWS",
    "BASELINES",
]

DPC_FLOWS = ("soft->question", "soft->rationale", "question->rationale")
#: baselines run only when asked: ``modal`` corrupts the modal located rows of the run on every
#: question (a pass after the others), for the paired test of per-question locating
OPTIONAL_BASELINES = ("modal",)


@dataclass(frozen=True)
class DPCConfig:
    """Every knob of the DPC pipeline (saved next to each result).

    Attributes:
        detector: the Dynamic Trigger's :class:`~dpc_lens.detector.DetectorConfig`.
        corruption: how located tokens are corrupted (zero by default; gamma elimination).
        generation: decoding (greedy by default).
        template: how a question becomes the prompt text (``{question}`` is replaced).
        add_bos: put the tokenizer's BOS after the soft prompt (PEFT's order).
        baselines: which of ``base``, ``always``, ``random`` to also run (all three by default),
            and ``modal`` (opt-in): after every question is done, corrupt the run's modal located
            rows on every question, so the summary can test per-question locating against always
            zeroing the modal position on the same questions (one generation per question whose
            located rows differ from the modal ones).
        seed: seed of the random-corruption baseline.
        random_draws: how many random corruptions per question (seeds ``seed .. seed+n-1``); the
            summary reports the baseline as the mean accuracy over the draws with its spread.
        saliency_batch_size: examples per saliency pass.
        fp32: saliency accumulated in float32.
    """

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    template: str = "{question}"
    add_bos: bool = True
    baselines: tuple[str, ...] = BASELINES
    seed: int = 0
    saliency_batch_size: int = 8
    fp32: bool = True
    random_draws: int = 1

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ConfigError(f"template must contain '{{question}}', got {self.template!r}.")
        object.__setattr__(self, "baselines", tuple(self.baselines))
        bad = [b for b in self.baselines if b not in BASELINES + OPTIONAL_BASELINES]
        if bad:
            raise ConfigError(f"Unknown baselines {bad}; choose from {BASELINES + OPTIONAL_BASELINES}.")
        if self.saliency_batch_size < 1:
            raise ConfigError("saliency_batch_size must be >= 1.")
        if not isinstance(self.random_draws, int) or isinstance(self.random_draws, bool) \
                or self.random_draws < 1:
            raise ConfigError(f"random_draws must be an int >= 1, got {self.random_draws!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.to_dict(),
            "corruption": self.corruption.to_dict(),
            "generation": self.generation.to_dict(),
            "template": self.template,
            "add_bos": self.add_bos,
            "baselines": list(self.baselines),
            "seed": self.seed,
            "saliency_batch_size": self.saliency_batch_size,
            "fp32": self.fp32,
            "random_draws": self.random_draws,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPCConfig":
        from ..validate import check_keys

        known = ["detector", "corruption", "generation", "template", "add_bos", "baselines", "seed",
                 "saliency_batch_size", "fp32", "random_draws"]
        d = dict(check_keys(d, known, "DPCConfig"))
        return cls(
            detector=DetectorConfig.from_dict(d.pop("detector", {})),
            corruption=CorruptionConfig.from_dict(d.pop("corruption", {})),
            generation=GenerationConfig.from_dict(d.pop("generation", {})),
            baselines=tuple(d.pop("baselines", BASELINES)),
            **d,
        )

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DPCConfig":
        d = read_json(path, "DPC config")
        try:
            return cls.from_dict(d)
        except TypeError as exc:
            raise DataError(f"DPC config {os.fspath(path)!r} is malformed: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Analysis:
    """Step 1 for one instance: the prompt-tuned generation and what the detector needs.

    ``inputs`` is ``None`` when the rationale is empty (nothing to measure); ``flows`` maps each
    of :data:`DPC_FLOWS` to its per-layer mean saliency.
    """

    prompt_ids: tuple[int, ...]
    generation: Generation
    inputs: DetectorInputs | None
    flows: dict[str, list[float]]
    loss: float | None


def encode_questions(adapter: Any, questions: Sequence[str], cfg: DPCConfig) -> list[list[int]]:
    return encode_prompts(adapter, [prompt_text(cfg.template, q) for q in questions], add_bos=cfg.add_bos)


def _detector_inputs(res: Any, b: int, n_soft: int,
                     windows: Sequence[int | None] | None = None) -> DetectorInputs:
    lay = res.layouts[b]
    s0, s1 = lay.spans["soft"]
    r0, r1 = lay.spans["rationale"]
    layer_windows = visible = None
    if windows is not None and any(w is not None for w in windows):
        # rationale token at position p sees a soft token in a layer with window W when
        # p - (s1 - 1) < W (the last soft token is the nearest); a global layer sees them all
        dist = torch.arange(r0, r1) - (s1 - 1)
        layer_windows = torch.tensor([w or 0 for w in windows], dtype=torch.int64)
        visible = torch.stack([dist < w if w else torch.ones_like(dist, dtype=torch.bool)
                               for w in windows])
    rows = res.row_sums[:, b, r0:r1]
    tot = res.row_totals[:, b, r0:r1]
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    share = torch.where(tot > 0, rows / safe, torch.zeros_like(tot))
    return DetectorInputs(
        soft_columns=res.column_sums[:, b, s0:s1].double().cpu(),
        soft_columns_norm=res.column_shares[:, b, s0:s1].double().cpu(),
        rationale_rows=(rows / n_soft).double().cpu(),
        rationale_rows_norm=share.clamp(0.0, 1.0).double().cpu(),
        layer_windows=layer_windows,
        rationale_visible=visible,
    )


def analyse(
    model: Any,
    soft_prompt: SoftPrompt,
    questions: Sequence[str],
    config: DPCConfig | None = None,
    *,
    generations: Sequence[Generation] | None = None,
    progress: bool | None = None,
) -> list[Analysis]:
    """Generate with the soft prompt (unless ``generations`` are given) and measure saliency.

    One teacher-forced forward + backward per batch of ``config.saliency_batch_size`` examples;
    the loss is the mean NLL of the generated rationale tokens.
    """
    from ..validate import as_config

    cfg = as_config(config, DPCConfig)
    _check_soft_prompt(soft_prompt, "analyse")
    adapter = as_adapter(model)
    prompts = encode_questions(adapter, questions, cfg)
    if generations is None:
        generations = generate(adapter, prompts, soft_prompt, cfg.generation, progress=progress,
                               desc="PT generate")
    if len(generations) != len(prompts):
        raise InputError(f"{len(generations)} generations for {len(prompts)} questions.")
    sal_cfg = SaliencyConfig(
        loss_segments=("rationale",),
        flow_segments=("soft", "question", "rationale"),
        column_targets=("question", "rationale"),
        row_sources=("soft",),
        fp32=cfg.fp32,
    )
    out: list[Analysis | None] = [None] * len(prompts)
    todo = []
    bos = 1 if cfg.add_bos else 0
    for i, (p, g) in enumerate(zip(prompts, generations)):
        if len(g.token_ids) == 0 or len(p) == bos:
            out[i] = Analysis(tuple(p), g, None, {}, None)
        else:
            todo.append(i)
    seqs, lays = [], []
    for i in todo:
        p, g = prompts[i], list(generations[i].token_ids)
        spans = {"question": (bos, len(p)), "rationale": (len(p), len(p) + len(g))}
        if bos:
            spans = {"bos": (0, 1), **spans}
        seqs.append(list(p) + g)
        lays.append(SegmentLayout(spans, len(p) + len(g)))
    out_of_window: set[int] = set()

    def per_example(res: Any, b: int, batch: Any) -> DetectorInputs:
        out_of_window.update(_out_of_window_layers(res, b))
        return _detector_inputs(res, b, batch.n_soft, adapter.attention_windows)
    measured = measure_flows(
        adapter, seqs, lays, DPC_FLOWS, sal_cfg, soft=soft_prompt, batch_size=cfg.saliency_batch_size,
        per_example=per_example, progress=progress,
    )
    if out_of_window:
        _warn_out_of_window(sorted(out_of_window), adapter.attention_windows)
    # the attention each soft row receives and its residual norm, for sink detection
    # (dpc_lens.dpc.sinks): one no-grad forward per batch with its own hooks
    sink_inputs = measure_sink_inputs(adapter, seqs, lays, soft_prompt, batch_size=cfg.saliency_batch_size)
    for i, m, (att, res) in zip(todo, measured, sink_inputs, strict=True):
        inputs = replace(m.extra, soft_attention=att, soft_residual=res)
        out[i] = Analysis(tuple(prompts[i]), generations[i], inputs, m.flows, m.loss)
    return [a for a in out if a is not None]


def _out_of_window_layers(res: Any, b: int) -> list[int]:
    """Sliding-window layers where no rationale token of example ``b`` sees a soft token."""
    counts, names = getattr(res, "layer_pair_counts", None), res.segment_names
    si, ri = names.index("soft"), names.index("rationale")
    if counts is None or float(res.pair_counts[b, ri, si]) == 0:
        return []
    return [res.layers[k] for k in range(len(res.layers)) if float(counts[k, b, ri, si]) == 0]


def _warn_out_of_window(layers: list[int], windows: Sequence[int | None]) -> None:
    import warnings

    from ..errors import DpcLensWarning

    glob = [i for i, w in enumerate(windows) if w is None]
    warnings.warn(
        f"DPC: in the sliding-window layers {layers} some rationales lie a window or more after "
        "the soft prompt, so those layers' soft->rationale saliency is structurally zero there "
        "(the attention mask forbids the pairs), not a measured absence of flow. The detector "
        "leaves those (layer, token) pairs out of its deep-flow means (a token that sees the soft "
        "prompt in no deep layer is not judged); to judge every token, set "
        f"deep_layers='global' (the global layers are {glob}) or shorten the template.",
        DpcLensWarning, stacklevel=3)


def _check_soft_prompt(soft_prompt: Any, where: str) -> None:
    """DPC corrupts a soft prompt: without one (``None``) or with something else, say so."""
    if soft_prompt is None:
        raise InputError(
            f"{where} needs a soft prompt: DPC measures how the soft prompt's tokens steer the "
            "rationale and corrupts the ones that mislead it, so there is nothing to analyse "
            "without one. Pass a SoftPrompt (e.g. SoftPrompt.from_peft('path/to/adapter')); for "
            "saliency without a soft prompt use dpc_lens.compute_saliency."
        )
    if not isinstance(soft_prompt, SoftPrompt):
        raise InputError(
            f"{where}: soft_prompt must be a SoftPrompt (e.g. SoftPrompt.from_peft(dir) or "
            f"SoftPrompt(tensor)), got {type(soft_prompt).__name__}."
        )


def _safe_trigger(inputs: DetectorInputs | None,
                  det: DetectorConfig) -> tuple[TriggerDecision | None, str | None]:
    """The trigger for one instance and, when it could not be computed, why.

    ``(None, None)`` when there is no rationale to measure; ``(None, message)`` when the trigger
    is undefined for that instance (e.g. every counted soft column is exactly zero), so one
    instance cannot abort a whole run -- but the failure is kept in the record
    (``trigger_error``) and counted in the summary, never silent."""
    if inputs is None:
        return None, None
    try:
        return dynamic_trigger(inputs, det), None
    except InputError as exc:
        return None, str(exc)


def random_rows_for(example_id: str, n_soft: int, k: int, seed: int,
                    candidates: Sequence[int] | None = None) -> list[int]:
    """The random-corruption baseline's rows for one example: seeded by ``(seed, example id)``,
    so a resumed or reordered run draws the same rows for the same question.

    ``candidates``: draw only from these soft positions (the ones the locator may choose, e.g.
    without the excluded sinks); ``None`` draws from all ``n_soft``. With every position as
    candidates the draw equals the unrestricted one (same generator, same permutation)."""
    mixed = int(seed) * 1_000_003 + zlib.crc32(str(example_id).encode())
    g = torch.Generator().manual_seed(mixed % (2**63))
    if candidates is None:
        return random_rows(n_soft, k, g)
    cand = [int(j) for j in candidates]
    return sorted(cand[j] for j in random_rows(len(cand), k, g))


def check_config_fits(cfg: DPCConfig, soft_prompt: SoftPrompt, n_layers: int | None = None) -> None:
    """Refuse, before any work, a config the soft prompt cannot satisfy (a ``detector.top_k``
    larger than the soft tokens it may choose from would make the trigger undefined on every
    question, i.e. DPC would silently never fire)."""
    n_soft = soft_prompt.n_tokens
    usable = n_soft - (1 if cfg.detector.sink == "exclude" else 0)
    if cfg.detector.top_k > usable:
        why = f" (sink='exclude' leaves {usable} to choose from)" if usable != n_soft else ""
        raise ConfigError(
            f"detector.top_k={cfg.detector.top_k} is larger than the soft prompt's {n_soft} "
            f"tokens{why}: DPC could never locate that many and would never fire. Set "
            f"detector.top_k to at most {usable} in the config file (--config), or use a longer "
            "soft prompt."
        )


def _check_room(adapter: Any, soft_prompt: SoftPrompt, cfg: DPCConfig) -> None:
    """Refuse up front when no question can fit (soft prompt + BOS + template + one question
    token + max_new_tokens > n_ctx): every question would be skipped."""
    from ..generation import check_room

    fixed = len(encode_questions(adapter, [""], cfg)[0]) + soft_prompt.n_tokens
    check_room(adapter, cfg.generation.max_new_tokens, fixed, "question (soft prompt, BOS and template)")


def _too_long(adapter: Any, prompt: Sequence[int], n_soft: int, cfg: DPCConfig) -> str | None:
    """Why a question cannot be run on this model (``None`` when it fits)."""
    n_ctx = adapter.n_ctx
    need = len(prompt) + n_soft + cfg.generation.max_new_tokens
    if n_ctx is None or need <= n_ctx:
        return None
    return (f"too long for the model's context: {len(prompt)} prompt tokens + {n_soft} soft tokens "
            f"+ max_new_tokens {cfg.generation.max_new_tokens} = {need} > n_ctx={n_ctx}")


@dataclass(eq=False)
class _Pending:
    """One question between analysis and its final record (waiting for a regeneration)."""

    ex: Example
    prompt: list[int]
    analysis: Analysis
    decision: TriggerDecision | None
    error: str | None
    located: list[int]
    base: Generation | None
    rand: list[tuple[list[int], Generation]]
    timings: dict[str, float]
    regen: Generation | None = None
    tokens: list[str] | None = None  # the PT rationale's token texts (the trigger's f_i order)
    # random draws from the locator's candidates (None: the candidates are every soft row, so
    # they are the unrestricted draws in ``rand``)
    rand_cand: list[tuple[list[int], Generation]] | None = None

    def needs_regen(self, cfg: DPCConfig) -> bool:
        fired = self.decision is not None and self.decision.fired
        return fired or ("always" in cfg.baselines and bool(self.located))


def _analyse_batch(adapter, soft, exs: Sequence[Example], prompts: list[list[int]],
                   cfg: DPCConfig) -> list[_Pending]:
    """PT generation, saliency, trigger and the per-question baselines of one batch."""
    n = len(exs)
    t0 = time.perf_counter()
    pt_gen = generate(adapter, prompts, soft, cfg.generation, progress=False)
    t_gen = time.perf_counter() - t0
    t1 = time.perf_counter()
    analyses = analyse(adapter, soft, [e.question for e in exs], cfg, generations=pt_gen, progress=False)
    t_sal = time.perf_counter() - t1
    k = cfg.detector.top_k
    base_gen = None
    if "base" in cfg.baselines:
        base_gen = generate(adapter, prompts, None, cfg.generation, progress=False)
    triggers = [_safe_trigger(a.inputs, cfg.detector) for a in analyses]
    rand: list[list[tuple[list[int], Generation]]] = [[] for _ in exs]
    rand_cand: list[list[tuple[list[int], Generation]] | None] = [None for _ in exs]
    if "random" in cfg.baselines:
        for j in range(cfg.random_draws):
            rows = [random_rows_for(e.id, soft.n_tokens, k, cfg.seed + j) for e in exs]
            softs = [corrupt_soft_prompt(soft, r, cfg.corruption) for r in rows]
            gens = generate(adapter, prompts, softs, cfg.generation, progress=False)
            for i, (r, g) in enumerate(zip(rows, gens)):
                rand[i].append((r, g))
        # the same draws restricted to the positions the locator may choose (sinks excluded)
        cands = [_candidates(d, soft.n_tokens, cfg.detector) for d, _ in triggers]
        which = [i for i, c in enumerate(cands) if len(c) < soft.n_tokens and len(c) >= k]
        for j in range(cfg.random_draws) if which else ():
            rows = [random_rows_for(exs[i].id, soft.n_tokens, k, cfg.seed + j, cands[i]) for i in which]
            gens = generate(adapter, [prompts[i] for i in which],
                            [corrupt_soft_prompt(soft, r, cfg.corruption) for r in rows],
                            cfg.generation, progress=False)
            for i, r, g in zip(which, rows, gens):
                rand_cand[i] = (rand_cand[i] or []) + [(r, g)]
    out = []
    for i, (ex, a) in enumerate(zip(exs, analyses)):
        d, err = triggers[i]
        located = list(d.accumulation.top_indices[:k]) if d is not None else []
        out.append(_Pending(ex, prompts[i], a, d, err, located, base_gen[i] if base_gen else None, rand[i],
                            {"pt_generate_s": t_gen / n, "saliency_s": t_sal / n, "regenerate_s": 0.0},
                            tokens=token_texts(adapter.tokenizer, a.generation.token_ids),
                            rand_cand=rand_cand[i]))
    return out


def _candidates(d: TriggerDecision | None, n_soft: int, det: DetectorConfig) -> list[int]:
    """The soft positions the locator may choose for one question (its sinks left out under
    ``sink="exclude"``); every position when there is no decision (nothing measured)."""
    if d is None:
        return list(range(n_soft))
    return candidate_positions(n_soft, d.accumulation.sink_positions, det.sink)


def _regenerate(adapter, soft, group: Sequence[_Pending], cfg: DPCConfig) -> None:
    """One corrupted generation per pending question (its located rows), batched."""
    t0 = time.perf_counter()
    softs = [corrupt_soft_prompt(soft, p.located, cfg.corruption) for p in group]
    gens = generate(adapter, [p.prompt for p in group], softs, cfg.generation, progress=False)
    dt = (time.perf_counter() - t0) / max(len(group), 1)
    for p, g in zip(group, gens):
        p.regen = g
        p.timings["regenerate_s"] = dt


def _graded(task, generation: Generation, ex: Example, **extra: Any) -> AnswerRecord:
    return AnswerRecord.from_dict({**answer_record(task, generation, ex), **extra})


def _finish(task, cfg: DPCConfig, p: _Pending) -> dict[str, Any]:
    ex, a, d = p.ex, p.analysis, p.decision
    pt = _graded(task, a.generation, ex)
    fired = bool(d is not None and d.fired)
    dpc = replace(_graded(task, p.regen, ex) if fired else pt, fired=fired,
                  corrupted_rows=tuple(p.located) if fired else ())
    always = None
    if "always" in cfg.baselines:
        always = replace(_graded(task, p.regen, ex) if p.regen is not None else pt,
                         corrupted_rows=tuple(p.located))
    draws = tuple(_graded(task, g, ex, corrupted_rows=rows) for rows, g in p.rand)
    cand = (tuple(_graded(task, g, ex, corrupted_rows=rows) for rows, g in p.rand_cand)
            if p.rand_cand is not None else None)
    return DPCRecord(
        id=ex.id, question=ex.question, gold=ex.answer, pt=pt, dpc=dpc,
        final_answer=dpc.answer, final_correct=dpc.correct,
        trigger=d.to_dict() if d is not None else None, located_rows=tuple(p.located),
        flows=a.flows, loss=a.loss, timings=dict(p.timings), trigger_error=p.error,
        base=_graded(task, p.base, ex) if p.base is not None else None, always=always,
        random=draws[0] if draws else None, random_draws=draws if len(draws) > 1 else None,
        rationale_tokens=tuple(p.tokens) if p.tokens is not None else None,
        random_candidates=cand,
    ).to_dict()


def _skipped_record(ex: Example, why: str) -> dict[str, Any]:
    return DPCRecord(id=ex.id, question=ex.question, gold=ex.answer, skipped=why).to_dict()


def run_dpc(
    model: Any,
    soft_prompt: SoftPrompt,
    examples: Sequence[Example],
    task: Any,
    config: DPCConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    chunk_size: int | None = None,
    progress: bool | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run DPC and its baselines over ``examples``; return ``(records, summary)``.

    With ``out_dir``: the directory is locked for the whole run (``.dpc_lens.lock``, see
    :class:`dpc_lens.runs.RunLock`); each question's record is appended to
    ``out_dir/records.jsonl`` as soon as it is final (a killed run loses only the questions in
    flight); at the end the file is rewritten in input order and ``config.json`` and
    ``summary.json`` are written. ``resume=True`` skips the ids already in the file (a corrupt
    line is moved aside to ``records.jsonl.rejected`` and its question redone); without
    ``resume`` an existing file is an error.

    Model work stays batched: ``chunk_size`` questions (default: the generation batch size) are
    generated and measured together; the questions whose trigger fires wait until a whole
    generation batch of them can be regenerated together.

    A question too long for the model's context (prompt + soft prompt + ``max_new_tokens``) is
    skipped with a record saying why (``"skipped"``), counted in the summary.

    ``task`` is a task object or a name (``"arith"``), and ``config`` a :class:`DPCConfig` or a
    dict of its fields; both are checked before any model work.

    Raises:
        DataError: no examples, or nothing evaluated (every question skipped; the records are
            written first). ConfigError: a config the soft prompt cannot satisfy, or a
            ``max_new_tokens`` with which no question can fit the model's context.
        InputError / RunError: repeated ids, an existing run without ``resume``, a run with
            another config, an output directory that is locked or not writable.
    """
    from contextlib import nullcontext

    from ..runs import RunLock, check_out_dir
    from ..tasks import resolve_task
    from ..validate import as_config

    task = resolve_task(task)  # a name or a task object, checked before any model work
    cfg = as_config(config, DPCConfig)
    _check_soft_prompt(soft_prompt, "run_dpc")
    adapter = as_adapter(model)
    soft_prompt.for_model(adapter)  # width check before any work
    examples = list(examples)
    if not examples:
        raise DataError("No examples to run: the data set is empty (or --limit left none). Pass a "
                        "data file with at least one question.")
    ids = [e.id for e in examples]
    check_unique_ids(ids)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}.")
    check_config_fits(cfg, soft_prompt)
    _check_room(adapter, soft_prompt, cfg)
    rec_path = None
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
        rec_path = os.path.join(out_dir, "records.jsonl")
    with RunLock(out_dir, "dpc") if out_dir is not None else nullcontext():
        return _run_dpc_locked(adapter, soft_prompt, examples, ids, task, cfg, out_dir, rec_path,
                               resume, chunk_size, progress, on_record)


def _record_settings(config_dict: dict[str, Any]) -> dict[str, Any]:
    """What a DPC record depends on: the config without batch sizes (they change no record)."""
    d = DPCConfig.from_dict(config_dict).to_dict()
    d.pop("saliency_batch_size", None)
    d["generation"].pop("batch_size", None)
    return d


def _run_dpc_locked(adapter, soft_prompt, examples, ids, task, cfg, out_dir, rec_path, resume,
                    chunk_size, progress, on_record):
    done: list[dict] = []
    others: list[dict] = []
    if rec_path is not None:
        cfg_path = os.path.join(out_dir, "config.json")
        on_disk = resume_run(
            rec_path, resume=resume, settings_path=cfg_path, settings=cfg.to_dict(),
            exists_message=(f"{rec_path} already exists. Pass resume=True (--resume) to continue "
                            "that run, or choose another output directory."),
            mismatch_message=lambda old, new: (
                f"Cannot resume {out_dir}: its records were made with another config (differs "
                f"in {sorted(k for k in new if old.get(k) != new.get(k))}). Resume with the same "
                f"config (--config {cfg_path}) or start a new output directory."),
            comparable=_record_settings,
        )
        wanted = set(ids)
        done = [r for r in on_disk if r.get("id") in wanted]
        others = [r for r in on_disk if r.get("id") not in wanted]
    done_ids = {r["id"] for r in done}
    todo = [e for e in examples if e.id not in done_ids]
    step = chunk_size or cfg.generation.batch_size
    regen_batch = cfg.generation.batch_size
    n_soft = soft_prompt.n_tokens
    new: list[dict] = []
    bar = progress_bar(total=len(todo), progress=progress, desc="DPC")

    def emit(rec: dict) -> None:
        if rec_path is not None:
            append_jsonl(rec_path, [rec])
        new.append(rec)
        bar.update(1)
        if on_record is not None:
            on_record(rec)

    def flush(queue: list[_Pending], final: bool) -> list[_Pending]:
        while queue and (final or len(queue) >= regen_batch):
            group, queue = queue[:regen_batch], queue[regen_batch:]
            _regenerate(adapter, soft_prompt, group, cfg)
            for p in group:
                emit(_finish(task, cfg, p))
        return queue

    queue: list[_Pending] = []
    try:
        for s in range(0, len(todo), step):
            batch = todo[s:s + step]
            prompts = encode_questions(adapter, [e.question for e in batch], cfg)
            fit_ex, fit_p = [], []
            for ex, p in zip(batch, prompts):
                why = _too_long(adapter, p, n_soft, cfg)
                if why is not None:
                    emit(_skipped_record(ex, why))
                else:
                    fit_ex.append(ex)
                    fit_p.append(p)
            if fit_ex:
                for p in _analyse_batch(adapter, soft_prompt, fit_ex, fit_p, cfg):
                    if p.needs_regen(cfg):
                        queue.append(p)
                    else:
                        emit(_finish(task, cfg, p))
            queue = flush(queue, final=False)
        flush(queue, final=True)
    finally:
        bar.close()
    by_id = {r["id"]: r for r in done + new}
    records = [by_id[i] for i in ids if i in by_id]
    if "modal" in cfg.baselines:
        _modal_pass(adapter, soft_prompt, task, cfg, examples, records)
    summary = summarize(records)
    # decided by behaviour (ModelAdapter.supports_kv_cache): a silent fallback shows here
    summary["kv_cache_used"] = bool(cfg.generation.use_kv_cache and adapter.supports_kv_cache)
    if out_dir is not None:
        rewrite_jsonl(rec_path, records + others)  # input order, as an uninterrupted run
        write_json(os.path.join(out_dir, "summary.json"), summary)
    if records and summary.get("n", 0) == 0:
        raise nothing_evaluated(summary, out_dir)
    return records, summary


def modal_rows(records: Sequence[dict[str, Any]]) -> tuple[int, ...] | None:
    """The run's modal located row set (the commonest ``located_rows``; ties -> the smallest)."""
    sets = [tuple(r["located_rows"]) for r in records if r.get("located_rows") and not r.get("skipped")]
    return min(set(sets), key=lambda x: (-sets.count(x), x)) if sets else None


def _modal_pass(adapter, soft, task, cfg: DPCConfig, examples: Sequence[Example],
                records: list[dict[str, Any]]) -> None:
    """Give every measured record ``modal``: its answer with the run's modal rows corrupted (the
    ``always`` answer where it located those rows; else one generation). A record whose ``modal``
    was made with other rows (a resumed run whose modal moved) is redone."""
    rows = modal_rows(records)
    if rows is None:
        return
    by_id = {e.id: e for e in examples}
    todo = []
    for r in records:
        if r.get("skipped") or not r.get("located_rows"):
            continue
        if r.get("modal") and tuple(r["modal"].get("corrupted_rows") or ()) == rows:
            continue
        if tuple(r["located_rows"]) == rows and r.get("always"):
            r["modal"] = {**r["always"], "corrupted_rows": list(rows)}
        else:
            todo.append(r)
    zeroed = corrupt_soft_prompt(soft, list(rows), cfg.corruption)
    step = cfg.generation.batch_size
    for s in range(0, len(todo), step):
        part = todo[s:s + step]
        exs = [by_id[r["id"]] for r in part]
        prompts = encode_questions(adapter, [e.question for e in exs], cfg)
        gens = generate(adapter, prompts, [zeroed] * len(part), cfg.generation, progress=False)
        for r, e, g in zip(part, exs, gens):
            r["modal"] = _graded(task, g, e, corrupted_rows=rows).to_dict()


def nothing_evaluated(summary: dict[str, Any], out_dir: Any) -> DataError:
    """The error of a run whose every question was skipped (``summary["n"] == 0``); it carries
    ``nothing_evaluated = True`` so a sharded run can merge its ranks before judging the whole."""
    s = summary.get("skipped") or {}
    kept = f" Their records and the summary are in {out_dir}." if out_dir is not None else ""
    err = DataError(
        f"Nothing was evaluated: all {s.get('n', 0)} question(s) were skipped ("
        f"{s.get('reason', 'no reason recorded')}), so there is no accuracy to report.{kept} "
        "Lower max_new_tokens, shorten the questions, or use a model with a longer context.")
    err.nothing_evaluated = True
    return err
