"""GSM8K: the loader, and the numeric answer extraction and comparison every number task reuses.

GSM8K's JSONL has one ``{"question", "answer"}`` object per line; ``answer`` is the worked
solution with calculator annotations (``<<48/2=24>>``) and a last line ``#### 72``.

The plain functions :func:`extract_number_answer`, :func:`normalize_number` and
:func:`numbers_equal` are the numeric half of scoring; the synthetic arithmetic task reuses
them unchanged (its rationales end in "The answer is 9.").

Canonical number form (what :func:`normalize_number` returns and :class:`Example.answer` holds):
commas, ``$`` and trailing units dropped; an integer value is written as an integer ("18.00" ->
"18", "-3.0" -> "-3"); a value with a terminating decimal is written as the shortest decimal
("1/2" -> "0.5", "1,234.50" -> "1234.5"); any other fraction as ``p/q`` in lowest terms
("2/6" -> "1/3"). Numbers are compared exactly as fractions, never as floats.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction
from pathlib import Path

from dpc_lens.errors import DataError
from dpc_lens.tasks.base import Example, accuracy
from dpc_lens.tasks.io import _read_jsonl_numbered, _record_id, _require_str
from dpc_lens.tasks.math import last_boxed_content

__all__ = [
    "GSM8KTask",
    "extract_number_answer",
    "normalize_number",
    "numbers_equal",
]

# A number in free text. The look-behind keeps "x2" and the "3" of "5-3" from reading as
# numbers with a sign; thousands groups need exactly three digits ("1,2" is two numbers).
_NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?P<sign>[-\u2212]?)"
    r"\$?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+)(?![\d.,]\d))?"
)
# "The answer is 9", "Final answer: 9", "answer = 9", "#### 9".
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\b|:|=)|####", re.IGNORECASE)
_LATEX_FRAC = re.compile(
    r"(?P<sign>-?)\\[dt]?frac\s*\{\s*(?P<a>-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(?P<b>\d+(?:\.\d+)?)\s*\}"
)
_CALCULATOR = re.compile(r"<<[^<>]*>>")
# The end of the answer sentence: a line break, or a period followed by white space.
_SENTENCE_END = re.compile(r"\n|\.\s")


def normalize_number(text: str | int | float | None) -> str | None:
    """The first number in ``text`` in canonical form, or ``None`` when there is none.

    Accepts the forms seen in gold answers and generations: "1,234", "$1,234.50", "-3",
    "18.00", "1/2", "\\frac{1}{2}", "5 dollars", "72." (see the module docstring for the
    canonical form).
    """
    value = _first_number(text)
    return None if value is None else _format(value)


def numbers_equal(a: str | int | float | None, b: str | int | float | None) -> bool:
    """Whether two answers hold the same number ("18.00" == "18", "1/2" == "0.5").

    ``None`` or text without a number is never equal to anything.
    """
    x, y = _first_number(a), _first_number(b)
    return x is not None and y is not None and x == y


def extract_number_answer(text: str | None) -> str | None:
    """The final numeric answer in a generated rationale, canonical, or ``None``.

    Order of preference:
    1. the first number after the last answer marker that has one ("The answer is X",
       "answer: X", "answer = X", "#### X"), reading to the end of that sentence or line;
    2. the number in the last ``\\boxed{...}``;
    3. the last number anywhere in the text.
    """
    if not text:
        return None
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        rest = text[marker.end():].lstrip()
        segment = _SENTENCE_END.split(rest, maxsplit=1)[0]
        value = _first_number(segment)
        if value is not None:
            return _format(value)
    boxed = last_boxed_content(text)
    if boxed is not None:
        value = _first_number(boxed)
        if value is not None:
            return _format(value)
    values = _all_numbers(text)
    return _format(values[-1]) if values else None


@dataclass(frozen=True)
class GSM8KTask:
    """Grade-school maths word problems with a numeric final answer."""

    name: str = "gsm8k"

    def load(self, path: str | Path) -> list[Example]:
        """Read a GSM8K JSONL file.

        Each example: ``question`` as given; ``answer`` the canonical number after ``####``;
        ``rationale`` the worked solution with the calculator annotations removed and the
        ``#### n`` line rewritten as "The answer is n." (the form generations are scored in);
        ``meta["raw_answer"]`` the untouched ``answer`` field. ``id`` is the record's ``id``
        field when it has one, else the 1-based line number.
        """
        examples = []
        for line_no, record in _read_jsonl_numbered(
            path, "GSM8K", 'GSM8K JSONL file (one {"question": ..., "answer": ...} per line)'
        ):
            where = f"{str(path)!r}, line {line_no}"
            question = _require_str(record, "question", where)
            raw = _require_str(
                record, "answer", where, "the worked solution ending in '#### <number>'"
            )
            if "####" not in raw:
                raise DataError(
                    f"{where}: field 'answer' has no '#### <number>' line; expected GSM8K's "
                    "format, the worked solution then the final answer, e.g. "
                    "'She has 9 + 9 = 18 apples.\\n#### 18'."
                )
            body, final = raw.rsplit("####", 1)
            gold = normalize_number(final)
            if gold is None:
                raise DataError(
                    f"{where}: field 'answer' ends in '#### {final.strip()}', which is not a "
                    "number; expected '#### <number>', e.g. '#### 1,234' or '#### -3.5'."
                )
            body = _CALCULATOR.sub("", body).strip()
            final_text = f"The answer is {final.strip()}."
            examples.append(
                Example(
                    id=_record_id(record, str(line_no)),
                    question=question.strip(),
                    answer=gold,
                    rationale=f"{body}\n{final_text}" if body else final_text,
                    meta={"raw_answer": raw},
                )
            )
        return examples

    def extract_answer(self, text: str | None) -> str | None:
        """See :func:`extract_number_answer`."""
        return extract_number_answer(text)

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        return numbers_equal(prediction, gold)

    def accuracy(self, predictions: Sequence[str | None], golds: Sequence[str]) -> float:
        return accuracy(self.is_correct, predictions, golds)


def _prepare(text: str) -> str:
    """Rewrite LaTeX number forms into plain text: ``\\frac{1}{2}`` -> 1/2, ``1{,}000``."""
    text = text.replace("{,}", ",").replace("\\$", "$").replace("\\!", "").replace("\\,", "")

    def frac(m: re.Match[str]) -> str:
        a = m["a"]
        if m["sign"]:
            a = a[1:] if a.startswith("-") else "-" + a
        return f"{a}/{m['b']}"

    return _LATEX_FRAC.sub(frac, text)


def _to_fraction(m: re.Match[str]) -> Fraction | None:
    try:
        value = Fraction(Decimal(m["num"].replace(",", "")))
    except (InvalidOperation, ValueError):  # pragma: no cover - the regex admits only digits
        return None
    if m["den"] is not None:
        den = int(m["den"])
        if den == 0:
            return None
        value /= den
    return -value if m["sign"] else value


def _all_numbers(text: str) -> list[Fraction]:
    values = (_to_fraction(m) for m in _NUMBER.finditer(_prepare(text)))
    return [v for v in values if v is not None]


def _first_number(text: str | int | float | None) -> Fraction | None:
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = format(Decimal(repr(text)), "f") if isinstance(text, float) else str(text)
    for m in _NUMBER.finditer(_prepare(str(text))):
        value = _to_fraction(m)
        if value is not None:
            return value
    return None


def _format(value: Fraction) -> str:
    """Canonical text: integer, else the exact shortest decimal, else ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    den, places = value.denominator, 0
    for p in (2, 5):
        count = 0
        while den % p == 0:
            den //= p
            count += 1
        places = max(places, count)
    if den == 1:  # terminating decimal with `places` digits: exact at this precision
        with localcontext() as ctx:
            ctx.prec = len(str(abs(value.numerator))) + places + 2
            exact = Decimal(value.numerator) / Decimal(value.denominator)
        text = format(exact, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value.numerator}/{value.denominator}"
