"""reasoning-gym tasks: any of its procedurally generated data sets, scored by its own scorer.

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (``pip install reasoning-gym``)
generates reasoning problems by name (``basic_arithmetic``, ``chain_sum``, ``gsm_symbolic``,
``letter_counting``, ``word_sorting``, ...), each data set with its own ``score_answer``.
:class:`GymTask` wraps one of them as a dpc_lens :class:`~dpc_lens.tasks.base.Task`::

    task = get_task("gym:basic_arithmetic")            # also: --task gym:basic_arithmetic
    exs = task.generate(size=300, seed=0, max_terms=3)  # any of the data set's config fields
    task.export_jsonl(exs, "basic_arithmetic.jsonl")    # the run repeats from this file
    exs = task.load("basic_arithmetic.jsonl")            # (scoring still uses reasoning-gym)

or from the shell: ``python -m dpc_lens.tasks.gym basic_arithmetic --size 300 --seed 0
--config '{"max_terms": 3}' --out basic_arithmetic.jsonl``, then
``dpc-lens dpc --task gym:basic_arithmetic --data basic_arithmetic.jsonl ...``.

**Answer convention.** Small chat models (SmolLM2) never write reasoning-gym's
``<answer>...</answer>`` tags, so its own extraction scores them 0. dpc_lens instead asks for and
reads the answer the GSM8K way: :attr:`Example.question` is the data set's question followed by
:data:`ANSWER_INSTRUCTION` ("... finish with 'The answer is <answer>.'"); the answer read from a
generation is, in order, the content of the last ``<answer>`` tag if any, else the text after the
last answer marker ("The answer is", "answer:", "####") up to the end of that line, else the last
``\\boxed{}``; for data sets whose gold answers are all numbers, GSM8K's numeric extraction
(:func:`~dpc_lens.tasks.gsm8k.extract_number_answer`: marker, box, else the last number) in its
canonical number form. That answer is scored with the data set's own ``score_answer(answer, entry)``;
it counts as correct when the score reaches :attr:`GymTask.min_score` (default 1.0: no partial
credit).

**Chat template.** Run instruct models through their chat template: :func:`chat_prompt_template`
turns a tokenizer's template into a dpc_lens prompt template (``"...{question}..."``) for
``DPCConfig.template`` / ``PromptTuningConfig.template``; IAP applies the template itself
(``IAPRunConfig.chat_template="auto"``).

**Scoring needs the entry.** Some scorers read the entry's metadata, but dpc_lens's pipelines call
``is_correct(prediction, gold)`` with the gold answer only. A :class:`GymTask` therefore remembers
the entries it generated or loaded, keyed by gold answer, and scores a prediction against the
entry with that gold answer (against all of them, requiring each to pass, when several share it).
Score predictions with the task object that generated or loaded the examples.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpc_lens.errors import ConfigError, DataError
from dpc_lens.tasks.base import Example, accuracy
from dpc_lens.tasks.gsm8k import _ANSWER_MARKER, extract_number_answer
from dpc_lens.tasks.io import _read_jsonl_numbered, write_jsonl
from dpc_lens.tasks.math import last_boxed_content

__all__ = [
    "ANSWER_INSTRUCTION",
    "GymTask",
    "chat_prompt_template",
    "extract_gym_answer",
    "gym_datasets",
]

ANSWER_INSTRUCTION = "Think step by step, then finish with a line of the form 'The answer is <answer>.'"
"""Appended (after a blank line) to every reasoning-gym question: the answer convention."""

_PLAIN_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_INSTALL = "pip install reasoning-gym (or the extra: pip install 'dpc_lens[gym]')"


def _rg() -> Any:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ConfigError(f"reasoning-gym tasks need the reasoning-gym package: {_INSTALL}")
    import reasoning_gym

    return reasoning_gym


def gym_datasets() -> list[str]:
    """The names of every data set the installed reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS  # noqa: F401  (import registers them)

    _rg()
    return sorted(DATASETS)


def extract_gym_answer(text: str | None, *, numeric: bool = False) -> str | None:
    """The answer in a generation under the answer convention of the module docstring."""
    if not text:
        return None
    tagged = [m.group(1).strip() for m in _ANSWER_TAG.finditer(text)]
    if numeric:
        return extract_number_answer(tagged[-1] if tagged else text)
    if tagged:
        return tagged[-1] or None
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        line = text[marker.end():].lstrip(" \t:=").split("\n", 1)[0].strip()
        line = line.strip("*`\"' ").rstrip(".").strip("*`\"' ")
        if line:
            return line
    boxed = last_boxed_content(text)
    return boxed.strip() if boxed and boxed.strip() else None


def chat_prompt_template(tokenizer: Any, *, system: str | None = None) -> str:
    """The tokenizer's chat template around one user turn, as a ``{question}`` template ending
    with the assistant turn's opening (``add_generation_prompt``). Braces in the template text
    are escaped, so ``template.format(question=q)`` is exactly ``apply_chat_template`` of ``q``.

    Raises:
        ConfigError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("The tokenizer has no chat template; use the plain template '{question}'.")
    marker = "\x00QUESTION\x00"
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": marker}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(marker) != 1:
        raise ConfigError("The chat template does not keep the user text verbatim; build the "
                          "prompt template by hand.")
    return text.replace("{", "{{").replace("}", "}}").replace(marker, "{question}")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class GymTask:
    """One reasoning-gym data set as a dpc_lens task (see the module docstring).

    Attributes:
        dataset: the reasoning-gym data set name; ``name`` is ``"gym:<dataset>"``.
        instruction: appended to each question (``None`` or ``""``: the bare question).
        min_score: a prediction is correct when ``score_answer`` reaches this (0 < min_score <= 1).
    """

    def __init__(self, dataset: str, *, instruction: str | None = ANSWER_INSTRUCTION,
                 min_score: float = 1.0) -> None:
        rg = _rg()
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            import difflib

            close = difflib.get_close_matches(dataset, sorted(DATASETS), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"reasoning-gym has no data set {dataset!r}.{hint} "
                              f"({len(DATASETS)} are registered; see dpc_lens.tasks.gym.gym_datasets().)")
        if not 0 < min_score <= 1:
            raise ConfigError(f"min_score must be in (0, 1], got {min_score}.")
        self._rg = rg
        self.dataset = dataset
        self.name = f"gym:{dataset}"
        self.instruction = instruction
        self.min_score = float(min_score)
        self._entries: dict[str, list[dict[str, Any]]] = {}
        self._scorers: dict[str, Any] = {}
        self._numeric: bool | None = None

    # ------------------------------------------------------------------ data
    def generate(self, size: int, seed: int = 0, **config: Any) -> list[Example]:
        """``size`` examples from the generator with ``seed`` and the data set's config fields
        (e.g. ``min_terms``/``max_terms``, ``difficulty``); deterministic given the arguments."""
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"size must be an int >= 1, got {size!r}.")
        try:
            ds = self._rg.create_dataset(self.dataset, size=size, seed=seed, **config)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"reasoning-gym rejected the config of {self.dataset!r} "
                              f"(size={size}, seed={seed}, {config}): {exc}") from exc
        spec = {"dataset": self.dataset, "size": size, "seed": seed, "config": _jsonable(config)}
        examples = []
        for i in range(size):
            entry = ds[i]
            meta = {"gym": dict(spec, index=i, question=entry["question"],
                                metadata=_jsonable(entry.get("metadata", {})))}
            raw_meta = entry.get("metadata")
            cot = raw_meta.get("answer_cot") if isinstance(raw_meta, dict) else None
            rationale = f"{cot.strip()}\nThe answer is {entry['answer']}." if isinstance(cot, str) else None
            examples.append(Example(id=f"{self.dataset}-{seed}-{i}",
                                    question=self._question(entry["question"]),
                                    answer=str(entry["answer"]), rationale=rationale, meta=meta))
        self._remember(examples)
        return examples

    def export_jsonl(self, examples: Sequence[Example], path: str | Path) -> int:
        """Write examples as JSON Lines (what :meth:`load` reads back); returns the count."""
        return write_jsonl(path, examples)

    def load(self, path: str | Path) -> list[Example]:
        """Read a JSONL file written by :meth:`export_jsonl` (or ``python -m dpc_lens.tasks.gym``).

        Raises:
            DataError: missing file, a malformed line, or a record of another data set.
        """
        examples = []
        for line_no, record in _read_jsonl_numbered(
                path, "reasoning-gym", "JSONL file written by dpc_lens.tasks.gym (export_jsonl)"):
            where = f"{str(path)!r}, line {line_no}"
            try:
                ex = Example.from_dict(record)
            except (KeyError, TypeError) as exc:
                raise DataError(f"{where}: not an exported example (missing {exc}); write the file "
                                "with GymTask.export_jsonl or python -m dpc_lens.tasks.gym.") from exc
            gym = ex.meta.get("gym")
            if not isinstance(gym, dict) or "question" not in gym:
                raise DataError(f"{where}: field meta.gym is missing; write the file with "
                                "GymTask.export_jsonl or python -m dpc_lens.tasks.gym.")
            if gym.get("dataset") != self.dataset:
                raise DataError(f"{where}: an example of reasoning-gym data set {gym.get('dataset')!r}, "
                                f"but the task is {self.name!r}; pass --task gym:{gym.get('dataset')}.")
            examples.append(ex)
        self._remember(examples)
        return examples

    def _question(self, question: str) -> str:
        return f"{question.strip()}\n\n{self.instruction}" if self.instruction else question.strip()

    def _remember(self, examples: Sequence[Example]) -> None:
        for ex in examples:
            gym = ex.meta["gym"]
            entry = {"question": gym["question"], "answer": ex.answer, "metadata": gym.get("metadata", {}),
                     "_config": json.dumps(gym.get("config", {}), sort_keys=True)}
            bucket = self._entries.setdefault(ex.answer, [])
            if entry not in bucket:
                bucket.append(entry)
        golds = list(self._entries)
        self._numeric = bool(golds) and all(_PLAIN_NUMBER.fullmatch(g) for g in golds)

    # --------------------------------------------------------------- scoring
    @property
    def numeric(self) -> bool:
        """Whether every gold answer seen so far is a plain number (then answers are read as
        numbers, GSM8K's way)."""
        return bool(self._numeric)

    def extract_answer(self, text: str | None) -> str | None:
        """See :func:`extract_gym_answer` (numeric when :attr:`numeric`)."""
        return extract_gym_answer(text, numeric=self.numeric)

    def _scorer(self, config_key: str) -> Any:
        if config_key not in self._scorers:
            config = json.loads(config_key)
            self._scorers[config_key] = self._rg.create_dataset(self.dataset, size=1, seed=0, **config)
        return self._scorers[config_key]

    def score(self, prediction: str | None, gold: str) -> float:
        """reasoning-gym's ``score_answer`` of ``prediction`` against the entry (entries) with this
        gold answer: the lowest score when several entries share it."""
        entries = self._entries.get(str(gold))
        if not entries:
            raise DataError(
                f"{self.name}: no generated or loaded example has the gold answer {gold!r}; score "
                "with the task object that generated or loaded the examples (its scorer needs the "
                "reasoning-gym entry, not only the answer).")
        scores = []
        for entry in entries:
            scorer = self._scorer(entry["_config"])
            clean = {k: v for k, v in entry.items() if k != "_config"}
            scores.append(float(scorer.score_answer(prediction, clean)))
        return min(scores)

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        if prediction is None:
            return False
        return self.score(prediction, gold) >= self.min_score

    def accuracy(self, predictions: Sequence[str | None], golds: Sequence[str]) -> float:
        return accuracy(self.is_correct, predictions, golds)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpc_lens.tasks.gym NAME --size N --seed S [--config JSON] --out FILE``."""
    ap = argparse.ArgumentParser(prog="python -m dpc_lens.tasks.gym",
                                 description="Export a reasoning-gym data set as dpc_lens JSONL.")
    ap.add_argument("dataset", help="reasoning-gym data set name, e.g. basic_arithmetic")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="{}", help="JSON object of the data set's config fields")
    ap.add_argument("--no-instruction", action="store_true", help="questions without ANSWER_INSTRUCTION")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--config is not JSON: {exc}") from exc
    task = GymTask(args.dataset, instruction=None if args.no_instruction else ANSWER_INSTRUCTION)
    n = task.export_jsonl(task.generate(args.size, args.seed, **config), args.out)
    print(f"{n} examples of {task.name} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
