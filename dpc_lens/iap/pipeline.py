"""The IAP pipeline (SPEC section 4): every (question, prompt) pair generated and scored once, then
every strategy read off that cache.

:func:`encode_pair` builds the ``[question; prompt]`` layout (chat template included);
:func:`score_pairs` generates a rationale per pair and measures the three IAP flows over
``[question; prompt; rationale]`` with the shared driver :func:`dpc_lens.analysis.measure_flows`;
:func:`run_iap` caches one (answer, flows) record per pair in a resumable ``pairs.jsonl`` (the
one resume guard of :mod:`dpc_lens.runs`), which :func:`evaluate` reads for IAP-ss, IAP-mv and the
baselines; :func:`calibrate_iap` fits the standardiser and lam, tau, m on a dev split with the
model-free :func:`~dpc_lens.iap.calibration.calibrate`. The model-free half of a run (the
standardiser fit, :func:`evaluate`, the score diagnostics and :func:`format_summary`) lives in
:mod:`dpc_lens.iap.summary` and is re-exported here.

Cost accounting: IAP-ss can stop early, so its cost is ``n_tried`` prompts per question; IAP-mv
always needs the whole pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, no_type_check

from dpc_lens.errors import ConfigError, InputError
from dpc_lens.layers import layer_spec_json
from dpc_lens.runs import append_jsonl, read_json, resume_run, rewrite_jsonl, write_json
from dpc_lens.validate import is_int as _is_int

from .calibration import CalibrationResult, calibrate
from .pool import _JSON_VERSION, IAP_FLOWS, CandidatePrompt, PromptPool
from .records import PairRecord
from .score import FlowStandardizer, IAPConfig
from .summary import (  # noqa: F401  (re-exported: the model-free half of a run)
    _question_groups,
    choice_diagnostics,
    evaluate,
    fit_standardizer,
    format_summary,
    question_records,
)

if TYPE_CHECKING:  # pandas is imported lazily, only by to_dataframe()
    pass

__all__ = [
    "calibrate_and_run_iap",
    "IAPRunConfig",
    "encode_pair",
    "PairRecord",
    "score_pairs",
    "fit_standardizer",
    "question_records",
    "evaluate",
    "IAPCalibration",
    "calibrate_iap",
    "run_iap",
    "format_summary",
]

# Classes marked ``@no_type_check`` validate and coerce raw user input in ``__post_init__``
# (lists -> tuples, strings -> prompts, ints -> floats) and explain what is wrong and how to fix
# it. The run-time type checker the test suite installs (jaxtyping's import hook) would otherwise
# check the raw ``__init__`` arguments against the *stored* field types and pre-empt those
# messages with a generic TypeCheckError. None of them has a tensor shape to check.


# =============================================================================================
# The model part: generate and score every (question, prompt) pair once, then every strategy
# =============================================================================================
#
# Everything above is model-free. Below, the pipeline (SPEC section 4) runs the model: for each
# (question, prompt) pair one greedy generation and one saliency pass over
# ``[question; prompt; rationale]``; the three IAP flows are kept per layer (for figures) and
# reduced with the config's layer sets (for the score). IAP-ss, IAP-mv and the baselines are
# then read off that cache, so a pair is generated and scored once however many strategies,
# thresholds or calibration grid points are evaluated.

#: Flow names in the order they are stored in pair records.
_PAIR_SEGMENTS = ("question", "prompt", "rationale")
ChatTemplateMode = Literal["auto", "never", "always"]


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class IAPRunConfig:
    """Every knob of an IAP run (saved as ``config.json`` next to its results).

    Attributes:
        ss: the :class:`IAPConfig` of IAP-ss (lam, mu, tau). Its layer sets are the run's layer
            sets: they reduce the per-layer flows of every pair to the one number per flow that
            is standardised and scored.
        mv: the :class:`IAPConfig` of IAP-mv (lam, mu, m); ``None``: the same as ``ss``.
            Calibration may prefer a different lam for each strategy. It must have the same
            layer sets as ``ss`` (both read the same cached, reduced flows).
        generation: decoding of the rationales (greedy by default).
        add_bos: put the tokenizer's BOS first (own segment ``bos``, outside every flow). With a
            chat template, BOS is added only when the templated text does not already start
            with it.
        chat_template: ``"auto"`` uses the tokenizer's chat template when it has one,
            ``"never"`` feeds the plain text, ``"always"`` requires a template.
        separator: text put between the question and the prompt (plain text and chat user turn).
        per_head: also keep per-layer x per-head flows (IAP's layer x head maps). This is a
            second saliency pass per pair: the score uses ``I_l = |sum_h ...|`` (abs after the
            head sum, SPEC section 2), which per-head maps (abs per head) cannot give back.
        saliency_batch_size: pairs per saliency pass.
        fp32: accumulate saliency in float32 under bf16/fp16 models.
    """

    ss: IAPConfig = field(default_factory=IAPConfig)
    mv: IAPConfig | None = None
    generation: Any = None  # GenerationConfig; ``None`` -> GenerationConfig() (lazy import)
    add_bos: bool = True
    chat_template: ChatTemplateMode = "auto"
    separator: str = " "
    per_head: bool = False
    saliency_batch_size: int = 8
    fp32: bool = True

    def __post_init__(self) -> None:
        from dpc_lens.generation import GenerationConfig

        if isinstance(self.ss, Mapping):
            object.__setattr__(self, "ss", IAPConfig.from_dict(self.ss))
        if not isinstance(self.ss, IAPConfig):
            raise ConfigError(f"IAPRunConfig.ss must be an IAPConfig, got {type(self.ss).__name__}.")
        if isinstance(self.mv, Mapping):
            object.__setattr__(self, "mv", IAPConfig.from_dict(self.mv))
        if self.mv is None:
            object.__setattr__(self, "mv", self.ss)
        if not isinstance(self.mv, IAPConfig):
            raise ConfigError(f"IAPRunConfig.mv must be an IAPConfig or None, got {type(self.mv).__name__}.")
        for name in ("qp_layers", "qr_layers", "pr_layers"):
            if getattr(self.ss, name) != getattr(self.mv, name):
                raise ConfigError(
                    f"IAPRunConfig: ss.{name} = {getattr(self.ss, name)!r} but mv.{name} = "
                    f"{getattr(self.mv, name)!r}; both strategies read the same reduced flows, so "
                    "give them the same layer sets (e.g. replace(ss, lam=..., m=...) for mv)."
                )
        gen = self.generation
        if gen is None:
            gen = GenerationConfig()
        elif isinstance(gen, Mapping):
            gen = GenerationConfig.from_dict(dict(gen))
        if not isinstance(gen, GenerationConfig):
            raise ConfigError(
                f"IAPRunConfig.generation must be a GenerationConfig, got {type(gen).__name__}."
            )
        object.__setattr__(self, "generation", gen)
        if self.chat_template not in ("auto", "never", "always"):
            raise ConfigError(
                f"IAPRunConfig.chat_template must be 'auto', 'never' or 'always', got "
                f"{self.chat_template!r}."
            )
        if not isinstance(self.separator, str):
            raise ConfigError(f"IAPRunConfig.separator must be a string, got {self.separator!r}.")
        if not _is_int(self.saliency_batch_size) or self.saliency_batch_size < 1:
            raise ConfigError(
                f"IAPRunConfig.saliency_batch_size must be an int >= 1, got {self.saliency_batch_size!r}."
            )
        for name in ("add_bos", "per_head", "fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"IAPRunConfig.{name} must be True or False, got {getattr(self, name)!r}.")

    def pair_settings(self) -> dict[str, Any]:
        """The settings a cached (question, prompt) record depends on (a resumed run must match;
        batch sizes are left out: every row generates and scores what it would alone)."""
        gen = {k: v for k, v in self.generation.to_dict().items() if k != "batch_size"}
        return {
            "generation": gen,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
            "separator": self.separator,
            "per_head": self.per_head,
            "fp32": self.fp32,
            "layer_sets": {n: layer_spec_json(getattr(self.ss, n))
                           for n in ("qp_layers", "qr_layers", "pr_layers")},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "IAPRunConfig",
            "version": _JSON_VERSION,
            "ss": self.ss.to_dict(),
            "mv": self.mv.to_dict(),
            "generation": self.generation.to_dict(),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
            "separator": self.separator,
            "per_head": self.per_head,
            "saliency_batch_size": self.saliency_batch_size,
            "fp32": self.fp32,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IAPRunConfig:
        d = {k: v for k, v in dict(d).items() if k not in ("kind", "version")}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"IAPRunConfig.from_dict: unknown field(s) {sorted(unknown)}; known fields are "
                f"{sorted(cls.__dataclass_fields__)}."
            )
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> IAPRunConfig:
        d = read_json(path, "IAP config")
        return cls.from_dict(d)


def _as_run_config(config: IAPRunConfig | IAPConfig | None) -> IAPRunConfig:
    if config is None:
        return IAPRunConfig()
    if isinstance(config, IAPRunConfig):
        return config
    if isinstance(config, Mapping):  # a dict of IAPRunConfig's fields (what config.json holds)
        from dpc_lens.validate import as_config

        return as_config(config, IAPRunConfig, extra_keys=("kind", "version"))
    if isinstance(config, IAPConfig):
        return IAPRunConfig(ss=config)
    raise ConfigError(
        f"config must be an IAPRunConfig or an IAPConfig, got {type(config).__name__}."
    )


# ---------------------------------------------------------------------------------------------
# The [question; prompt; rationale] layout
# ---------------------------------------------------------------------------------------------


def encode_pair(
    tokenizer: Any,
    question: str,
    prompt: str,
    *,
    add_bos: bool = True,
    chat_template: ChatTemplateMode = "auto",
    separator: str = " ",
) -> tuple[list[int], dict[str, tuple[int, int]], bool]:
    """Token ids of the generation input for one pair, the ``question``/``prompt`` spans in
    them, and whether a chat template was applied.

    How spans are found: the text the model sees is built first — ``question + separator +
    prompt``, or, with a chat template, ``apply_chat_template([{"role": "user", "content":
    question + separator + prompt}], add_generation_prompt=True)`` — and tokenised *once* with
    character offsets, so the ids are exactly those of the natural text (BPE merges across
    the question/prompt boundary included). Each token goes to the segment that holds its first
    non-space character (offsets of SentencePiece/Metaspace tokens include the space before the
    word); template tokens (role markers, ...) belong to no segment and enter no flow. Slow
    tokenizers (no offsets) fall back to tokenising the two pieces separately and concatenating
    (no template then). The rationale is appended later as the generated ids themselves.

    Raises:
        InputError: ``chat_template="always"`` without a template, a template that does not
            keep the user text verbatim (then pass ``chat_template="never"``), or an empty span.
    """
    template = getattr(tokenizer, "chat_template", None)
    if chat_template == "always" and not template:
        raise InputError(
            "chat_template='always' but the tokenizer has no chat template; set "
            "tokenizer.chat_template, or use chat_template='auto' / 'never'."
        )
    use_template = bool(template) and chat_template != "never"
    content = question + separator + prompt
    if use_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        c0 = text.find(content)
        if c0 < 0:
            raise InputError(
                "The chat template does not keep the user text verbatim (it strips or rewrites "
                "it), so the question and prompt spans cannot be located in the templated text; "
                "use chat_template='never', or a question/prompt without leading/trailing spaces."
            )
    else:
        text, c0 = content, 0
    char_spans = {
        "question": (c0, c0 + len(question)),
        "prompt": (c0 + len(question) + len(separator), c0 + len(content)),
    }
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise InputError("add_bos=True but the tokenizer has no BOS token; set add_bos=False.")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [int(t) for t in enc["input_ids"]]
        owner: list[str | None] = []
        for s, e in enc["offset_mapping"]:
            first = next((i for i in range(s, e) if not text[i].isspace()), s)
            owner.append(next((n for n, (a, b) in char_spans.items() if a <= first < b), None))
        spans: dict[str, tuple[int, int]] = {}
        for name in ("question", "prompt"):
            pos = [i for i, o in enumerate(owner) if o == name]
            if not pos:
                raise InputError(
                    f"encode_pair: the {name} {question if name == 'question' else prompt!r} got no "
                    "token; give a non-empty text."
                )
            spans[name] = (pos[0], pos[-1] + 1)
    else:
        if use_template:
            raise InputError(
                "A chat template needs a fast tokenizer (character offsets locate the spans); "
                "use chat_template='never' or load the fast tokenizer."
            )
        q_ids = list(tokenizer(question, add_special_tokens=False)["input_ids"])
        p_ids = list(tokenizer(separator + prompt, add_special_tokens=False)["input_ids"])
        ids = q_ids + p_ids
        spans = {"question": (0, len(q_ids)), "prompt": (len(q_ids), len(ids))}
    if add_bos and not (use_template and ids and ids[0] == bos):
        ids = [int(bos)] + ids
        spans = {"bos": (0, 1), **{n: (a + 1, b + 1) for n, (a, b) in spans.items()}}
    return ids, spans, use_template


# ---------------------------------------------------------------------------------------------
# Scoring pairs
# ---------------------------------------------------------------------------------------------


def _score_items(
    adapter: Any,
    items: Sequence[tuple[int, str, int, CandidatePrompt]],
    cfg: IAPRunConfig,
    *,
    progress: bool,
    desc: str = "IAP pairs",
) -> list[PairRecord]:
    """Generate and score ``(question_index, question, prompt_index, prompt)`` items: one
    generation each (batched by ``cfg.generation.batch_size``), one saliency pass per
    ``cfg.saliency_batch_size`` items (two with ``per_head``)."""
    from dpc_lens.analysis import measure_flows
    from dpc_lens.generation import generate
    from dpc_lens.saliency import SaliencyConfig
    from dpc_lens.segments import SegmentLayout

    tok = adapter.tokenizer
    if tok is None:
        raise InputError("IAP needs a model with a tokenizer (questions and prompts are text).")
    encoded = [
        encode_pair(tok, q, p.text, add_bos=cfg.add_bos, chat_template=cfg.chat_template,
                    separator=cfg.separator)
        for _, q, _, p in items
    ]
    gens = generate(adapter, [ids for ids, _, _ in encoded], None, cfg.generation,
                    progress=progress, desc=f"{desc}: generate")
    layer_sets = {k: list(v) for k, v in
                  cfg.ss.layers(adapter.n_layers, adapter.attention_windows).items()}
    sal_cfg = SaliencyConfig(loss_segments=("rationale",), flow_segments=_PAIR_SEGMENTS, fp32=cfg.fp32)
    head_cfg = replace(sal_cfg, per_head=True) if cfg.per_head else None
    flows: list[dict[str, list[float]]] = [{} for _ in items]
    heads: list[dict[str, list[list[float]]] | None] = [None] * len(items)
    losses: list[float | None] = [None] * len(items)
    layers: tuple[int, ...] = ()
    todo = [i for i, g in enumerate(gens) if len(g.token_ids) > 0]
    seqs, lays = [], []
    for i in todo:
        ids, spans, _ = encoded[i]
        r = list(gens[i].token_ids)
        seqs.append(ids + r)
        n = len(ids) + len(r)
        lays.append(SegmentLayout({**spans, "rationale": (len(ids), n)}, n))
    measured = measure_flows(adapter, seqs, lays, IAP_FLOWS, sal_cfg, batch_size=cfg.saliency_batch_size,
                             per_head_config=head_cfg, progress=progress, desc=f"{desc}: saliency")
    for i, m in zip(todo, measured, strict=True):
        flows[i], losses[i], heads[i], layers = m.flows, m.loss, m.per_head, m.layers
    out = []
    for i, (qi, _, pi, p) in enumerate(items):
        ids, spans, templated = encoded[i]
        g = gens[i]
        means: dict[str, float] = {}
        if flows[i]:
            pos = {layer: k for k, layer in enumerate(layers)}
            for n in IAP_FLOWS:
                # a layer where the flow is structurally empty (a sliding window that keeps the
                # rationale from the prompt: NaN, and the saliency pass said so) is left out
                vals = [v for v in (flows[i][n][pos[layer]] for layer in layer_sets[n]) if v == v]
                means[n] = float(sum(vals) / len(vals)) if vals else float("nan")
        n_tok = {n: b - a for n, (a, b) in spans.items()}
        n_tok["rationale"] = len(g.token_ids)
        n_tok["total"] = len(ids) + len(g.token_ids)
        out.append(PairRecord(
            question_index=qi, prompt_index=pi, prompt=p.text, group=p.group, rationale=g.text,
            rationale_ids=tuple(int(t) for t in g.token_ids), stop_reason=g.stop_reason,
            flows=flows[i], flow_means=means, layer_sets=layer_sets, n_tokens=n_tok, loss=losses[i],
            chat_template=templated, layers=tuple(layers) if flows[i] else (),
            flows_per_head=heads[i],
        ))
    return out


def _as_pool(pool: PromptPool | Sequence[Any] | None) -> PromptPool:
    if pool is None:
        return PromptPool.default()
    return pool if isinstance(pool, PromptPool) else PromptPool(pool)


def score_pairs(
    model: Any,
    questions: Sequence[str],
    pool: PromptPool | Sequence[Any] | None,
    config: IAPConfig | None = None,
    *,
    generation_config: Any = None,
    add_bos: bool = True,
    per_head: bool = False,
    chat_template: ChatTemplateMode = "auto",
    separator: str = " ",
    saliency_batch_size: int = 8,
    progress: bool | None = None,
) -> list[PairRecord]:
    """Generate a rationale for every (question, prompt) pair and measure its IAP flows.

    For each pair: greedy generation from ``[question; prompt]`` (:func:`encode_pair` gives the
    layout), then one teacher-forced forward + backward over ``[question; prompt; rationale]``
    with the loss ``L = mean NLL of the rationale tokens`` and, per layer ``l``,
    ``I_l = |sum_h A_{h,l} * dL/dA_{h,l}|`` reduced to the segment flows

        flow_l(S -> T) = mean of I_l(i, j) over i in T, j in S, j < i

    for ``question->prompt``, ``question->rationale`` and ``prompt->rationale``. Each flow is
    kept per layer and averaged over its layer set from ``config`` (``qp_layers``, ...).
    Generation is batched by ``generation_config.batch_size``, saliency by
    ``saliency_batch_size``; a pair whose rationale is empty gets no flows (``scored`` False).

    Returns one :class:`PairRecord` per pair, question-major (all prompts of question 0 in pool
    order, then question 1, ...).
    """
    from dpc_lens.model import as_adapter

    if isinstance(questions, str):
        raise InputError(
            "score_pairs: questions must be a list of strings, got one string; wrap it in a list."
        )
    pool = _as_pool(pool)
    cfg = IAPRunConfig(ss=config or IAPConfig(), generation=generation_config, add_bos=add_bos,
                       chat_template=chat_template, separator=separator, per_head=per_head,
                       saliency_batch_size=saliency_batch_size)
    items = [(qi, q, pi, p) for qi, q in enumerate(questions) for pi, p in enumerate(pool)]
    if not items:
        return []
    return _score_items(as_adapter(model), items, cfg, progress=progress)


# ---------------------------------------------------------------------------------------------
# Running over a data set: resumable pairs, standardisation, strategies, summary
# ---------------------------------------------------------------------------------------------


def _pair_key(rec: Mapping[str, Any]) -> tuple[str, str]:
    return (str(rec["id"]), str(rec["prompt"]))


def _pair_json(rec: PairRecord, ex: Any, task: Any) -> dict[str, Any]:
    from dpc_lens.evaluation import grade

    ans, correct = grade(task, rec.rationale, ex)
    d = rec.to_dict()
    d.pop("question_index")
    return {
        "id": ex.id,
        "question": ex.question,
        "gold": ex.answer,
        **d,
        "answer": ans,
        "correct": correct,
        "scored": rec.scored,
    }


def _collect_pairs(
    adapter: Any,
    examples: Sequence[Any],
    task: Any,
    pool: PromptPool,
    cfg: IAPRunConfig,
    *,
    out_dir: str | Path | None,
    resume: bool,
    progress: bool,
    desc: str,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every (example, prompt) pair as a JSON record, computing only the ones not on disk.

    Returns the records in question-major pool order and the work done now
    (``generations``, ``backward_passes``, ``saliency_passes``, ``pairs_reused``).
    """
    from dpc_lens.progress import bar as progress_bar

    examples = list(examples)
    if not examples:
        raise InputError(f"{desc}: no examples; give at least one question.")
    from dpc_lens.generation import check_room

    check_room(adapter, cfg.generation.max_new_tokens, int(cfg.add_bos), "question (BOS)")
    ids = [str(e.id) for e in examples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"{desc}: example ids must be unique (resume relies on them); repeated: {dup[:5]}.")
    done: dict[tuple[str, str], dict[str, Any]] = {}
    path = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "pairs.jsonl"
        records = resume_run(
            path, resume=resume, settings_path=out / "pair_settings.json", settings=cfg.pair_settings(),
            exists_message=(f"{path} already exists. Pass resume=True (--resume) to continue that "
                            "run, or choose another output directory."),
            mismatch_message=lambda old, new: (
                f"{out}: the pairs on disk were made with other settings ({old}) than this run's "
                f"({new}); resume with the same generation/layout/layer settings or use another "
                "output directory."),
            key=_pair_key, redone="those pairs are redone",
        )
        for r in records:
            done.setdefault(_pair_key(r), r)
    items = []
    for qi, ex in enumerate(examples):
        for pi, p in enumerate(pool):
            if (str(ex.id), p.text) not in done:
                items.append((qi, ex.question, pi, p))
    cost = {"generations": 0, "backward_passes": 0, "saliency_passes": 0,
            "pairs_reused": len(examples) * len(pool) - len(items)}
    step = max(cfg.generation.batch_size, cfg.saliency_batch_size)
    bar = progress_bar(total=len(items), progress=progress, desc=desc)
    try:
        for s in range(0, len(items), step):
            chunk = items[s:s + step]
            recs = _score_items(adapter, chunk, cfg, progress=False, desc=desc)
            rows = [_pair_json(r, examples[r.question_index], task) for r in recs]
            if path is not None:
                append_jsonl(path, rows)
            for row in rows:
                done[_pair_key(row)] = row
            n_scored = sum(1 for r in recs if r.scored)
            per_pass = 2 if cfg.per_head else 1
            cost["generations"] += len(recs)
            cost["backward_passes"] += n_scored * per_pass
            cost["saliency_passes"] += -(-n_scored // cfg.saliency_batch_size) * per_pass
            bar.update(len(chunk))
    finally:
        bar.close()
    ordered = [done[(str(ex.id), p.text)] for ex in examples for p in pool]
    for flat, r in enumerate(ordered):  # prompt index in *this* pool (a resumed pool may be reordered)
        r["prompt_index"] = flat % len(pool)
    return ordered, cost


@dataclass(frozen=True)
class IAPCalibration:
    """What :func:`calibrate_iap` fitted on a dev split.

    Attributes:
        standardizer: z-scoring fitted on the dev pairs' layer-set flow means.
        calibration: the model-free :func:`calibrate` result (best lam/tau, lam/m, sensitivity).
        config: the run config with the chosen values (``ss`` from ``best_ss``, ``mv`` from
            ``best_mv``), ready for :func:`run_iap`.
        pairs: the dev pair records (JSON dicts); ``cost``: work done on the dev split.
    """

    standardizer: FlowStandardizer
    calibration: CalibrationResult
    config: IAPRunConfig
    pairs: tuple[Mapping[str, Any], ...]
    cost: Mapping[str, int]

    def save(self, out_dir: str | Path) -> None:
        """``standardizer.json``, ``calibration.json`` and ``config.json`` in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.standardizer.save(out / "standardizer.json")
        self.calibration.save(out / "calibration.json")
        self.config.save(out / "config.json")


DEFAULT_LAM_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_TAU_GRID: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
DEFAULT_M_GRID: tuple[int, ...] = (1, 3, 5)


def calibrate_iap(
    model: Any,
    examples: Sequence[Any],
    task: Any,
    pool: PromptPool | Sequence[Any] | None = None,
    config: IAPRunConfig | IAPConfig | None = None,
    *,
    lam_grid: Sequence[float] = DEFAULT_LAM_GRID,
    tau_grid: Sequence[float] = DEFAULT_TAU_GRID,
    m_grid: Sequence[int] = DEFAULT_M_GRID,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> IAPCalibration:
    """Fit the standardiser and calibrate lam, tau and m on labelled dev ``examples``.

    Every dev pair is generated and scored once (:func:`_collect_pairs`, resumable in
    ``out_dir/pairs.jsonl``); the standardiser is fitted on those pairs; then the model-free
    :func:`calibrate` sweeps the grids on the cached z-scores and answers (mu fixed at
    ``config.ss.mu``). The best accuracy is in-sample: judge it on a held-out split with
    :func:`run_iap`.
    """
    from contextlib import nullcontext

    from dpc_lens.model import as_adapter
    from dpc_lens.runs import RunLock, check_out_dir
    from dpc_lens.tasks import resolve_task

    task = resolve_task(task)  # before any model work
    cfg = _as_run_config(config)
    pool = _as_pool(pool)
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
    with RunLock(out_dir, "iap dev") if out_dir is not None else nullcontext():
        pairs, cost = _collect_pairs(as_adapter(model), examples, task, pool, cfg, out_dir=out_dir,
                                     resume=resume, progress=progress, desc="IAP dev")
    std = fit_standardizer(pairs)
    qrecs = question_records(pairs, len(pool), std)
    golds = [g[0]["gold"] for g in _question_groups(pairs, len(pool))]
    cal = calibrate(qrecs, golds, lam_grid, tau_grid, m_grid, task.is_correct, mu=cfg.ss.mu)
    chosen = replace(cfg, ss=cal.config("iap_ss", cfg.ss), mv=cal.config("iap_mv", cfg.mv))
    res = IAPCalibration(std, cal, chosen, tuple(pairs), cost)
    if out_dir is not None:
        res.save(out_dir)
    _warn({"warnings": [f"on the dev split: {line}" for line in cal.warnings]}, stacklevel=3)
    return res


def run_iap(
    model: Any,
    examples: Sequence[Any],
    task: Any,
    pool: PromptPool | Sequence[Any] | None = None,
    config: IAPRunConfig | IAPConfig | None = None,
    *,
    standardizer: FlowStandardizer | None = None,
    calibration: IAPCalibration | CalibrationResult | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """IAP-ss, IAP-mv and the baselines over ``examples``; returns ``(pair records, summary)``.

    1. Every (question, prompt) pair is generated and scored once (:func:`score_pairs`'s
       maths), appended to ``out_dir/pairs.jsonl`` as each batch finishes; ``resume=True``
       skips pairs already there (key: example id and prompt text), so no pair is lost or
       computed twice.
    2. z-scores with ``standardizer`` (fitted on a dev split, e.g. by :func:`calibrate_iap`);
       without one, it is fitted on this run's own pairs and the summary says so (scores and
       tau are then in-sample).
    3. :func:`evaluate`: per-question decisions (``questions.jsonl``) and the summary
       (``summary.json``), with the standardiser (``standardizer.json``) and the run config
       (``config.json``) beside them.

    ``calibration`` (what :func:`calibrate_iap` returned, or its ``.calibration``) names the
    single prompt best on dev for the summary's paired differences, the grids for its
    grid-edge remarks, and carries the dev diagnostics into ``summary["dev"]``; an
    :class:`IAPCalibration` also supplies the standardiser when ``standardizer`` is not given.
    The summary says whether the score ranks prompts at all (:func:`evaluate`); when it does not,
    a :class:`~dpc_lens.iap.diagnostics.IAPScoreWarning` is issued too.

    With ``out_dir`` the directory is locked for the run (:class:`dpc_lens.runs.RunLock`).
    """
    from dpc_lens.tasks import resolve_task

    task = resolve_task(task)  # a name or a task object, checked before any model work
    cfg = _as_run_config(config)
    pool = _as_pool(pool)
    if calibration is not None and not isinstance(calibration, (IAPCalibration, CalibrationResult)):
        raise InputError(
            f"calibration must be what calibrate_iap returned (an IAPCalibration) or a "
            f"CalibrationResult (e.g. CalibrationResult.load(path)), got {type(calibration).__name__}."
        )
    if isinstance(calibration, IAPCalibration):
        standardizer = standardizer if standardizer is not None else calibration.standardizer
        calibration = calibration.calibration
    if standardizer is not None and not isinstance(standardizer, FlowStandardizer):
        raise InputError(
            f"standardizer must be a FlowStandardizer (e.g. FlowStandardizer.load(path)), got "
            f"{type(standardizer).__name__}."
        )
    if out_dir is None:
        return _run_iap(model, examples, task, pool, cfg, standardizer, out_dir, resume, progress,
                        calibration)
    from dpc_lens.runs import RunLock, check_out_dir

    out_dir = check_out_dir(out_dir)
    with RunLock(out_dir, "iap"):
        return _run_iap(model, examples, task, pool, cfg, standardizer, out_dir, resume, progress,
                        calibration)


def _run_iap(model, examples, task, pool, cfg, standardizer, out_dir, resume, progress, calibration=None):
    from dpc_lens.model import as_adapter

    pairs, cost = _collect_pairs(as_adapter(model), examples, task, pool, cfg, out_dir=out_dir,
                                 resume=resume, progress=progress, desc="IAP")
    if out_dir is not None:  # only once the resume check in _collect_pairs has passed
        cfg.save(Path(out_dir) / "config.json")
    if standardizer is None:
        std = fit_standardizer(pairs)
        std_note = {"fitted_on": "run",
                    "note": ("No dev split was given: the standardiser was fitted on this run's own "
                             "flows, so z-scores (and tau) are in-sample.")}
    else:
        std = standardizer
        std_note = {"fitted_on": "dev", "note": "Standardiser fitted on a separate dev split."}
    rows, summary = evaluate(pairs, pool, std, cfg, task, calibration=calibration)
    _warn(summary)
    summary["standardizer"] = {**std_note, **std.to_dict()}
    summary["this_run"] = {**cost, "pairs": len(pairs)}
    summary["config"] = cfg.to_dict()
    # decided by behaviour (ModelAdapter.supports_kv_cache): a silent fallback shows here
    summary["kv_cache_used"] = bool(cfg.generation.use_kv_cache and as_adapter(model).supports_kv_cache)
    if out_dir is not None:
        out = Path(out_dir)
        std.save(out / "standardizer.json")
        rewrite_jsonl(out / "questions.jsonl", rows)
        write_json(out / "summary.json", summary)
    return pairs, summary


def calibrate_and_run_iap(
    load: Any,
    examples: Sequence[Any],
    task: Any,
    pool: PromptPool | Sequence[Any] | None = None,
    config: IAPRunConfig | IAPConfig | None = None,
    *,
    dev: Sequence[Any] | None = None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """What ``dpc-lens iap`` does: lock ``out_dir`` for the whole run, load the model
    (``load()``, inside the lock, so a refused run costs no model load), fit the standardiser
    and lam/tau/m on ``dev`` when given (:func:`calibrate_iap` into ``out_dir/dev``), then
    :func:`run_iap` on ``examples``. Returns ``(pairs, summary, dev fit or None)``."""
    from dpc_lens.runs import RunLock, check_out_dir
    from dpc_lens.tasks import resolve_task

    task = resolve_task(task)  # before the model loads
    out_dir = check_out_dir(out_dir)
    cfg = _as_run_config(config)
    with RunLock(out_dir, "iap"):
        model = load()
        std, fit = None, None
        if dev is not None:
            fit = calibrate_iap(model, dev, task, pool, cfg, out_dir=Path(out_dir) / "dev", resume=resume,
                                progress=progress)
            cfg, std = fit.config, fit.standardizer
        pairs, summary = _run_iap(model, examples, task, _as_pool(pool), cfg, std, out_dir, resume, progress,
                                  None if fit is None else fit.calibration)
    return pairs, summary, fit


def _warn(summary: Mapping[str, Any], stacklevel: int = 4) -> None:
    """Each of the summary's ``warnings`` as an :class:`IAPScoreWarning` (default stacklevel: the
    caller of run_iap, through _run_iap)."""
    import warnings

    from .diagnostics import IAPScoreWarning

    for line in summary.get("warnings") or ():
        warnings.warn(line, IAPScoreWarning, stacklevel=stacklevel)
