"""Synthetic multi-step arithmetic word problems: dpc_lens's own reasoning task.

No real data set can be downloaded where dpc_lens is developed, so the project ships a task it can
generate itself, with a gold chain-of-thought rationale, and a small model trained on it
(:mod:`dpc_lens.testbed.reasoner`). An example::

    question:  "Ann has 7 pens. She buys 5 more. She gives 3 away. How many pens does Ann have now?"
    rationale: "7+5=12. 12-3=9. The answer is 9."
    answer:    "9"

Every problem is a story (a *template*: possessions, a bus, a shop, ...) with a start quantity
and 1-5 operations, each told by one sentence. The rationale has one equation per operation and
ends with ``"The answer is N."``, so the numeric answer extraction of :mod:`dpc_lens.tasks.gsm8k`
reads it unchanged. Answers are correct by construction (the rationale is computed, never
typed), intermediate values never go negative, and every number stays below 100.

Distribution shift has three independent axes, all seeded:

- **steps**: the number of operations (train: 1-3; shifted: 4-5);
- **templates**: six train stories and three shifted stories whose words never occur in train;
- **phrasing**: each template tells its operations and question in a ``"standard"`` and an
  ``"alt"`` wording.

:func:`make_split` names the splits the project uses; :func:`generate_examples` is the general
generator behind them. Generation depends only on the arguments (``random.Random(seed)``), never
on global state, so the same call always returns the same problems.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpc_lens.errors import ConfigError, DataError
from dpc_lens.tasks.base import Example
from dpc_lens.tasks.io import _PLAIN_NUMBER, task_hint

__all__ = [
    "ArithTask",
    "Template",
    "TRAIN_TEMPLATES",
    "SHIFTED_TEMPLATES",
    "TEMPLATES",
    "SPLITS",
    "ANSWER_PREFIX",
    "generate_examples",
    "make_split",
    "make_mixture",
    "MIXTURES",
    "save_jsonl",
    "vocabulary_texts",
]

ANSWER_PREFIX = "The answer is"
"""The rationale's last sentence is ``f"{ANSWER_PREFIX} {answer}."``."""

Op = Literal["+", "-", "*"]
Phrasing = Literal["standard", "alt", "any"]

_MAX_VALUE = 99  # every start, operand, intermediate and answer lies in 0..99
_START_RANGE = (3, 20)
_ADD_RANGE = (1, 9)
_SUB_RANGE = (1, 9)
_MUL_RANGE = (2, 3)

# (name, subject pronoun) pairs; the pronoun starts a sentence, so it is capitalised.
_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Ann", "She"), ("Tom", "He"), ("Mia", "She"), ("Ben", "He"), ("Lily", "She"),
    ("Sam", "He"), ("Emma", "She"), ("Jack", "He"), ("Nora", "She"), ("Leo", "He"),
)


@dataclass(frozen=True)
class Template:
    """One story. Sentences are ``str.format`` patterns over ``name``, ``pron`` (capitalised
    subject pronoun), ``item`` (a plural noun from ``items``), ``n`` (start) and ``k`` (operand).

    ``ops[phrasing][op]`` lists the sentences that may tell operation ``op`` in that phrasing
    (one is drawn per step); ``question[phrasing]`` is the closing question.
    """

    name: str
    items: tuple[str, ...]
    setup: str
    ops: dict[str, dict[str, tuple[str, ...]]]
    question: dict[str, str]

    def __post_init__(self) -> None:
        for phrasing in ("standard", "alt"):
            if phrasing not in self.ops or phrasing not in self.question:
                raise ConfigError(
                    f"template {self.name!r} lacks the {phrasing!r} phrasing; every template "
                    "needs both 'standard' and 'alt' sentences"
                )
            for op in ("+", "-", "*"):
                if not self.ops[phrasing].get(op):
                    raise ConfigError(
                        f"template {self.name!r} has no {phrasing!r} sentence for {op!r}"
                    )


def _t(name, items, setup, std, alt, q_std, q_alt) -> Template:
    return Template(
        name=name,
        items=tuple(items),
        setup=setup,
        ops={"standard": std, "alt": alt},
        question={"standard": q_std, "alt": q_alt},
    )


TRAIN_TEMPLATES: tuple[Template, ...] = (
    _t(
        "possession",
        ("pens", "pencils", "stickers", "marbles", "cards", "shells"),
        "{name} has {n} {item}.",
        {"+": ("{pron} buys {k} more.", "{pron} finds {k} more."),
         "-": ("{pron} gives {k} away.", "{pron} loses {k}."),
         "*": ("{pron} ends up with {k} times as many.",)},
        {"+": ("Then {pron_l} gets another {k}.", "A friend gives {name} {k} more."),
         "-": ("After that {pron_l} gives away {k}.", "{k} of them get lost."),
         "*": ("The number of {item} grows {k} times.",)},
        "How many {item} does {name} have now?",
        "What is the number of {item} {name} has in the end?",
    ),
    _t(
        "bus",
        ("passengers",),
        "A bus has {n} passengers.",
        {"+": ("At the next stop {k} people get on.",),
         "-": ("Then {k} people get off.",),
         "*": ("The number of passengers becomes {k} times as large.",)},
        {"+": ("{k} more riders board the bus.",),
         "-": ("{k} riders leave the bus.",),
         "*": ("Later there are {k} times as many riders.",)},
        "How many passengers are on the bus?",
        "How many people ride the bus now?",
    ),
    _t(
        "shop",
        ("apples", "lemons", "cakes", "loaves", "jars"),
        "A shop has {n} {item} on the shelf.",
        {"+": ("The owner brings {k} more.",),
         "-": ("Customers buy {k}.",),
         "*": ("The owner makes the stock {k} times as big.",)},
        {"+": ("A delivery adds {k} {item}.",),
         "-": ("{k} {item} are sold.",),
         "*": ("The stock grows {k} times.",)},
        "How many {item} are on the shelf?",
        "How many {item} does the shop have left?",
    ),
    _t(
        "park",
        ("trees", "flowers", "bushes"),
        "There are {n} {item} in the park.",
        {"+": ("Workers plant {k} more.",),
         "-": ("A storm knocks down {k}.",),
         "*": ("Workers plant until there are {k} times as many.",)},
        {"+": ("The town adds {k} {item}.",),
         "-": ("{k} {item} are removed.",),
         "*": ("The number of {item} grows {k} times.",)},
        "How many {item} are in the park now?",
        "How many {item} does the park have in the end?",
    ),
    _t(
        "money",
        ("dollars",),
        "{name} has {n} dollars.",
        {"+": ("{pron} earns {k} dollars.",),
         "-": ("{pron} spends {k} dollars.",),
         "*": ("{pron} ends up with {k} times as much money.",)},
        {"+": ("Then {pron_l} is paid {k} dollars.",),
         "-": ("{pron} pays {k} dollars for lunch.",),
         "*": ("{pron_poss} savings grow {k} times.",)},
        "How many dollars does {name} have now?",
        "How much money does {name} have in the end?",
    ),
    _t(
        "library",
        ("books",),
        "A library cart holds {n} books.",
        {"+": ("{k} books are returned to the cart.",),
         "-": ("{k} books are borrowed.",),
         "*": ("The cart is refilled to {k} times as many books.",)},
        {"+": ("A reader brings back {k} books.",),
         "-": ("Readers take {k} books home.",),
         "*": ("The number of books grows {k} times.",)},
        "How many books are on the cart?",
        "How many books does the cart hold now?",
    ),
)

SHIFTED_TEMPLATES: tuple[Template, ...] = (
    _t(
        "farm",
        ("sheep", "goats", "cows", "hens"),
        "A farmer keeps {n} {item} in a barn.",
        {"+": ("{k} more are born.",),
         "-": ("The farmer sells {k}.",),
         "*": ("The herd grows to {k} times its size.",)},
        {"+": ("Another {k} {item} arrive at the barn.",),
         "-": ("{k} {item} wander off.",),
         "*": ("The herd becomes {k} times larger.",)},
        "How many {item} are in the barn?",
        "How many {item} does the farmer keep now?",
    ),
    _t(
        "game",
        ("points",),
        "{name} scores {n} points in a game.",
        {"+": ("{pron} wins {k} points in the next round.",),
         "-": ("{pron} loses {k} points for a mistake.",),
         "*": ("A bonus multiplies {pron_poss_l} score by {k}.",)},
        {"+": ("A bonus round gives {name} {k} points.",),
         "-": ("A penalty costs {name} {k} points.",),
         "*": ("{pron_poss} score is multiplied by {k}.",)},
        "How many points does {name} have?",
        "What is the final score of {name}?",
    ),
    _t(
        "tank",
        ("fish",),
        "A fish tank has {n} fish.",
        {"+": ("{name} adds {k} fish.",),
         "-": ("{k} fish are moved to a pond.",),
         "*": ("{name} fills the tank with {k} times as many fish.",)},
        {"+": ("A pet store sends {k} fish.",),
         "-": ("{name} moves {k} fish out.",),
         "*": ("The fish count rises {k} times.",)},
        "How many fish are in the tank?",
        "How many fish swim in the tank now?",
    ),
)

TEMPLATES: dict[str, Template] = {t.name: t for t in TRAIN_TEMPLATES + SHIFTED_TEMPLATES}

_POSS = {"She": "Her", "He": "His"}


def _fill_pattern(pattern: str, *, name: str, pron: str, item: str, n: int | None = None,
          k: int | None = None) -> str:
    return pattern.format(
        name=name, pron=pron, pron_l=pron.lower(), pron_poss=_POSS[pron],
        pron_poss_l=_POSS[pron].lower(), item=item, n=n, k=k,
    )


def _resolve_templates(templates: str | Sequence[str]) -> list[Template]:
    if isinstance(templates, str):
        if templates == "train":
            return list(TRAIN_TEMPLATES)
        if templates == "shifted":
            return list(SHIFTED_TEMPLATES)
        if templates == "all":
            return list(TRAIN_TEMPLATES + SHIFTED_TEMPLATES)
        templates = [templates]
    out = []
    for name in templates:
        if name not in TEMPLATES:
            raise ConfigError(
                f"unknown arith template {name!r}; expected 'train', 'shifted', 'all' or a list "
                f"of template names from {sorted(TEMPLATES)}"
            )
        out.append(TEMPLATES[name])
    if not out:
        raise ConfigError("templates is empty; give at least one template name")
    return out


def _resolve_steps(steps: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (steps, steps) if isinstance(steps, int) else tuple(steps)
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 1 or hi < lo or hi > 8:
        raise ConfigError(
            f"steps={steps!r} is not a step count or an inclusive (low, high) range with "
            "1 <= low <= high <= 8"
        )
    return lo, hi


def _draw_op(rng: random.Random, value: int, ops: Sequence[str]) -> tuple[str, int]:
    """One operation that keeps the value in 0..99 (always possible: '+' or '-' fits)."""
    choices = list(ops)
    while choices:
        op = rng.choice(choices)
        if op == "+" and value + _ADD_RANGE[0] <= _MAX_VALUE:
            return op, rng.randint(_ADD_RANGE[0], min(_ADD_RANGE[1], _MAX_VALUE - value))
        if op == "-" and value >= _SUB_RANGE[0]:
            return op, rng.randint(_SUB_RANGE[0], min(_SUB_RANGE[1], value))
        if op == "*" and value >= 1 and value * _MUL_RANGE[0] <= _MAX_VALUE:
            return op, rng.randint(_MUL_RANGE[0], min(_MUL_RANGE[1], _MAX_VALUE // value))
        choices.remove(op)
    raise ConfigError(f"no operation among {list(ops)} keeps the value {value} within 0..99")


def _apply(op: str, a: int, k: int) -> int:
    return a + k if op == "+" else a - k if op == "-" else a * k


def generate_examples(
    n: int,
    *,
    seed: int,
    steps: int | tuple[int, int] = (1, 3),
    templates: str | Sequence[str] = "train",
    phrasing: Phrasing = "standard",
    ops: Sequence[Op] = ("+", "-"),
    split: str = "custom",
    id_prefix: str | None = None,
) -> list[Example]:
    """``n`` arithmetic word problems drawn from ``random.Random(seed)``.

    Args:
        n: number of problems.
        seed: the only source of randomness; same arguments, same problems.
        steps: number of operations, an int or an inclusive ``(low, high)`` range (uniform).
        templates: ``"train"``, ``"shifted"``, ``"all"`` or a list of template names (uniform).
        phrasing: ``"standard"``, ``"alt"`` or ``"any"`` (each problem draws one).
        ops: the operations to draw from (``"+"``, ``"-"``, ``"*"``; ``"*"`` by 2 or 3 only).
        split: recorded in ``meta["split"]``.
        id_prefix: ids are ``f"{id_prefix}-{i}"``; default ``f"arith-{split}-{seed}"``.

    Returns:
        Examples with ``answer`` the final value as a string, ``rationale`` one equation per
        step then ``"The answer is N."``, and ``meta`` holding ``steps``, ``template``,
        ``phrasing``, ``split``, ``ops`` (the operations, in order) and ``values`` (start and
        every intermediate value).
    """
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} must be a non-negative int (the number of problems)")
    lo, hi = _resolve_steps(steps)
    pool = _resolve_templates(templates)
    if phrasing not in ("standard", "alt", "any"):
        raise ConfigError(f"phrasing={phrasing!r}; expected 'standard', 'alt' or 'any'")
    ops = tuple(ops)
    if not ops or any(op not in ("+", "-", "*") for op in ops):
        raise ConfigError(f"ops={ops!r}; expected a non-empty subset of ('+', '-', '*')")
    prefix = id_prefix if id_prefix is not None else f"arith-{split}-{seed}"

    rng = random.Random(seed)
    out: list[Example] = []
    for i in range(n):
        tpl = rng.choice(pool)
        style = rng.choice(("standard", "alt")) if phrasing == "any" else phrasing
        name, pron = rng.choice(_PEOPLE)
        item = rng.choice(tpl.items)
        n_steps = rng.randint(lo, hi)
        value = rng.randint(*_START_RANGE)
        values = [value]
        sentences = [_fill_pattern(tpl.setup, name=name, pron=pron, item=item, n=value)]
        equations = []
        op_list = []
        for _ in range(n_steps):
            op, k = _draw_op(rng, value, ops)
            new = _apply(op, value, k)
            sentences.append(
                _fill_pattern(rng.choice(tpl.ops[style][op]), name=name, pron=pron, item=item, k=k)
            )
            equations.append(f"{value}{op}{k}={new}.")
            op_list.append(op)
            value = new
            values.append(value)
        sentences.append(_fill_pattern(tpl.question[style], name=name, pron=pron, item=item))
        # Sentences may open with a number ("3 riders leave the bus."): fine for the tokenizer.
        question = " ".join(sentences)
        rationale = " ".join(equations + [f"{ANSWER_PREFIX} {value}."])
        out.append(
            Example(
                id=f"{prefix}-{i}",
                question=question,
                answer=str(value),
                rationale=rationale,
                meta={
                    "steps": n_steps,
                    "template": tpl.name,
                    "phrasing": style,
                    "split": split,
                    "ops": op_list,
                    "values": values,
                },
            )
        )
    return out


# name -> generator arguments. "train"/"dev"/"test" share one distribution (drawn with
# different seeds); the others shift it along one or more axes.
SPLITS: dict[str, dict] = {
    "train": dict(steps=(1, 3), templates="train", phrasing="standard"),
    "dev": dict(steps=(1, 3), templates="train", phrasing="standard"),
    "test": dict(steps=(1, 3), templates="train", phrasing="standard"),
    "steps4": dict(steps=4, templates="train", phrasing="standard"),
    "steps5": dict(steps=5, templates="train", phrasing="standard"),
    "long": dict(steps=(4, 5), templates="train", phrasing="standard"),
    "alt": dict(steps=(1, 3), templates="train", phrasing="alt"),
    "new_templates": dict(steps=(1, 3), templates="shifted", phrasing="any"),
    "shifted": dict(steps=(4, 5), templates="shifted", phrasing="any"),
}


def make_split(name: str, n: int, seed: int = 0) -> list[Example]:
    """A named split (see :data:`SPLITS`): ``n`` problems, seeded.

    The split name is mixed into the seed (CRC32), so ``make_split("train", n, 0)`` and
    ``make_split("test", n, 0)`` draw different problems from the same distribution.
    """
    if name not in SPLITS:
        raise ConfigError(f"unknown arith split {name!r}; expected one of {sorted(SPLITS)}")
    sub_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
    return generate_examples(
        n, seed=sub_seed, split=name, id_prefix=f"arith-{name}-{seed}", **SPLITS[name]
    )


# DPC test-bed mixtures: half standard phrasing (the base reasoner solves these), half "alt"
# phrasing (it solves about a third). "mixed_train"/"mixed_dev"/"mixed_test" share one
# distribution and differ only in seed. A soft prompt tuned on "mixed_train" (recommended: the
# paper's setting, prompt tuned on the task's own train split) lifts alt and loses a few
# problems of both parts, so base and prompt-tuned accuracy on "mixed_test" are close with flips
# both ways (measured: 65.0 vs 67.8%, 39 lost, 56 gained). Tuned on "alt_train" (a stress
# variant) it hurts standard phrasing more: 65.0 vs 61.7-65.3%, 69-84 lost, 64-71 gained.
MIXTURES: dict[str, tuple[tuple[str, float], ...]] = {
    "mixed_train": (("test", 0.5), ("alt", 0.5)),
    "mixed_dev": (("test", 0.5), ("alt", 0.5)),
    "mixed_test": (("test", 0.5), ("alt", 0.5)),
    "alt_train": (("alt", 1.0),),
}


def make_mixture(name: str | Sequence[tuple[str, float]], n: int, seed: int = 0) -> list[Example]:
    """``n`` problems from several splits: a named mixture (see :data:`MIXTURES`) or
    ``(split, weight)`` pairs.

    Part sizes are ``n * weight / sum(weights)`` rounded down, the remainder going to the
    first parts; each part is drawn with its own seed (from the mixture name, part and
    ``seed``), then the parts are shuffled together with a seeded shuffle. ``meta["split"]``
    keeps each problem's own split; ids are ``f"{mixture}-{seed}-{i}"``.
    """
    if isinstance(name, str):
        if name not in MIXTURES:
            raise ConfigError(f"unknown arith mixture {name!r}; expected one of "
                              f"{sorted(MIXTURES)} or a list of (split, weight) pairs")
        label, parts = name, MIXTURES[name]
    else:
        parts = tuple(name)
        label = "mix_" + "_".join(s for s, _ in parts)
    if not parts or any(s not in SPLITS or not (isinstance(w, (int, float)) and w > 0)
                        for s, w in parts):
        raise ConfigError(f"mixture {parts!r}: expected (split, weight > 0) pairs with splits "
                          f"from {sorted(SPLITS)}")
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} must be a non-negative int (the number of problems)")
    total = sum(w for _, w in parts)
    sizes = [int(n * w / total) for _, w in parts]
    for i in range(n - sum(sizes)):
        sizes[i % len(sizes)] += 1
    out: list[Example] = []
    for (split, _), size in zip(parts, sizes):
        sub_seed = (seed * 1_000_003 + zlib.crc32(f"{label}/{split}".encode())) % (2**63)
        out.extend(generate_examples(size, seed=sub_seed, split=split, **SPLITS[split]))
    random.Random(seed * 7919 + zlib.crc32(label.encode())).shuffle(out)
    return [Example(id=f"{label}-{seed}-{i}", question=e.question, answer=e.answer,
                    rationale=e.rationale, meta=e.meta) for i, e in enumerate(out)]


def vocabulary_texts() -> list[str]:
    """Every sentence pattern filled with every name, pronoun and item (numbers as digits 0-9),
    plus the rationale's own words: a superset of the words the generator can produce, for
    building a tokenizer that never needs ``<unk>`` on this task."""
    texts: list[str] = [f"{ANSWER_PREFIX} 0123456789.", "0+1-2*3=4."]
    for tpl in TEMPLATES.values():
        patterns = [tpl.setup, *tpl.question.values()]
        for by_op in tpl.ops.values():
            for sentences in by_op.values():
                patterns.extend(sentences)
        for pattern in patterns:
            for name, pron in _PEOPLE:
                for item in tpl.items:
                    texts.append(_fill_pattern(pattern, name=name, pron=pron, item=item, n=10, k=2))
    return texts


def save_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    """Write examples as JSONL, one :meth:`Example.to_dict` record per line."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")


class ArithTask:
    """The Task interface for arithmetic word problems (name ``"arith"``).

    Answers are integers; extraction and comparison are the GSM8K numeric ones, so the DPC
    scoring code runs on this task unchanged.
    """

    name = "arith"

    def load(self, path: str | Path) -> list[Example]:
        """Read JSONL of :meth:`Example.to_dict` records (as written by :func:`save_jsonl`)."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"arith data file {str(p)!r} does not exist; write one with "
                            "dpc_lens.tasks.arith.save_jsonl(make_split(...), path)")
        out: list[Example] = []
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}); expected one "
                                    "Example record per line") from None
                if not isinstance(record, dict):
                    raise DataError(f"{p}:{lineno}: expected a JSON object, got "
                                    f"{type(record).__name__}")
                for key in ("question", "answer"):
                    if key not in record:
                        raise DataError(f"{p}:{lineno}: missing field {key!r}; each record "
                                        "needs 'question' and 'answer'." + task_hint(record, "arith"))
                if not _PLAIN_NUMBER.fullmatch(str(record["answer"])):
                    raise DataError(
                        f"{p}:{lineno}: field 'answer' is {str(record['answer'])[:60]!r}, not a plain "
                        "number; the arith task expects the final answer alone (e.g. \"12\"), so it "
                        "would be scored against the wrong number." + task_hint(record, "arith"))
                record.setdefault("id", str(lineno))
                out.append(Example.from_dict(record))
        return out

    def extract_answer(self, text: str) -> str | None:
        """The number after the last "The answer is", else the last number (GSM8K rules)."""
        from dpc_lens.tasks.gsm8k import extract_number_answer

        return extract_number_answer(text)

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        from dpc_lens.tasks.gsm8k import numbers_equal

        return prediction is not None and numbers_equal(prediction, gold)

    def accuracy(self, predictions: Sequence[str | None], golds: Sequence[str]) -> float:
        if len(predictions) != len(golds):
            raise DataError(f"{len(predictions)} predictions for {len(golds)} gold answers; "
                            "give one prediction per example")
        if not golds:
            return 0.0
        return sum(self.is_correct(p, g) for p, g in zip(predictions, golds)) / len(golds)
