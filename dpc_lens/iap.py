"""Instance-adaptive Prompting (IAP): the candidate pool, the score and the selection strategies.

IAP (Yuan et al., "Instance-adaptive Zero-shot Chain-of-Thought Prompting", NeurIPS 2024,
arXiv 2409.20441) answers each question with a hard prompt chosen *per instance* from a pool of
candidates. For every (question, prompt) pair it generates a rationale, measures three saliency
flows over ``[question; prompt; rationale]`` and combines them into one score; then

* **IAP-ss** (sequential substitution) walks the pool in order and stops at the first prompt whose
  score clears a threshold (falling back to the best-scoring prompt when none does), and
* **IAP-mv** (majority vote) scores every prompt and takes the majority answer among the top m.

Reported with LLaMA-3-8B-Instruct against the best single prompt: GSM8K 64.52 -> 66.34,
SVAMP 73.67 -> 77.33, Causal Judgement 18.18 -> 29.95, CSQA 64.95 -> 68.39. Good prompts show a
strong question->prompt flow in shallow layers and a sustained question/prompt->rationale flow in
deeper ones.

The first half of this module is *model-free*: the prompt pool, per-flow standardisation fitted on
dev data, the synthesised score, the two strategies and the baselines on hand-given scores and
answers, and grid-search calibration of lambda, tau and m. None of it runs a model or touches a
hook, so every rule is tested with numbers worked out by hand.

The second half (below the "model part" banner) is the pipeline: :func:`score_pairs` generates a
rationale for every (question, prompt) pair and runs one saliency pass over
``[question; prompt; rationale]`` (:func:`encode_pair` builds the layout, chat template
included); :func:`run_iap` caches one (answer, flows) record per pair in a resumable
``pairs.jsonl``, which every strategy and baseline then reads (:func:`evaluate`);
:func:`calibrate_iap` fits the standardiser and lambda, tau, m on a dev split with the
model-free :func:`calibrate`. It runs the model only through :mod:`dpc_lens.generation` and
:mod:`dpc_lens.saliency` (imported when called), so the hooks stay in one place.

Cost accounting: IAP-ss can stop early, so :func:`iap_ss` reports ``n_tried`` (prompts that had
to be generated and scored before it stopped); IAP-mv always needs the whole pool.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from dpc_lens.errors import ConfigError, DataError, InputError
from dpc_lens.layers import LayerSpec, layer_spec_json, normalize_layer_spec, resolve_layers
from dpc_lens.runs import append_jsonl, read_json, resume_run, rewrite_jsonl, write_json
from dpc_lens.validate import is_int as _is_int

if TYPE_CHECKING:  # pandas is imported lazily, only by to_dataframe()
    import pandas as pd

__all__ = [
    "FLOW_QP",
    "FLOW_QR",
    "FLOW_PR",
    "IAP_FLOWS",
    "PROMPT_GROUPS",
    "CandidatePrompt",
    "DEFAULT_PROMPTS",
    "PromptPool",
    "FlowStandardizer",
    "LayerSpec",
    "resolve_layers",
    "IAPConfig",
    "synthesized_score",
    "SelectionResult",
    "iap_ss",
    "iap_mv",
    "majority_vote",
    "single_prompt_answers",
    "QuestionRecord",
    "CalibrationResult",
    "calibrate",
    # the model part
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

# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

FLOW_QP = "question->prompt"
FLOW_QR = "question->rationale"
FLOW_PR = "prompt->rationale"
#: The three IAP flows, named "source->target" as in SPEC section 2.
IAP_FLOWS: tuple[str, str, str] = (FLOW_QP, FLOW_QR, FLOW_PR)

PromptGroup = Literal["instructive", "misleading", "irrelevant", "custom"]
#: Groups of the IAP paper's pool, plus ``"custom"`` for prompts a user brings.
PROMPT_GROUPS: tuple[str, ...] = ("instructive", "misleading", "irrelevant", "custom")

_JSON_VERSION = 1


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_flow_name(name: object, where: str) -> str:
    if not isinstance(name, str) or name not in IAP_FLOWS:
        raise InputError(
            f"{where}: unknown flow {name!r}; expected one of {list(IAP_FLOWS)}."
            + (_suggest(name, IAP_FLOWS) if isinstance(name, str) else "")
        )
    return name


# ---------------------------------------------------------------------------------------------
# The candidate pool
# ---------------------------------------------------------------------------------------------


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class CandidatePrompt:
    """One hard prompt of the pool.

    Attributes:
        text: the prompt exactly as it is placed after the question (not stripped: whitespace
            changes tokenisation, so what you give is what the model sees).
        group: ``"instructive"``, ``"misleading"``, ``"irrelevant"`` (the IAP paper's groups,
            taken from Kojima et al.'s zero-shot CoT study) or ``"custom"``.
    """

    text: str
    group: PromptGroup = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise InputError(
                f"CandidatePrompt.text must be a non-empty string, got {self.text!r}; "
                "give the prompt's words, e.g. \"Let's think step by step.\"."
            )
        if self.group not in PROMPT_GROUPS:
            raise InputError(
                f"CandidatePrompt.group must be one of {list(PROMPT_GROUPS)}, got {self.group!r}."
                + (_suggest(self.group, PROMPT_GROUPS) if isinstance(self.group, str) else "")
            )

    def to_dict(self) -> dict[str, str]:
        return {"text": self.text, "group": self.group}


#: The default pool: nine prompts, three per group, instructive ones first so that IAP-ss tries
#: them first. The groups and most wordings follow Kojima et al. (2022, table 4), which the IAP
#: paper builds its pool from; the exact nine prompts of the IAP paper are not reproduced here
#: (not verified against its appendix) — load your own list with :meth:`PromptPool.from_file`.
DEFAULT_PROMPTS: tuple[CandidatePrompt, ...] = (
    CandidatePrompt("Let's think step by step.", "instructive"),
    CandidatePrompt("Let's think about this logically.", "instructive"),
    CandidatePrompt("First, let's break the problem into steps.", "instructive"),
    CandidatePrompt("Don't think. Just feel.", "misleading"),
    CandidatePrompt("Let's solve it quickly without checking.", "misleading"),
    CandidatePrompt("Let's think step by step but reach an incorrect answer.", "misleading"),
    CandidatePrompt("It's a beautiful day.", "irrelevant"),
    CandidatePrompt("By the way, I found a good restaurant nearby.", "irrelevant"),
    CandidatePrompt("Abrakadabra!", "irrelevant"),
)


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class PromptPool:
    """An ordered, validated pool of candidate prompts.

    The order matters: IAP-ss tries prompts in this order and every tie (in score or in votes)
    falls back to it. The pool is non-empty and its texts are unique (two equal texts would be
    the same (question, prompt) pair twice and would count twice in a vote).

    Build one with ``PromptPool(prompts)`` (a sequence of :class:`CandidatePrompt` or plain
    strings, which get group ``"custom"``), :meth:`default`, or :meth:`from_file`.
    """

    prompts: tuple[CandidatePrompt, ...] = DEFAULT_PROMPTS

    def __post_init__(self) -> None:
        if isinstance(self.prompts, (str, bytes)) or not isinstance(self.prompts, Iterable):
            raise InputError(
                f"PromptPool.prompts must be a sequence of prompts, got {type(self.prompts).__name__}; "
                "wrap a single prompt in a list: PromptPool([\"Let's think step by step.\"])."
            )
        items = tuple(
            p if isinstance(p, CandidatePrompt) else CandidatePrompt(p) for p in self.prompts
        )
        if not items:
            raise InputError(
                "PromptPool is empty; IAP needs at least one candidate prompt "
                "(use PromptPool.default() for the nine built-in ones)."
            )
        seen: dict[str, int] = {}
        for i, p in enumerate(items):
            if p.text in seen:
                raise InputError(
                    f"PromptPool has the prompt {p.text!r} twice (positions {seen[p.text]} and {i}); "
                    "prompt texts must be unique — remove the duplicate."
                )
            seen[p.text] = i
        object.__setattr__(self, "prompts", items)

    @classmethod
    def default(cls) -> PromptPool:
        """The nine built-in prompts, :data:`DEFAULT_PROMPTS`."""
        return cls(DEFAULT_PROMPTS)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i: int) -> CandidatePrompt:
        return self.prompts[i]

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.prompts)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(p.group for p in self.prompts)

    def index(self, text: str) -> int:
        """Position of the prompt with this text; :class:`InputError` if it is not in the pool."""
        for i, p in enumerate(self.prompts):
            if p.text == text:
                return i
        raise InputError(
            f"{text!r} is not in the prompt pool." + _suggest(text, self.texts)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": [p.to_dict() for p in self.prompts]}

    def save(self, path: str | Path) -> None:
        """Write the pool as a JSON list of ``{"text", "group"}`` objects (readable by
        :meth:`from_file`)."""
        Path(path).write_text(
            json.dumps([p.to_dict() for p in self.prompts], indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )

    @classmethod
    def from_file(cls, path: str | Path) -> PromptPool:
        """Read a pool from a local file.

        Two formats, chosen by the file suffix:

        * ``*.json``: a JSON list whose items are strings (group ``"custom"``) or objects
          ``{"text": ..., "group": ...}`` (``group`` optional).
        * anything else: plain text, one prompt per line. Each line is stripped of surrounding
          whitespace; blank lines and lines starting with ``#`` are skipped. Every prompt gets
          group ``"custom"``.

        Raises:
            DataError: the file is missing, unreadable, not valid JSON, has an item of the wrong
                type, an empty prompt, an unknown group, a duplicate prompt, or no prompt at all.
                The message names the file and the line.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"{path}: no such prompt file; give the path of a .json list or a text file "
                "with one prompt per line."
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read the prompt file as UTF-8 text ({e}).") from None
        if path.suffix.lower() == ".json":
            entries = _read_json_prompts(path, text)
        else:
            entries = _read_text_prompts(text)
        if not entries:
            raise DataError(
                f"{path}: the file holds no prompt; expected "
                + ("a non-empty JSON list." if path.suffix.lower() == ".json"
                   else "one prompt per line (blank and '#' lines are skipped).")
            )
        prompts: list[CandidatePrompt] = []
        first_line: dict[str, int] = {}
        for line, prompt_text, group in entries:
            if not prompt_text.strip():
                raise DataError(f"{path}, line {line}: empty prompt text; remove the entry or fill it.")
            if group not in PROMPT_GROUPS:
                raise DataError(
                    f"{path}, line {line}: unknown group {group!r}; expected one of "
                    f"{list(PROMPT_GROUPS)}." + _suggest(str(group), PROMPT_GROUPS)
                )
            if prompt_text in first_line:
                raise DataError(
                    f"{path}, line {line}: duplicate prompt {prompt_text!r} (first on line "
                    f"{first_line[prompt_text]}); prompt texts must be unique."
                )
            first_line[prompt_text] = line
            prompts.append(CandidatePrompt(prompt_text, group))  # type: ignore[arg-type]
        return cls(tuple(prompts))


def _read_text_prompts(text: str) -> list[tuple[int, str, str]]:
    out = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append((lineno, line, "custom"))
    return out


def _read_json_prompts(path: Path, text: str) -> list[tuple[int, str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}, line {e.lineno}: invalid JSON ({e.msg}); expected a list of strings or of "
            '{"text": ..., "group": ...} objects.'
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}, line 1: expected a JSON list of prompts, got a {type(data).__name__}; "
            'write ["Let\'s think step by step.", ...].'
        )
    lines = _json_array_item_lines(text)
    out = []
    for i, item in enumerate(data):
        line = lines[i] if i < len(lines) else 1
        if isinstance(item, str):
            out.append((line, item, "custom"))
        elif isinstance(item, dict):
            unknown = set(item) - {"text", "group"}
            if "text" not in item or not isinstance(item["text"], str):
                raise DataError(
                    f"{path}, line {line}: item {i} needs a string field 'text', got {item!r}."
                )
            if unknown:
                raise DataError(
                    f"{path}, line {line}: item {i} has unknown field(s) {sorted(unknown)}; "
                    "allowed fields are 'text' and 'group'."
                )
            out.append((line, item["text"], item.get("group", "custom")))
        else:
            raise DataError(
                f"{path}, line {line}: item {i} is a {type(item).__name__} ({item!r}); expected a "
                'string or a {"text": ..., "group": ...} object.'
            )
    return out


def _json_array_item_lines(text: str) -> list[int]:
    """Line numbers (1-based) where each item of a top-level JSON array starts.

    Only called on text that already parsed as a JSON list, so the walk cannot fail.
    """
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    lines: list[int] = []
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = dec.raw_decode(text, pos)


# ---------------------------------------------------------------------------------------------
# Flow standardisation
# ---------------------------------------------------------------------------------------------

FlowValues = Float[Tensor, "*pairs"] | Sequence[float] | float


def _as_float64(values: FlowValues, what: str) -> Tensor:
    try:
        if isinstance(values, Tensor):
            t = values.detach().to("cpu", torch.float64)
        else:
            t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{what}: expected numbers (a tensor or a list of floats), got {values!r} ({e})."
        ) from None
    if not torch.isfinite(t).all():
        raise InputError(
            f"{what}: contains NaN or infinite values; drop the (question, prompt) pairs whose "
            "saliency failed before fitting or scoring."
        )
    return t


@dataclass(frozen=True)
class FlowStandardizer:
    """Per-flow z-scoring, ``z = (x - mean) / std``, fitted on dev data for one model and task.

    Raw saliency magnitudes differ by orders of magnitude between flows, models and tasks (and
    grow with the loss), so the score combines z-scores. Fit on one value per (question, prompt)
    pair of a dev split, with :meth:`fit`.

    ``std`` is the *sample* standard deviation (ddof = 1). A flow with fewer than 2 values or with
    zero spread is refused with an error rather than patched with an epsilon: an epsilon would
    turn every later value into a huge z-score that silently dominates the sum.

    Attributes:
        mean, std: per-flow statistics, keyed by flow name (any subset of :data:`IAP_FLOWS`).
        count: how many values each flow was fitted on (provenance only).
    """

    mean: Mapping[str, float]
    std: Mapping[str, float]
    count: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.mean:
            raise ConfigError(
                "FlowStandardizer has no flow; fit it with FlowStandardizer.fit({...}) on dev "
                f"flows named from {list(IAP_FLOWS)}."
            )
        if set(self.mean) != set(self.std):
            raise ConfigError(
                f"FlowStandardizer: mean has flows {sorted(self.mean)} but std has "
                f"{sorted(self.std)}; both need the same flows."
            )
        for name in self.mean:
            _check_flow_name(name, "FlowStandardizer")
            m, s = self.mean[name], self.std[name]
            if not (isinstance(m, (int, float)) and math.isfinite(m)):
                raise ConfigError(f"FlowStandardizer: mean of {name!r} must be a finite number, got {m!r}.")
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
                raise ConfigError(
                    f"FlowStandardizer: std of {name!r} must be a finite number > 0, got {s!r}; "
                    "refit on dev data where this flow varies."
                )
        object.__setattr__(self, "mean", {k: float(v) for k, v in self.mean.items()})
        object.__setattr__(self, "std", {k: float(self.std[k]) for k in self.mean})
        object.__setattr__(self, "count", {k: int(v) for k, v in dict(self.count).items()})

    @property
    def flows(self) -> tuple[str, ...]:
        return tuple(f for f in IAP_FLOWS if f in self.mean)

    @classmethod
    def fit(cls, flows: Mapping[str, FlowValues]) -> FlowStandardizer:
        """Fit mean and sample std (ddof = 1) of each flow.

        Args:
            flows: flow name -> values, one per (question, prompt) pair of the dev split (any
                shape; flattened). Any subset of :data:`IAP_FLOWS`.

        Raises:
            InputError: unknown flow name, non-numeric or non-finite values, fewer than 2 values,
                or all values equal (std 0).
        """
        if not isinstance(flows, Mapping) or not flows:
            raise InputError(
                f"FlowStandardizer.fit needs a non-empty mapping flow name -> values, got {flows!r}; "
                f"names are {list(IAP_FLOWS)}."
            )
        mean, std, count = {}, {}, {}
        for name, values in flows.items():
            _check_flow_name(name, "FlowStandardizer.fit")
            t = _as_float64(values, f"FlowStandardizer.fit[{name!r}]").reshape(-1)
            if t.numel() < 2:
                raise InputError(
                    f"FlowStandardizer.fit[{name!r}]: got {t.numel()} value(s); a standard deviation "
                    "needs at least 2 — fit on more (question, prompt) pairs of the dev split."
                )
            s = float(t.std(correction=1))
            if s == 0.0:
                raise InputError(
                    f"FlowStandardizer.fit[{name!r}]: all {t.numel()} values equal {float(t[0])!r} "
                    "(std 0), so z-scores are undefined; fit on more varied dev data, or leave this "
                    "flow out (and give it weight 0 in the score)."
                )
            mean[name], std[name], count[name] = float(t.mean()), s, int(t.numel())
        return cls(mean=mean, std=std, count=count)

    def z(self, name: str, values: FlowValues) -> Tensor:
        """z-scores of one flow's values, same shape as given (float64 unless a floating tensor
        was given, whose dtype is kept)."""
        _check_flow_name(name, "FlowStandardizer.z")
        if name not in self.mean:
            raise InputError(
                f"FlowStandardizer.z: flow {name!r} was not fitted (fitted: {list(self.flows)}); "
                "refit including it."
            )
        t = _as_float64(values, f"FlowStandardizer.z[{name!r}]")
        out = (t - self.mean[name]) / self.std[name]
        if isinstance(values, Tensor) and values.is_floating_point():
            out = out.to(values.dtype)
        return out

    def transform(self, flows: Mapping[str, FlowValues]) -> dict[str, Tensor]:
        """z-scores of every flow given (each must have been fitted)."""
        return {name: self.z(name, values) for name, values in flows.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "FlowStandardizer",
            "version": _JSON_VERSION,
            "mean": dict(self.mean),
            "std": dict(self.std),
            "count": dict(self.count),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowStandardizer:
        if not isinstance(d, Mapping) or "mean" not in d or "std" not in d:
            raise DataError(
                "FlowStandardizer.from_dict: expected a mapping with 'mean' and 'std' "
                f"(as written by to_dict), got {d!r}."
            )
        try:
            mean = {str(k): float(v) for k, v in dict(d["mean"]).items()}
            std = {str(k): float(v) for k, v in dict(d["std"]).items()}
            count = {str(k): int(v) for k, v in dict(d.get("count") or {}).items()}
        except (TypeError, ValueError) as e:
            raise DataError(
                f"FlowStandardizer.from_dict: 'mean', 'std' and 'count' must map flow names to "
                f"numbers ({e})."
            ) from None
        try:
            return cls(mean=mean, std=std, count=count)
        except (ConfigError, InputError) as e:
            raise DataError(f"FlowStandardizer.from_dict: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write as JSON (never pickle)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FlowStandardizer:
        d = read_json(path, "standardizer")
        try:
            return cls.from_dict(d)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Layer sets and config
# ---------------------------------------------------------------------------------------------

# The layer grammar is dpc_lens.layers (shared with DPC): names, fraction pairs, index lists.


def _check_lam(lam: object, where: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
        raise ConfigError(
            f"{where}: lam must be a number in [0, 1] (weight of question->prompt; 1 - lam goes to "
            f"question->rationale), got {lam!r}."
        )
    return float(lam)


def _check_mu(mu: object, where: str) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (math.isfinite(mu) and mu >= 0):
        raise ConfigError(
            f"{where}: mu must be a finite number >= 0 (weight of prompt->rationale; 0 leaves it "
            f"out), got {mu!r}."
        )
    return float(mu)


def _check_tau(tau: object, where: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ConfigError(
            f"{where}: tau must be a finite number (the score threshold, in z-score units), got {tau!r}."
        )
    return float(tau)


def _check_m(m: object, where: str) -> int:
    if not _is_int(m) or m < 1:
        raise ConfigError(
            f"{where}: m must be an int >= 1 (how many top-scoring prompts vote), got {m!r}."
        )
    return int(m)


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class IAPConfig:
    """Every knob of IAP's score and strategies; saved next to every result.

    Attributes:
        lam: weight of z(question->prompt) in the score, in [0, 1]; ``1 - lam`` weighs
            z(question->rationale). Default 0.5 (the paper tunes it; not public).
        mu: weight of z(prompt->rationale), >= 0. Default 0 (the flow is left out).
        tau: IAP-ss threshold on the score (z-score units; a score exactly equal to tau clears
            it). Default 0.0: "above the dev-set average". Fit it with :func:`calibrate`.
        m: IAP-mv: how many top-scoring prompts vote, an int >= 1. Default 3. An m larger than
            the pool is clamped to the pool size (see :func:`iap_mv`).
        qp_layers: layers averaged for question->prompt (shallow). Default ``(0.0, 1/3)``: the
            first third of layers, layer 0 included (the IAP paper finds question->prompt flow
            in the shallowest layers; DPC's ``"shallow"`` drops layer 0 for its own reasons).
        qr_layers, pr_layers: layers for question->rationale and prompt->rationale (deep).
            Default ``"deep"``: the last third, as in DPC (at least the last layer).
        aggregate: how per-layer flows become one number per flow; only ``"mean"`` (mean over
            the layer set of the per-layer segment-mean flow) for now.

    Layer specs follow the one grammar of :mod:`dpc_lens.layers` (shared with DPC): index lists
    (ints, negative from the end), fraction pairs of floats ``(start, stop)`` or the names
    ``"shallow"`` / ``"deep"``. Note ``(0, 1)`` (ints) means layers 0 and 1, while
    ``(0.0, 1.0)`` means all layers.
    """

    lam: float = 0.5
    mu: float = 0.0
    tau: float = 0.0
    m: int = 3
    qp_layers: LayerSpec = (0.0, 1.0 / 3.0)
    qr_layers: LayerSpec = "deep"
    pr_layers: LayerSpec = "deep"
    aggregate: Literal["mean"] = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", _check_lam(self.lam, "IAPConfig"))
        object.__setattr__(self, "mu", _check_mu(self.mu, "IAPConfig"))
        object.__setattr__(self, "tau", _check_tau(self.tau, "IAPConfig"))
        object.__setattr__(self, "m", _check_m(self.m, "IAPConfig"))
        for name in ("qp_layers", "qr_layers", "pr_layers"):
            object.__setattr__(self, name, normalize_layer_spec(getattr(self, name), f"IAPConfig.{name}"))
        if self.aggregate != "mean":
            raise ConfigError(
                f"IAPConfig.aggregate must be 'mean', got {self.aggregate!r}; other reductions are "
                "not implemented yet."
            )

    def layers(self, n_layers: int) -> dict[str, tuple[int, ...]]:
        """Resolved layer indices per flow for a model with ``n_layers`` layers."""
        return {
            FLOW_QP: tuple(resolve_layers(self.qp_layers, n_layers)),
            FLOW_QR: tuple(resolve_layers(self.qr_layers, n_layers)),
            FLOW_PR: tuple(resolve_layers(self.pr_layers, n_layers)),
        }

    def score(
        self,
        z_qp: Float[Tensor, "*prompts"] | float,
        z_qr: Float[Tensor, "*prompts"] | float,
        z_pr: Float[Tensor, "*prompts"] | float | None = None,
    ) -> Float[Tensor, "*prompts"] | float:
        """:func:`synthesized_score` with this config's ``lam`` and ``mu``."""
        return synthesized_score(z_qp, z_qr, z_pr, lam=self.lam, mu=self.mu)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "mu": self.mu,
            "tau": self.tau,
            "m": self.m,
            "qp_layers": layer_spec_json(self.qp_layers),
            "qr_layers": layer_spec_json(self.qr_layers),
            "pr_layers": layer_spec_json(self.pr_layers),
            "aggregate": self.aggregate,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IAPConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"IAPConfig.from_dict: unknown field(s) {sorted(unknown)}; known fields are "
                f"{sorted(cls.__dataclass_fields__)}."
            )
        return cls(**dict(d))


# ---------------------------------------------------------------------------------------------
# The score
# ---------------------------------------------------------------------------------------------


def synthesized_score(
    z_qp: Float[Tensor, "*prompts"] | float,
    z_qr: Float[Tensor, "*prompts"] | float,
    z_pr: Float[Tensor, "*prompts"] | float | None = None,
    *,
    lam: float = 0.5,
    mu: float = 0.0,
) -> Float[Tensor, "*prompts"] | float:
    """IAP's synthesised saliency score of a (question, prompt) pair::

        S = lam * z(question->prompt) + (1 - lam) * z(question->rationale) + mu * z(prompt->rationale)

    The z's are flows standardised per model and task (:class:`FlowStandardizer`). The IAP
    paper's exact formula is not public (it combines layer- and head-averaged saliency with one
    harmonic weight); this is dpc_lens's default, with every weight a knob (SPEC section 4).

    Works elementwise on floats or tensors of the same shape. ``z_pr`` may be omitted only when
    ``mu == 0``.
    """
    lam = _check_lam(lam, "synthesized_score")
    mu = _check_mu(mu, "synthesized_score")
    s = lam * z_qp + (1.0 - lam) * z_qr
    if mu != 0.0:
        if z_pr is None:
            raise InputError(
                f"synthesized_score: mu = {mu} weighs prompt->rationale but z_pr was not given; "
                "pass z_pr or set mu = 0."
            )
        s = s + mu * z_pr
    return s


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

Answer = str | None
Scores = Float[Tensor, " n_prompts"] | Sequence[float]


@dataclass(frozen=True)
class SelectionResult:
    """What a strategy decided for one question.

    Attributes:
        strategy: ``"iap_ss"`` or ``"iap_mv"``.
        index: pool position of the chosen prompt. For IAP-mv: the highest-scoring prompt among
            the voters that gave the winning answer (earliest in pool order on a score tie).
        answer: the final answer (``None`` when the chosen prompt(s) gave no extractable answer).
        n_tried: prompts that had to be generated and scored: for IAP-ss ``index + 1`` when a
            prompt cleared tau, the whole pool when none did; for IAP-mv always the whole pool.
        fallback: IAP-ss only: no prompt cleared tau, so the best-scoring one was taken.
        considered: pool positions the decision looked at, in the order it looked at them
            (IAP-ss: 0..n_tried-1; IAP-mv: the top m by score).
        votes: IAP-mv only: answer -> number of votes among the considered prompts (``None``
            answers do not vote).
    """

    strategy: Literal["iap_ss", "iap_mv"]
    index: int
    answer: Answer
    n_tried: int
    fallback: bool = False
    considered: tuple[int, ...] = ()
    votes: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "index": self.index,
            "answer": self.answer,
            "n_tried": self.n_tried,
            "fallback": self.fallback,
            "considered": list(self.considered),
            "votes": dict(self.votes),
        }


def _check_scores_answers(
    scores: Scores, answers: Sequence[Answer], where: str
) -> tuple[list[float], list[Answer]]:
    if isinstance(scores, Tensor):
        if scores.ndim != 1:
            raise InputError(
                f"{where}: scores must be 1-D (one per prompt of ONE question), got shape "
                f"{tuple(scores.shape)}; call once per question."
            )
        s = [float(x) for x in scores.detach().cpu().tolist()]
    else:
        try:
            s = [float(x) for x in scores]
        except (TypeError, ValueError):
            raise InputError(f"{where}: scores must be numbers, got {scores!r}.") from None
    if isinstance(answers, str):
        raise InputError(f"{where}: answers must be a sequence (one per prompt), got a string.")
    a = list(answers)
    if not s:
        raise InputError(f"{where}: no prompt; scores and answers need one entry per pool prompt.")
    if len(s) != len(a):
        raise InputError(
            f"{where}: {len(s)} scores but {len(a)} answers; both need one entry per pool prompt, "
            "in pool order."
        )
    bad = [i for i, x in enumerate(s) if not math.isfinite(x)]
    if bad:
        raise InputError(
            f"{where}: score(s) at position(s) {bad} are NaN or infinite; fix or drop those "
            "(question, prompt) pairs before selecting."
        )
    for i, x in enumerate(a):
        if x is not None and not isinstance(x, str):
            raise InputError(f"{where}: answer {i} must be a string or None, got {x!r}.")
    return s, a


def _argmax_first(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def iap_ss(scores: Scores, answers: Sequence[Answer], tau: float) -> SelectionResult:
    """IAP-ss (sequential substitution) for one question.

    Walk the pool in order and answer with the first prompt whose score is ``>= tau`` (equal
    counts as clearing). If none clears it, answer with the highest-scoring prompt, the earliest
    in pool order on a tie. The answer is taken as is, ``None`` included.

    Args:
        scores: one score per pool prompt, in pool order (from the pipeline's cache).
        answers: the answer each prompt produced, in pool order (``None``: none extracted).
        tau: the threshold.

    Returns:
        A :class:`SelectionResult`; ``n_tried`` is what IAP-ss really costs on this question.
    """
    s, a = _check_scores_answers(scores, answers, "iap_ss")
    tau = _check_tau(tau, "iap_ss")
    for i, x in enumerate(s):
        if x >= tau:
            return SelectionResult("iap_ss", i, a[i], n_tried=i + 1, fallback=False,
                                   considered=tuple(range(i + 1)))
    best = _argmax_first(s)
    return SelectionResult("iap_ss", best, a[best], n_tried=len(s), fallback=True,
                           considered=tuple(range(len(s))))


def iap_mv(scores: Scores, answers: Sequence[Answer], m: int) -> SelectionResult:
    """IAP-mv (majority vote among the best) for one question.

    1. Rank prompts by score, highest first; equal scores keep pool order. Keep the top ``m``.
       An ``m`` larger than the pool is clamped to the pool size (the vote is then over every
       prompt, with the score tie-breaks below); ``m`` must still be an int >= 1.
    2. Each kept prompt with a non-``None`` answer votes for it; ``None`` answers do not vote.
       If all kept answers are ``None``, the answer is ``None`` (from the top-ranked prompt).
    3. The answer with most votes wins. Ties: the higher summed score of its voters, then the
       higher best single score, then the answer whose best voter comes first in pool order.

    ``index`` is the highest-scoring voter for the winning answer; ``n_tried`` is the pool size
    (IAP-mv scores every prompt).
    """
    s, a = _check_scores_answers(scores, answers, "iap_mv")
    m = _check_m(m, "iap_mv")
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    top = tuple(order[: min(m, len(s))])
    votes: dict[str, int] = {}
    total: dict[str, float] = {}
    best_voter: dict[str, int] = {}  # answer -> its top-ranked voter (top is already ranked)
    for i in top:
        ans = a[i]
        if ans is None:
            continue
        votes[ans] = votes.get(ans, 0) + 1
        total[ans] = total.get(ans, 0.0) + s[i]
        best_voter.setdefault(ans, i)
    if not votes:
        return SelectionResult("iap_mv", top[0], None, n_tried=len(s), considered=top, votes={})
    winner = min(
        votes,
        key=lambda ans: (-votes[ans], -total[ans], -s[best_voter[ans]], best_voter[ans]),
    )
    return SelectionResult("iap_mv", best_voter[winner], winner, n_tried=len(s),
                           considered=top, votes=votes)


def majority_vote(answers: Sequence[Answer]) -> Answer:
    """Baseline: the most frequent answer over all prompts of one question.

    ``None`` answers do not vote; if every answer is ``None`` the result is ``None``. A tie in
    counts goes to the answer that appears first in pool order.
    """
    if isinstance(answers, str):
        raise InputError("majority_vote: answers must be a sequence (one per prompt), got a string.")
    counts: dict[str, int] = {}  # dicts keep insertion order = first occurrence in pool order
    for x in answers:
        if x is None:
            continue
        if not isinstance(x, str):
            raise InputError(f"majority_vote: answers must be strings or None, got {x!r}.")
        counts[x] = counts.get(x, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(ans for ans, c in counts.items() if c == best)


def single_prompt_answers(answers: Sequence[Sequence[Answer]], index: int) -> list[Answer]:
    """Baseline: the answers prompt ``index`` gave, one per question (a column of the
    questions x prompts answer table)."""
    out = []
    for q, row in enumerate(answers):
        if not -len(row) <= index < len(row):
            raise InputError(
                f"single_prompt_answers: question {q} has {len(row)} answers; prompt index {index} "
                "is out of range."
            )
        out.append(row[index])
    return out


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class QuestionRecord:
    """The cached per-prompt results for one dev question, in pool order.

    Attributes:
        z_qp, z_qr: z-scored question->prompt and question->rationale flows, one per prompt.
        answers: the answer each prompt produced (``None``: none extracted).
        z_pr: z-scored prompt->rationale flows, or ``None`` when not measured (then only mu = 0
            can be used).
    """

    z_qp: tuple[float, ...]
    z_qr: tuple[float, ...]
    answers: tuple[Answer, ...]
    z_pr: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def floats(v, name):
            if isinstance(v, Tensor):
                v = v.detach().cpu().reshape(-1).tolist()
            try:
                t = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise InputError(f"QuestionRecord.{name} must be numbers, got {v!r}.") from None
            if not all(math.isfinite(x) for x in t):
                raise InputError(f"QuestionRecord.{name} has NaN or infinite values: {t!r}.")
            return t

        object.__setattr__(self, "z_qp", floats(self.z_qp, "z_qp"))
        object.__setattr__(self, "z_qr", floats(self.z_qr, "z_qr"))
        if self.z_pr is not None:
            object.__setattr__(self, "z_pr", floats(self.z_pr, "z_pr"))
        if isinstance(self.answers, str):
            raise InputError("QuestionRecord.answers must be a sequence of answers, got a string.")
        object.__setattr__(self, "answers", tuple(self.answers))
        for i, x in enumerate(self.answers):
            if x is not None and not isinstance(x, str):
                raise InputError(f"QuestionRecord.answers[{i}] must be a string or None, got {x!r}.")
        n = len(self.answers)
        lens = {"z_qp": len(self.z_qp), "z_qr": len(self.z_qr), "answers": n}
        if self.z_pr is not None:
            lens["z_pr"] = len(self.z_pr)
        if n == 0 or len(set(lens.values())) != 1:
            raise InputError(
                f"QuestionRecord: every field needs one entry per pool prompt, got lengths {lens}."
            )

    def scores(self, lam: float, mu: float = 0.0) -> list[float]:
        """:func:`synthesized_score` of every prompt, in pool order."""
        if mu != 0.0 and self.z_pr is None:
            raise InputError(
                f"QuestionRecord.scores: mu = {mu} but this record has no z_pr; record "
                "prompt->rationale flows or use mu = 0."
            )
        z_pr = self.z_pr if self.z_pr is not None else (0.0,) * len(self.answers)
        return [synthesized_score(q, r, p, lam=lam, mu=mu)
                for q, r, p in zip(self.z_qp, self.z_qr, z_pr, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "z_qp": list(self.z_qp),
            "z_qr": list(self.z_qr),
            "z_pr": None if self.z_pr is None else list(self.z_pr),
            "answers": list(self.answers),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuestionRecord:
        missing = {"z_qp", "z_qr", "answers"} - set(d)
        if missing:
            raise InputError(
                f"QuestionRecord.from_dict: missing field(s) {sorted(missing)}; expected z_qp, "
                "z_qr, answers and optionally z_pr."
            )
        return cls(z_qp=d["z_qp"], z_qr=d["z_qr"], answers=d["answers"], z_pr=d.get("z_pr"))


@dataclass(frozen=True)
class CalibrationResult:
    """Best IAP settings on a dev split, and how sensitive accuracy is to each.

    Attributes:
        best_ss: ``{"lam", "tau", "accuracy", "mean_tried"}`` — best IAP-ss setting.
        best_mv: ``{"lam", "m", "accuracy"}`` — best IAP-mv setting.
        sensitivity: rows ``{"strategy", "param", "value", "lam", "tau"|"m", "accuracy",
            "mean_tried"}``: accuracy as one parameter sweeps its grid with the other at its
            best value.
        grid: every evaluated setting (same row shape, ``param`` = ``"grid"``).
        baselines: ``{"single": [accuracy of each prompt], "majority": ..., "oracle": ...}``
            (oracle: some prompt's answer is correct; ``single`` is ``None`` when questions
            have pools of different sizes).
        n_questions: dev questions used. mu: the fixed prompt->rationale weight used.
    """

    best_ss: Mapping[str, float]
    best_mv: Mapping[str, float]
    sensitivity: tuple[Mapping[str, Any], ...]
    grid: tuple[Mapping[str, Any], ...]
    baselines: Mapping[str, Any]
    n_questions: int
    mu: float = 0.0

    def config(self, strategy: Literal["iap_ss", "iap_mv"], base: IAPConfig | None = None) -> IAPConfig:
        """``base`` (default :class:`IAPConfig`) with the best lam and tau (IAP-ss) or lam and
        m (IAP-mv), and this calibration's mu. The two strategies may prefer different lam."""
        base = base or IAPConfig()
        if strategy == "iap_ss":
            return replace(base, lam=self.best_ss["lam"], tau=self.best_ss["tau"], mu=self.mu)
        if strategy == "iap_mv":
            return replace(base, lam=self.best_mv["lam"], m=int(self.best_mv["m"]), mu=self.mu)
        raise InputError(
            f"CalibrationResult.config: strategy must be 'iap_ss' or 'iap_mv', got {strategy!r}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "CalibrationResult",
            "version": _JSON_VERSION,
            "best_ss": dict(self.best_ss),
            "best_mv": dict(self.best_mv),
            "sensitivity": [dict(r) for r in self.sensitivity],
            "grid": [dict(r) for r in self.grid],
            "baselines": dict(self.baselines),
            "n_questions": self.n_questions,
            "mu": self.mu,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationResult:
        try:
            return cls(
                best_ss=dict(d["best_ss"]),
                best_mv=dict(d["best_mv"]),
                sensitivity=tuple(dict(r) for r in d["sensitivity"]),
                grid=tuple(dict(r) for r in d["grid"]),
                baselines=dict(d["baselines"]),
                n_questions=int(d["n_questions"]),
                mu=float(d.get("mu", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"CalibrationResult.from_dict: malformed data ({e!r}).") from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CalibrationResult:
        d = read_json(path, "calibration")
        return cls.from_dict(d)

    def to_dataframe(self, which: Literal["sensitivity", "grid"] = "sensitivity") -> pd.DataFrame:
        """The sensitivity table (or the full grid) as a pandas DataFrame."""
        import pandas as pd

        if which not in ("sensitivity", "grid"):
            raise InputError(f"to_dataframe: which must be 'sensitivity' or 'grid', got {which!r}.")
        return pd.DataFrame([dict(r) for r in getattr(self, which)])


def _check_grid(values: Sequence[Any], name: str, check: Callable[[Any, str], Any]) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"calibrate: {name} must be a non-empty sequence, got {values!r}.")
    vals = [check(v, f"calibrate({name})") for v in values]
    if not vals:
        raise ConfigError(f"calibrate: {name} is empty; give at least one value to try.")
    return vals


def calibrate(
    records: Sequence[QuestionRecord | Mapping[str, Any]],
    golds: Sequence[str],
    lam_grid: Sequence[float],
    tau_grid: Sequence[float],
    m_grid: Sequence[int],
    is_correct: Callable[[Answer, str], bool],
    *,
    mu: float = 0.0,
) -> CalibrationResult:
    """Grid-search lam and tau for IAP-ss, and lam and m for IAP-mv, on a labelled dev split.

    For every setting the strategy is applied to every question's cached scores and answers, and
    accuracy is the fraction of questions whose selected answer ``is_correct(answer, gold)``.
    The best setting is the most accurate; ties go to the earliest in grid order (lam first, then
    tau or m), so order the grids with the value you prefer on a tie first. ``mu`` is fixed.

    Args:
        records: one :class:`QuestionRecord` (or its ``to_dict()``) per dev question.
        golds: the gold answer of each question.
        lam_grid, tau_grid, m_grid: values to try.
        is_correct: the task's answer check (e.g. ``task.is_correct``).
        mu: weight of z(prompt->rationale) in every score.
    """
    recs = [r if isinstance(r, QuestionRecord) else QuestionRecord.from_dict(r) for r in records]
    golds = list(golds)
    if not recs:
        raise InputError("calibrate: no records; give one QuestionRecord per dev question.")
    if len(golds) != len(recs):
        raise InputError(f"calibrate: {len(recs)} records but {len(golds)} golds; give one gold per record.")
    if not callable(is_correct):
        raise InputError(
            "calibrate: is_correct must be a function (answer, gold) -> bool, e.g. task.is_correct."
        )
    lams = _check_grid(lam_grid, "lam_grid", _check_lam)
    taus = _check_grid(tau_grid, "tau_grid", _check_tau)
    ms = _check_grid(m_grid, "m_grid", _check_m)
    mu = _check_mu(mu, "calibrate")
    n = len(recs)

    correct_cache: dict[tuple[int, Answer], bool] = {}

    def ok(q: int, ans: Answer) -> bool:
        key = (q, ans)
        if key not in correct_cache:
            correct_cache[key] = bool(is_correct(ans, golds[q]))
        return correct_cache[key]

    scores_by_lam = {lam: [r.scores(lam, mu) for r in recs] for lam in lams}

    ss_rows: list[dict[str, Any]] = []
    for lam in lams:
        for tau in taus:
            picks = [iap_ss(s, r.answers, tau) for s, r in zip(scores_by_lam[lam], recs, strict=True)]
            acc = sum(ok(q, p.answer) for q, p in enumerate(picks)) / n
            ss_rows.append({"strategy": "iap_ss", "param": "grid", "value": None, "lam": lam,
                            "tau": tau, "accuracy": acc,
                            "mean_tried": sum(p.n_tried for p in picks) / n})
    mv_rows: list[dict[str, Any]] = []
    for lam in lams:
        for m in ms:
            picks = [iap_mv(s, r.answers, m) for s, r in zip(scores_by_lam[lam], recs, strict=True)]
            acc = sum(ok(q, p.answer) for q, p in enumerate(picks)) / n
            mv_rows.append({"strategy": "iap_mv", "param": "grid", "value": None, "lam": lam,
                            "m": m, "accuracy": acc,
                            "mean_tried": sum(p.n_tried for p in picks) / n})

    def best(rows):  # first row with the top accuracy (grid order breaks ties)
        top = max(r["accuracy"] for r in rows)
        return next(r for r in rows if r["accuracy"] == top)

    b_ss, b_mv = best(ss_rows), best(mv_rows)
    sens: list[dict[str, Any]] = []
    for rows, b, other in ((ss_rows, b_ss, "tau"), (mv_rows, b_mv, "m")):
        for r in rows:
            if r[other] == b[other]:
                sens.append({**r, "param": "lam", "value": r["lam"]})
        for r in rows:
            if r["lam"] == b["lam"]:
                sens.append({**r, "param": other, "value": r[other]})

    n_prompts = {len(r.answers) for r in recs}
    single: list[float] | None = None
    if len(n_prompts) == 1:
        k = n_prompts.pop()
        single = [sum(ok(q, r.answers[j]) for q, r in enumerate(recs)) / n for j in range(k)]
    baselines = {
        "single": single,
        "majority": sum(ok(q, majority_vote(r.answers)) for q, r in enumerate(recs)) / n,
        "oracle": sum(any(ok(q, a) for a in r.answers) for q, r in enumerate(recs)) / n,
    }
    return CalibrationResult(
        best_ss={"lam": b_ss["lam"], "tau": b_ss["tau"], "accuracy": b_ss["accuracy"],
                 "mean_tried": b_ss["mean_tried"]},
        best_mv={"lam": b_mv["lam"], "m": b_mv["m"], "accuracy": b_mv["accuracy"]},
        sensitivity=tuple(sens),
        grid=tuple(ss_rows + mv_rows),
        baselines=baselines,
        n_questions=n,
        mu=mu,
    )


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


@dataclass(frozen=True)
class PairRecord:
    """One (question, prompt) pair, generated and scored once.

    Attributes:
        question_index, prompt_index: positions in the question list and the pool.
        prompt, group: the prompt's text and group.
        rationale: the generated text; ``rationale_ids`` its token ids (no EOS).
        stop_reason: why generation stopped.
        flows: flow name -> per-layer mean flow ``flow_l(source->target)`` (all layers, in
            ``layers`` order); ``{}`` when the rationale is empty (nothing to measure).
        flow_means: flow name -> mean of ``flows`` over the config's layer set of that flow
            (the value that is standardised); ``{}`` when unscored.
        layer_sets: flow name -> the layer indices averaged.
        flows_per_head: flow name -> ``[layer][head]`` flows (``per_head`` runs only).
        n_tokens: tokens per segment and in total.
        loss: the teacher-forced mean NLL of the rationale (the saliency loss).
        chat_template: whether the input went through the tokenizer's chat template.
    """

    question_index: int
    prompt_index: int
    prompt: str
    group: str
    rationale: str
    rationale_ids: tuple[int, ...]
    stop_reason: str
    flows: Mapping[str, list[float]]
    flow_means: Mapping[str, float]
    layer_sets: Mapping[str, list[int]]
    n_tokens: Mapping[str, int]
    loss: float | None
    chat_template: bool
    layers: tuple[int, ...] = ()
    flows_per_head: Mapping[str, list[list[float]]] | None = None

    @property
    def scored(self) -> bool:
        return bool(self.flow_means)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question_index": self.question_index,
            "prompt_index": self.prompt_index,
            "prompt": self.prompt,
            "group": self.group,
            "rationale": self.rationale,
            "rationale_ids": list(self.rationale_ids),
            "stop_reason": self.stop_reason,
            "flows": {k: list(v) for k, v in self.flows.items()},
            "flow_means": dict(self.flow_means),
            "layer_sets": {k: list(v) for k, v in self.layer_sets.items()},
            "layers": list(self.layers),
            "n_tokens": dict(self.n_tokens),
            "loss": self.loss,
            "chat_template": self.chat_template,
            "flows_per_head": self.flows_per_head,
        }


def _flow_list(t: Tensor) -> list[float]:
    return [float(x) for x in t.double().cpu().tolist()]


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
    from tqdm.auto import tqdm

    from dpc_lens.generation import generate
    from dpc_lens.saliency import SaliencyConfig, compute_saliency
    from dpc_lens.segments import PromptBatch, SegmentLayout

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
    layer_sets = {k: list(v) for k, v in cfg.ss.layers(adapter.n_layers).items()}
    sal_cfg = SaliencyConfig(loss_segments=("rationale",), flow_segments=_PAIR_SEGMENTS, fp32=cfg.fp32)
    head_cfg = replace(sal_cfg, per_head=True) if cfg.per_head else None
    flows: list[dict[str, list[float]]] = [{} for _ in items]
    heads: list[dict[str, list[list[float]]] | None] = [None] * len(items)
    losses: list[float | None] = [None] * len(items)
    layers: tuple[int, ...] = ()
    todo = [i for i, g in enumerate(gens) if len(g.token_ids) > 0]
    step = cfg.saliency_batch_size
    for s in tqdm(range(0, len(todo), step), desc=f"{desc}: saliency", disable=not progress, leave=False):
        idx = todo[s:s + step]
        seqs, lays = [], []
        for i in idx:
            ids, spans, _ = encoded[i]
            r = list(gens[i].token_ids)
            seqs.append(ids + r)
            n = len(ids) + len(r)
            lays.append(SegmentLayout({**spans, "rationale": (len(ids), n)}, n))
        batch = PromptBatch.build(adapter, seqs, lays)
        res = compute_saliency(adapter, batch, sal_cfg)
        layers = res.layers
        per_layer = res.flows(IAP_FLOWS)  # name -> [layer, batch]
        for b, i in enumerate(idx):
            flows[i] = {n: _flow_list(v[:, b]) for n, v in per_layer.items()}
            losses[i] = float(res.loss[b])
        if head_cfg is not None:
            hres = compute_saliency(adapter, batch, head_cfg)
            per_head = hres.flows(IAP_FLOWS)  # name -> [layer, batch, head]
            for b, i in enumerate(idx):
                heads[i] = {n: [[float(x) for x in row] for row in v[:, b].double().cpu().tolist()]
                            for n, v in per_head.items()}
    out = []
    for i, (qi, _, pi, p) in enumerate(items):
        ids, spans, templated = encoded[i]
        g = gens[i]
        means: dict[str, float] = {}
        if flows[i]:
            pos = {layer: k for k, layer in enumerate(layers)}
            for n in IAP_FLOWS:
                vals = [flows[i][n][pos[layer]] for layer in layer_sets[n]]
                means[n] = float(sum(vals) / len(vals))
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
    progress: bool = True,
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
    from tqdm.auto import tqdm

    examples = list(examples)
    if not examples:
        raise InputError(f"{desc}: no examples; give at least one question.")
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
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
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


def fit_standardizer(pairs: Sequence[Mapping[str, Any]]) -> FlowStandardizer:
    """:meth:`FlowStandardizer.fit` on the layer-set means of the scored pairs (one value per
    (question, prompt) pair and flow); unscored pairs (empty rationale) are left out."""
    vals: dict[str, list[float]] = {n: [] for n in IAP_FLOWS}
    for r in pairs:
        means = r.get("flow_means") or {}
        if all(n in means and means[n] is not None and math.isfinite(means[n]) for n in IAP_FLOWS):
            for n in IAP_FLOWS:
                vals[n].append(float(means[n]))
    return FlowStandardizer.fit(vals)


def _question_groups(pairs: Sequence[Mapping[str, Any]], n_prompts: int) -> list[list[Mapping[str, Any]]]:
    return [list(pairs[i:i + n_prompts]) for i in range(0, len(pairs), n_prompts)]


def question_records(
    pairs: Sequence[Mapping[str, Any]], n_prompts: int, standardizer: FlowStandardizer
) -> list[QuestionRecord]:
    """One :class:`QuestionRecord` (z-scores and answers in pool order) per question.

    An unscored pair (empty rationale, no flows) gets z-scores one below the lowest of its
    question's scored pairs on every flow (-1 when none is scored), so it scores last for every
    lam and mu >= 0: IAP-ss would only stop on it past every other prompt and IAP-mv ranks it
    last. Its answer is usually ``None`` anyway.
    """
    out = []
    for group in _question_groups(pairs, n_prompts):
        z: dict[str, list[float | None]] = {n: [] for n in IAP_FLOWS}
        for r in group:
            means = r.get("flow_means") or {}
            for n in IAP_FLOWS:
                z[n].append(float(standardizer.z(n, means[n])) if r.get("scored", bool(means)) else None)
        for n in IAP_FLOWS:
            known = [x for x in z[n] if x is not None]
            floor = (min(known) - 1.0) if known else -1.0
            z[n] = [floor if x is None else x for x in z[n]]
        out.append(QuestionRecord(z_qp=z[FLOW_QP], z_qr=z[FLOW_QR], z_pr=z[FLOW_PR],
                                  answers=[r["answer"] for r in group]))
    return out


def evaluate(
    pairs: Sequence[Mapping[str, Any]],
    pool: PromptPool,
    standardizer: FlowStandardizer,
    config: IAPRunConfig,
    task: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every strategy on cached pairs: per-question decisions and the summary table.

    Accuracies (fraction of questions whose answer ``task.is_correct``):

    * ``single[k]``: prompt k on every question (task-level prompting);
    * ``majority``: the plain majority answer over all prompts (:func:`majority_vote`);
    * ``iap_ss``: :func:`iap_ss` with ``config.ss`` (lam, mu, tau);
    * ``iap_mv``: :func:`iap_mv` with ``config.mv`` (lam, mu, m);
    * ``oracle``: some prompt is right (the ceiling of any per-instance choice).

    Cost per question, as a deployment would pay it (generations = backward passes = prompts
    that must be generated and scored): IAP-ss ``n_tried`` (it stops at the first prompt with
    S >= tau), IAP-mv and majority the pool size, a single prompt 1 generation and no backward.
    """
    n_prompts = len(pool)
    if len(pairs) % n_prompts:
        raise InputError(
            f"evaluate: {len(pairs)} pair records do not split into questions of {n_prompts} "
            "prompts; give every prompt's record for every question, question-major."
        )
    qrecs = question_records(pairs, n_prompts, standardizer)
    groups = _question_groups(pairs, n_prompts)
    ss, mv = config.ss, config.mv
    per_bwd = 2 if config.per_head else 1
    rows: list[dict[str, Any]] = []
    for qr, group in zip(qrecs, groups, strict=True):
        gold = group[0]["gold"]

        def ok(a: Answer, gold: str = gold) -> bool:
            return bool(task.is_correct(a, gold))

        s_ss, s_mv = qr.scores(ss.lam, ss.mu), qr.scores(mv.lam, mv.mu)
        pick_ss = iap_ss(s_ss, qr.answers, ss.tau)
        pick_mv = iap_mv(s_mv, qr.answers, mv.m)
        maj = majority_vote(qr.answers)
        rows.append({
            "id": group[0]["id"],
            "gold": gold,
            "answers": list(qr.answers),
            "correct": [bool(r["correct"]) for r in group],
            "z": {FLOW_QP: list(qr.z_qp), FLOW_QR: list(qr.z_qr), FLOW_PR: list(qr.z_pr)},
            "scores_ss": s_ss,
            "scores_mv": s_mv,
            "iap_ss": {**pick_ss.to_dict(), "correct": ok(pick_ss.answer)},
            "iap_mv": {**pick_mv.to_dict(), "correct": ok(pick_mv.answer)},
            "majority": {"answer": maj, "correct": ok(maj)},
            "oracle": any(bool(r["correct"]) for r in group),
        })
    n = len(rows)
    acc = lambda xs: sum(bool(x) for x in xs) / n if n else float("nan")  # noqa: E731
    single = {p.text: acc(r["correct"][k] for r in rows) for k, p in enumerate(pool)}
    best = max(single, key=single.get) if single else None
    mean_ss = sum(r["iap_ss"]["n_tried"] for r in rows) / n if n else float("nan")
    summary = {
        "n_questions": n,
        "n_prompts": n_prompts,
        "accuracy": {
            "single": single,
            "best_single": {"prompt": best, "accuracy": single.get(best)},
            "majority": acc(r["majority"]["correct"] for r in rows),
            "iap_ss": acc(r["iap_ss"]["correct"] for r in rows),
            "iap_mv": acc(r["iap_mv"]["correct"] for r in rows),
            "oracle": acc(r["oracle"] for r in rows),
        },
        "mean_prompts_tried_ss": mean_ss,
        "iap_ss_fallback_rate": acc(r["iap_ss"]["fallback"] for r in rows),
        "cost_per_question": {
            "single": {"generations": 1, "backward_passes": 0},
            "majority": {"generations": n_prompts, "backward_passes": 0},
            "iap_ss": {"generations": mean_ss, "backward_passes": mean_ss * per_bwd},
            "iap_mv": {"generations": n_prompts, "backward_passes": n_prompts * per_bwd},
            "note": ("What a deployment pays per question. IAP-ss stops at the first prompt whose "
                     "score clears tau (n_tried); IAP-mv scores the whole pool. This run computed "
                     "every pair once to evaluate all strategies from one cache."),
        },
        "pool": [p.to_dict() for p in pool],
    }
    return rows, summary


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
    progress: bool = True,
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
    return res


def run_iap(
    model: Any,
    examples: Sequence[Any],
    task: Any,
    pool: PromptPool | Sequence[Any] | None = None,
    config: IAPRunConfig | IAPConfig | None = None,
    *,
    standardizer: FlowStandardizer | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
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

    With ``out_dir`` the directory is locked for the run (:class:`dpc_lens.runs.RunLock`).
    """
    cfg = _as_run_config(config)
    pool = _as_pool(pool)
    if standardizer is not None and not isinstance(standardizer, FlowStandardizer):
        raise InputError(
            f"standardizer must be a FlowStandardizer (e.g. FlowStandardizer.load(path)), got "
            f"{type(standardizer).__name__}."
        )
    if out_dir is None:
        return _run_iap(model, examples, task, pool, cfg, standardizer, out_dir, resume, progress)
    from dpc_lens.runs import RunLock, check_out_dir

    out_dir = check_out_dir(out_dir)
    with RunLock(out_dir, "iap"):
        return _run_iap(model, examples, task, pool, cfg, standardizer, out_dir, resume, progress)


def _run_iap(model, examples, task, pool, cfg, standardizer, out_dir, resume, progress):
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
    rows, summary = evaluate(pairs, pool, std, cfg, task)
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


def format_summary(summary: Mapping[str, Any]) -> str:
    """The accuracy and cost table of a :func:`run_iap` summary as plain text."""
    acc = summary["accuracy"]
    cost = summary["cost_per_question"]
    lines = [f"n = {summary['n_questions']} questions x {summary['n_prompts']} prompts",
             f"{'method':<58} {'accuracy':>9} {'gen/q':>6} {'bwd/q':>6}"]
    for text, a in acc["single"].items():
        lines.append(f"{'single: ' + text:<58.58} {100 * a:>8.1f}% {1:>6} {0:>6}")
    for name in ("majority", "iap_ss", "iap_mv"):
        c = cost[name]
        gen, bwd = c["generations"], c["backward_passes"]
        lines.append(f"{name:<58} {100 * acc[name]:>8.1f}% {gen:>6.2f} {bwd:>6.2f}")
    lines.append(f"{'oracle (some prompt right)':<58} {100 * acc['oracle']:>8.1f}%")
    lines.append(f"IAP-ss mean prompts tried: {summary['mean_prompts_tried_ss']:.2f} "
                 f"of {summary['n_prompts']}")
    note = summary.get("standardizer", {}).get("note")
    if note:
        lines.append(f"standardiser: {note}")
    return "\n".join(lines)
