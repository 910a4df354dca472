"""AQuA-RAT: algebra word problems with five lettered options; loader and letter extraction.

A line of the JSONL holds ``question``, ``options`` (``["A)21", "B)21.5", ...]``), ``correct``
(``"A"`` .. ``"E"``) and optionally ``rationale``.

The question the model sees is the question, a newline, then the options on one line in the
format of the chain-of-thought exemplars (Wei et al. 2022; Kojima et al. 2022)::

    A train covers ... ?
    Answer Choices: (A) 21 (B) 21.5 (C) 22 (D) 22.5 (E) 23

``meta["options"]`` maps each letter to its option text (``{"A": "21", ...}``), so a number in
a generation can be matched back to a letter. Answers are upper-case letters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpc_lens.errors import DataError
from dpc_lens.tasks.base import Example, accuracy
from dpc_lens.tasks.gsm8k import _NUMBER, extract_number_answer, numbers_equal
from dpc_lens.tasks.io import _read_jsonl_numbered, _record_id, _require_str

__all__ = ["AquaTask", "format_aqua_question", "parse_aqua_option"]

_OPTION = re.compile(r"^\s*\(?\s*([A-Za-z])\s*[).:]\s*(.*?)\s*$", re.DOTALL)
# "The answer is (C)", "answer: C", "Answer is option c", "correct option is (B)".
_MARKER = re.compile(
    r"\b(?:answer|correct\s+(?:option|choice))\s*(?:is\b|:|=)\s*:?\s*"
    r"(?:(?:option|choice)\s+)?",
    re.IGNORECASE,
)
# After a marker: "(c)" or "C" in any case, when the letter stands alone; a lower-case bare
# letter must end the clause so the article in "the answer is a number" does not count.
_MARKED_LETTER = re.compile(r"\(([A-Za-z])\)|([A-Z])(?![\w])|([a-z])(?=\s*(?:[.,;:!)]|$))")
_BARE_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def parse_aqua_option(option: str) -> tuple[str, str]:
    """``"A)21"`` -> ``("A", "21")``; also accepts ``"(A) 21"``, ``"A. 21"``, ``"a: 21"``.

    Raises:
        DataError: the text does not start with an option letter.
    """
    m = _OPTION.match(option) if isinstance(option, str) else None
    if not m:
        raise DataError(
            f"option {option!r} does not start with a letter and ')' ; expected AQuA's form "
            "'A)21' (also accepted: '(A) 21', 'A. 21')."
        )
    return m[1].upper(), m[2]


def format_aqua_question(question: str, options: Mapping[str, str]) -> str:
    """The question followed by ``Answer Choices: (A) .. (B) ..`` on its own line."""
    choices = " ".join(f"({letter}) {text}" for letter, text in options.items())
    return f"{question.strip()}\nAnswer Choices: {choices}"


@dataclass(frozen=True)
class AquaTask:
    """Multiple-choice algebra word problems; predictions and golds are option letters."""

    name: str = "aqua"

    def load(self, path: str | Path) -> list[Example]:
        """Read an AQuA-RAT JSONL file.

        ``question`` is :func:`format_aqua_question` of the question and options; ``answer``
        the upper-case letter of ``correct``; ``rationale`` the given rationale with
        "The answer is (X)." appended when it does not already end in an answer line (the form
        generations are scored in); ``meta["options"]`` the letter-to-text mapping. ``id`` is
        the record's ``id`` field when present, else the 1-based line number.
        """
        examples = []
        for line_no, record in _read_jsonl_numbered(
            path,
            "AQuA",
            'AQuA-RAT JSONL file (one {"question", "options", "correct"} object per line)',
        ):
            where = f"{str(path)!r}, line {line_no}"
            question = _require_str(record, "question", where)
            options = self._options(record, where)
            correct = _require_str(record, "correct", where, "an option letter such as 'C'")
            gold = correct.strip().strip("()").upper()
            if gold not in options:
                raise DataError(
                    f"{where}: field 'correct' is {correct!r}, which is not one of the option "
                    f"letters {', '.join(options)}; expected one of them."
                )
            rationale = record.get("rationale")
            if rationale is not None and not isinstance(rationale, str):
                raise DataError(
                    f"{where}: field 'rationale' is {rationale!r}; expected a string or no field."
                )
            if rationale is not None:
                rationale = rationale.strip()
                if _letter_after_markers(rationale.splitlines()[-1] if rationale else "") != gold:
                    rationale = f"{rationale}\nThe answer is ({gold})." if rationale else None
            examples.append(
                Example(
                    id=_record_id(record, str(line_no)),
                    question=format_aqua_question(question, options),
                    answer=gold,
                    rationale=rationale,
                    meta={"options": options},
                )
            )
        return examples

    def extract_answer(
        self, text: str | None, options: Mapping[str, str] | None = None
    ) -> str | None:
        """The option letter a generation chose, upper-case, or ``None``.

        Order of preference:
        1. the letter after the last answer marker that has one ("The answer is (C)",
           "answer: c", "correct option is B");
        2. the last parenthesised capital letter anywhere, "(C)";
        3. only when ``options`` (``example.meta["options"]``) is given: the option whose
           leading number equals the numeric answer (after the last answer marker, else in the
           last ``\\boxed{}``, else the last number in the text).
        Only letters that name an option count (A-E when ``options`` is not given).
        """
        if not text:
            return None
        valid = {k.upper() for k in options} if options else set("ABCDE")
        letter = _letter_after_markers(text, valid)
        if letter is not None:
            return letter
        for m in reversed(list(_BARE_PAREN_LETTER.finditer(text))):
            if m[1] in valid:
                return m[1]
        if options:
            return _match_number(text, options)
        return None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        if prediction is None:
            return False
        return prediction.strip().strip("()").upper() == gold.strip().strip("()").upper()

    def accuracy(self, predictions: Sequence[str | None], golds: Sequence[str]) -> float:
        return accuracy(self.is_correct, predictions, golds)

    @staticmethod
    def _options(record: Mapping[str, Any], where: str) -> dict[str, str]:
        raw = record.get("options")
        if not isinstance(raw, list) or not raw:
            what = "is missing" if "options" not in record else f"is {raw!r}"
            raise DataError(
                f"{where}: field 'options' {what}; expected a non-empty list like "
                "['A)21', 'B)21.5', 'C)22', 'D)22.5', 'E)23']."
            )
        options: dict[str, str] = {}
        for option in raw:
            try:
                letter, text = parse_aqua_option(option)
            except DataError as err:
                raise DataError(f"{where}: field 'options': {err}") from None
            if letter in options:
                raise DataError(
                    f"{where}: field 'options' names letter {letter!r} twice; expected each "
                    "option letter once."
                )
            options[letter] = text
        return options


def _letter_after_markers(text: str, valid: set[str] | None = None) -> str | None:
    valid = valid or set("ABCDE")
    for marker in reversed(list(_MARKER.finditer(text))):
        segment = text[marker.end():]
        m = _MARKED_LETTER.match(segment)
        if m:
            letter = (m[1] or m[2] or m[3]).upper()
            if letter in valid:
                return letter
    return None


def _match_number(text: str, options: Mapping[str, str]) -> str | None:
    """The letter of the one option that is exactly the generation's numeric answer (as
    :func:`~dpc_lens.tasks.gsm8k.extract_number_answer` reads it), or ``None``.

    An option matches when it holds exactly one number and that number equals the answer (units
    and currency around it are fine: "12 km/hr", "Rs. 500"); "5 and 1" holds two numbers and is
    never matched by "5". An answer matching no option, or more than one (ambiguous), is ``None``
    -- scored wrong, never guessed."""
    number = extract_number_answer(text)
    if number is None:
        return None
    hits = [letter.upper() for letter, value in options.items()
            if len(_NUMBER.findall(str(value))) == 1 and numbers_equal(value, number)]
    return hits[0] if len(hits) == 1 else None
