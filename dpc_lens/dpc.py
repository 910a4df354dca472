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

Records are plain JSON-safe dicts, appended to a JSONL file as they are produced, so a killed
run can be resumed (:func:`run_dpc` with ``out_dir`` and ``resume=True``).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .detector import DetectorConfig, DetectorInputs, TriggerDecision, dynamic_trigger
from .errors import ConfigError, DataError, InputError
from .generation import Generation, GenerationConfig, encode_prompts, generate
from .model import as_adapter
from .patching import CorruptionConfig, corrupt_soft_prompt, random_rows
from .saliency import SaliencyConfig, compute_saliency
from .segments import PromptBatch, SegmentLayout
from .soft_prompt import SoftPrompt
from .tasks import answer_of
from .tasks.base import Example

__all__ = [
    "DPCConfig",
    "Analysis",
    "analyse",
    "run_dpc",
    "summarize",
    "read_records",
    "DPC_FLOWS",
    "BASELINES",
]

DPC_FLOWS = ("soft->question", "soft->rationale", "question->rationale")
BASELINES = ("base", "always", "random")


@dataclass(frozen=True)
class DPCConfig:
    """Every knob of the DPC pipeline (saved next to each result).

    Attributes:
        detector: the Dynamic Trigger's :class:`~dpc_lens.detector.DetectorConfig`.
        corruption: how located tokens are corrupted (zero by default; gamma elimination).
        generation: decoding (greedy by default).
        template: how a question becomes the prompt text (``{question}`` is replaced).
        add_bos: put the tokenizer's BOS after the soft prompt (PEFT's order).
        baselines: which of ``base``, ``always``, ``random`` to also run.
        seed: seed of the random-corruption baseline.
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

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ConfigError(f"template must contain '{{question}}', got {self.template!r}.")
        object.__setattr__(self, "baselines", tuple(self.baselines))
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"Unknown baselines {bad}; choose from {BASELINES}.")
        if self.saliency_batch_size < 1:
            raise ConfigError("saliency_batch_size must be >= 1.")

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPCConfig":
        d = dict(d)
        known = {"detector", "corruption", "generation", "template", "add_bos", "baselines", "seed",
                 "saliency_batch_size", "fp32"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown DPCConfig fields {unknown}; expected some of {sorted(known)}.")
        return cls(
            detector=DetectorConfig.from_dict(d.pop("detector", {})),
            corruption=CorruptionConfig(**d.pop("corruption", {})),
            generation=GenerationConfig.from_dict(d.pop("generation", {})),
            baselines=tuple(d.pop("baselines", BASELINES)),
            **d,
        )

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DPCConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_dict(json.load(fh))
        except FileNotFoundError:
            raise DataError(f"DPC config {os.fspath(path)!r} does not exist.") from None
        except (json.JSONDecodeError, TypeError) as exc:
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


def _prompt_ids(adapter: Any, questions: Sequence[str], cfg: DPCConfig) -> list[list[int]]:
    return encode_prompts(adapter, [cfg.template.format(question=q) for q in questions], add_bos=cfg.add_bos)


def _detector_inputs(res: Any, b: int, n_soft: int) -> DetectorInputs:
    lay = res.layouts[b]
    s0, s1 = lay.spans["soft"]
    r0, r1 = lay.spans["rationale"]
    rows = res.row_sums[:, b, r0:r1]
    tot = res.row_totals[:, b, r0:r1]
    share = torch.where(tot > 0, rows / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(tot))
    return DetectorInputs(
        soft_columns=res.column_sums[:, b, s0:s1].double().cpu(),
        soft_columns_norm=res.column_shares[:, b, s0:s1].double().cpu(),
        rationale_rows=(rows / n_soft).double().cpu(),
        rationale_rows_norm=share.clamp(0.0, 1.0).double().cpu(),
    )


def analyse(
    model: Any,
    soft_prompt: SoftPrompt,
    questions: Sequence[str],
    config: DPCConfig | None = None,
    *,
    generations: Sequence[Generation] | None = None,
    progress: bool = True,
) -> list[Analysis]:
    """Generate with the soft prompt (unless ``generations`` are given) and measure saliency.

    One teacher-forced forward + backward per batch of ``config.saliency_batch_size`` examples;
    the loss is the mean NLL of the generated rationale tokens.
    """
    cfg = config or DPCConfig()
    adapter = as_adapter(model)
    prompts = _prompt_ids(adapter, questions, cfg)
    if generations is None:
        generations = generate(adapter, prompts, soft_prompt, cfg.generation, progress=progress, desc="PT generate")
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
    step = cfg.saliency_batch_size
    for s in tqdm(range(0, len(todo), step), desc="saliency", disable=not progress, leave=False):
        idx = todo[s:s + step]
        seqs, lays = [], []
        for i in idx:
            p, g = prompts[i], list(generations[i].token_ids)
            spans = {"question": (bos, len(p)), "rationale": (len(p), len(p) + len(g))}
            if bos:
                spans = {"bos": (0, 1), **spans}
            seqs.append(list(p) + g)
            lays.append(SegmentLayout(spans, len(p) + len(g)))
        batch = PromptBatch.build(adapter, seqs, lays, soft_prompt)
        res = compute_saliency(adapter, batch, sal_cfg)
        means = res.flows(DPC_FLOWS)
        for b, i in enumerate(idx):
            flows = {k: [float(x) for x in v[:, b].tolist()] for k, v in means.items()}
            out[i] = Analysis(tuple(prompts[i]), generations[i], _detector_inputs(res, b, batch.n_soft),
                              flows, float(res.loss[b]))
    return [a for a in out if a is not None]


def _answer_record(task: Any, gen: Generation, ex: Example) -> dict[str, Any]:
    pred = _extract(task, gen.text, ex)
    return {"rationale": gen.text, "answer": pred, "correct": bool(task.is_correct(pred, ex.answer)),
            "stop_reason": gen.stop_reason}


def _extract(task: Any, text: str, ex: Example) -> str | None:
    return answer_of(task, text, ex)


def _safe_trigger(inputs: DetectorInputs | None, det: DetectorConfig) -> TriggerDecision | None:
    """The trigger for one instance; ``None`` (not fired) when it is undefined for that instance
    (no rationale, or every counted soft column is exactly zero), so one instance cannot abort a
    whole run. The record's ``trigger`` is then null."""
    if inputs is None:
        return None
    try:
        return dynamic_trigger(inputs, det)
    except InputError:
        return None


def random_rows_for(example_id: str, n_soft: int, k: int, seed: int) -> list[int]:
    """The random-corruption baseline's rows for one example: seeded by ``(seed, example id)``,
    so a resumed or reordered run draws the same rows for the same question."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(str(example_id).encode())) % (2**63))
    return random_rows(n_soft, k, g)


def _process_chunk(adapter, soft, exs: Sequence[Example], task, cfg: DPCConfig, progress) -> list[dict]:
    t0 = time.perf_counter()
    questions = [e.question for e in exs]
    prompts = _prompt_ids(adapter, questions, cfg)
    pt_gen = generate(adapter, prompts, soft, cfg.generation, progress=False)
    t_gen = time.perf_counter() - t0
    t1 = time.perf_counter()
    analyses = analyse(adapter, soft, questions, cfg, generations=pt_gen, progress=False)
    t_sal = time.perf_counter() - t1
    decisions = [_safe_trigger(a.inputs, cfg.detector) for a in analyses]
    k = cfg.detector.top_k
    # every instance's located tokens (for 'always'), the fired ones for DPC
    located = []
    for a, d in zip(analyses, decisions):
        if d is not None:
            located.append(list(d.accumulation.top_indices[:k]))
        else:
            located.append([])
    need_regen = {i for i, d in enumerate(decisions) if d is not None and d.fired}
    if "always" in cfg.baselines:
        need_regen |= {i for i, rows in enumerate(located) if rows}
    t2 = time.perf_counter()
    regen: dict[int, Generation] = {}
    if need_regen:
        order = sorted(need_regen)
        softs = [corrupt_soft_prompt(soft, located[i], cfg.corruption) for i in order]
        gens = generate(adapter, [prompts[i] for i in order], softs, cfg.generation, progress=False)
        regen = dict(zip(order, gens))
    t_regen = time.perf_counter() - t2
    base_gen = rand_gen = None
    rand_rows: list[list[int]] = []
    if "base" in cfg.baselines:
        base_gen = generate(adapter, prompts, None, cfg.generation, progress=False)
    if "random" in cfg.baselines:
        rand_rows = [random_rows_for(e.id, soft.n_tokens, k, cfg.seed) for e in exs]
        softs = [corrupt_soft_prompt(soft, r, cfg.corruption) for r in rand_rows]
        rand_gen = generate(adapter, prompts, softs, cfg.generation, progress=False)
    records = []
    n = len(exs)
    for i, (ex, a, d) in enumerate(zip(exs, analyses, decisions)):
        pt = _answer_record(task, a.generation, ex)
        fired = bool(d is not None and d.fired)
        dpc = dict(_answer_record(task, regen[i], ex)) if fired else dict(pt)
        dpc.update(fired=fired, corrupted_rows=located[i] if fired else [])
        rec: dict[str, Any] = {
            "id": ex.id,
            "question": ex.question,
            "gold": ex.answer,
            "pt": pt,
            "dpc": dpc,
            "final_answer": dpc["answer"],
            "final_correct": dpc["correct"],
            "trigger": d.to_dict() if d is not None else None,
            "located_rows": located[i],
            "flows": a.flows,
            "loss": a.loss,
            "timings": {"pt_generate_s": t_gen / n, "saliency_s": t_sal / n,
                        "regenerate_s": (t_regen / max(len(need_regen), 1)) if i in need_regen else 0.0},
        }
        if base_gen is not None:
            rec["base"] = _answer_record(task, base_gen[i], ex)
        if "always" in cfg.baselines:
            rec["always"] = _answer_record(task, regen[i], ex) if i in regen else dict(pt)
            rec["always"]["corrupted_rows"] = located[i]
        if rand_gen is not None:
            rec["random"] = _answer_record(task, rand_gen[i], ex)
            rec["random"]["corrupted_rows"] = rand_rows[i]
        records.append(rec)
    return records


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a (possibly interrupted) ``records.jsonl``; a torn last line is dropped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # a write cut by a kill: redo that record
                break
            raise DataError(f"{os.fspath(path)}: line {n} is not valid JSON; the records file is corrupt.") from None
    return out


def _rewrite_clean(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


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
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run DPC and its baselines over ``examples``; return ``(records, summary)``.

    With ``out_dir``, records are appended to ``out_dir/records.jsonl`` as each chunk finishes,
    ``config.json`` and ``summary.json`` are written; ``resume=True`` skips the ids already in
    the file (no record lost or duplicated). Without ``resume`` an existing file is an error.
    ``chunk_size`` questions are processed (and appended) together; default four generation
    batches.
    """
    cfg = config or DPCConfig()
    adapter = as_adapter(model)
    if not isinstance(soft_prompt, SoftPrompt):
        raise InputError(f"soft_prompt must be a SoftPrompt, got {type(soft_prompt).__name__}.")
    soft_prompt.for_model(adapter)  # width check before any work
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise InputError("Example ids must be unique (resume relies on them).")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}.")
    done: list[dict] = []
    rec_path = None
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        rec_path = os.path.join(out_dir, "records.jsonl")
        if os.path.exists(rec_path) and not resume:
            raise InputError(
                f"{rec_path} already exists. Pass resume=True (--resume) to continue that run, or "
                "choose another output directory."
            )
        cfg_path = os.path.join(out_dir, "config.json")
        if resume and os.path.exists(rec_path) and os.path.exists(cfg_path):
            old_cfg = DPCConfig.load(cfg_path).to_dict()
            new_cfg = cfg.to_dict()
            for d in (old_cfg, new_cfg):  # batch sizes do not change any record
                d.pop("saliency_batch_size", None)
                d["generation"].pop("batch_size", None)
            if old_cfg != new_cfg:
                changed = sorted(k for k in new_cfg if old_cfg.get(k) != new_cfg.get(k))
                raise InputError(
                    f"Cannot resume {out_dir}: its records were made with another config (differs "
                    f"in {changed}). Resume with the same config (--config {cfg_path}) or start a "
                    "new output directory."
                )
        cfg.save(cfg_path)
        if resume:
            done = [r for r in read_records(rec_path) if r.get("id") in set(ids)]
            _rewrite_clean(rec_path, read_records(rec_path))
    done_ids = {r["id"] for r in done}
    todo = [e for e in examples if e.id not in done_ids]
    # chunks of several generation batches: the triggered questions of a chunk are regenerated
    # together, so their regeneration fills batches instead of paying a whole decode loop for a
    # few rows (measured: DPC/vanilla time 2.17 with one-batch chunks on the shipped reasoner)
    step = chunk_size or 4 * max(cfg.generation.batch_size, 1)
    new: list[dict] = []
    bar = tqdm(total=len(todo), desc="DPC", disable=not progress)
    try:
        for s in range(0, len(todo), step):
            recs = _process_chunk(adapter, soft_prompt, todo[s:s + step], task, cfg, progress)
            if rec_path is not None:
                with open(rec_path, "a", encoding="utf-8") as fh:
                    for r in recs:
                        fh.write(json.dumps(r) + "\n")
            for r in recs:
                if on_record is not None:
                    on_record(r)
            new.extend(recs)
            bar.update(len(recs))
    finally:
        bar.close()
    by_id = {r["id"]: r for r in done + new}
    records = [by_id[i] for i in ids if i in by_id]
    summary = summarize(records)
    if out_dir is not None:
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return records, summary


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of every method, trigger rate, flips against vanilla PT, the ceiling and oracle.

    * ``ceiling``: instances right without the soft prompt and wrong with it (what any trigger
      could at most recover); ``pt_only``: the other way round.
    * ``oracle``: accuracy of the best of the base and PT answers per instance.
    """
    n = len(records)
    if n == 0:
        return {"n": 0}
    acc = lambda key: sum(bool(r[key]["correct"]) for r in records if key in r) / n  # noqa: E731
    out: dict[str, Any] = {"n": n, "accuracy": {"pt": acc("pt"), "dpc": acc("dpc")}}
    for b in BASELINES:
        if all(b in r for r in records):
            out["accuracy"][b] = acc(b)
    fired = [r for r in records if r["dpc"]["fired"]]
    out["trigger_rate"] = len(fired) / n
    out["flips"] = {
        "wrong_to_right": sum(1 for r in fired if not r["pt"]["correct"] and r["dpc"]["correct"]),
        "right_to_wrong": sum(1 for r in fired if r["pt"]["correct"] and not r["dpc"]["correct"]),
    }
    located = [r for r in records if r.get("located_rows")]
    out["sink_rate"] = (sum(1 for r in located if r["located_rows"][0] == 0) / len(located)) if located else None
    if all("base" in r for r in records):
        out["ceiling"] = sum(1 for r in records if r["base"]["correct"] and not r["pt"]["correct"])
        out["pt_only"] = sum(1 for r in records if r["pt"]["correct"] and not r["base"]["correct"])
        out["accuracy"]["oracle"] = sum(1 for r in records if r["base"]["correct"] or r["pt"]["correct"]) / n
    return out

