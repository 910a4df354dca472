"""MATH (Hendrycks et al. 2021): the loader, ``\\boxed{}`` extraction and LaTeX answer equivalence.

Accepted layouts: a ``.jsonl`` file (one problem per line, as in MATH-500), a ``.json`` file
holding a list of problems (or one problem), or a directory of one-problem ``.json`` files
searched recursively (the original ``MATH/test/<subject>/<n>.json`` layout). A problem has
``problem`` and ``solution``; the gold answer is the content of the last ``\\boxed{...}`` (or
``\\fbox{...}``) in the solution, with nested braces, falling back to an ``answer`` field.
``level`` and ``type`` (or MATH-500's ``subject``) go into ``meta``.

Equivalence follows the idea of the reference ``is_equiv`` / ``strip_string`` of the MATH
paper, written here from its description and extended a little: both answers are normalised
(:func:`normalize_math_answer`) and compared as strings, and two plain numbers (integers,
decimals, ``\\frac{a}{b}``, ``a/b``) are also compared by value, so "0.5" matches
``\\frac12`` and "18.0" matches "18". Symbolic equivalence (``\\frac{\\sqrt2}{2}`` vs
``\\frac{1}{\\sqrt2}``) is out of scope, as in the reference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

from dpc_lens.errors import DataError
from dpc_lens.tasks.base import Example, accuracy
from dpc_lens.tasks.io import (
    _check_file,
    _read_jsonl_numbered,
    _read_text,
    _record_id,
    _require_str,
)

__all__ = [
    "MathTask",
    "last_boxed_content",
    "normalize_math_answer",
    "math_answers_equal",
]

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\b|:)", re.IGNORECASE)
_SENTENCE = re.compile(r"^(.*?)(?:\.\s|\.?$)", re.DOTALL)
_TEXT_UNITS = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{[^{}]*\}\s*$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"(-?)(\d+(?:\.\d*)?|\.\d+)")
_FRAC_NUMBER = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_SLASH_NUMBER = re.compile(r"(-?\d+)/(-?\d+)")


def last_boxed_content(text: str | None) -> str | None:
    """The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces
    allowed), or of a trailing ``\\boxed 5``; ``None`` when there is none.

    A box cut off before its closing brace (a truncated generation) is skipped in favour of
    an earlier complete one.
    """
    if not text:
        return None
    for match in reversed(list(_BOX.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _braced(text, i)
            if content is not None:
                return content.strip()
        elif i > match.end():  # "\boxed 5": the reference form without braces
            content = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
            if content:
                return content
    return None


def normalize_math_answer(answer: str | None) -> str:
    """A LaTeX answer in a canonical string form (after the reference ``strip_string``).

    Removes line breaks, spaces, ``\\!`` and other spacing commands, ``\\left``/``\\right``,
    degrees (``^\\circ``), dollar signs, percent signs, trailing units in ``\\text{...}``
    and trailing periods; unwraps ``\\text{...}``; turns ``dfrac``/``tfrac`` into ``frac``;
    fills braces (``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` -> ``\\sqrt{3}``); drops a short
    left-hand side (``x = 5`` -> ``5``); writes ``0.5`` and ``a/b`` as ``\\frac{..}{..}``;
    drops thousands commas and a trailing ``.0`` from plain numbers.
    """
    if answer is None:
        return ""
    s = str(answer).strip()
    inner = last_boxed_content(s) if s.startswith(("\\boxed", "\\fbox")) else None
    if inner is not None:
        s = inner
    s = s.replace("\n", "").replace("\\!", "")
    for spacing in ("\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "{,}"):
        s = s.replace(spacing, "," if spacing == "{,}" else "")
    s = s.replace("\\\\", "\\")
    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\u00b0", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _remove_units(s)
    s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    parts = s.split("=")
    if len(parts) == 2 and 0 < len(parts[0].strip()) <= 2:
        s = parts[1]
    s = s.replace(" ", "")
    s = _fill_braces(s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0*", s):
        s = s.split(".")[0]
    if s == "0.5":
        s = "\\frac{1}{2}"
    slash = _SLASH_NUMBER.fullmatch(s)
    if slash:
        s = f"\\frac{{{slash[1]}}}{{{slash[2]}}}"
    return s


def math_answers_equal(a: str | None, b: str | None) -> bool:
    """Whether two MATH answers are equivalent: same normalised string, or same number.

    ``None`` (no answer found) is never equal to anything.
    """
    if a is None or b is None:
        return False
    x, y = normalize_math_answer(a), normalize_math_answer(b)
    if not x or not y:
        return False
    if x == y:
        return True
    vx, vy = _number_value(x), _number_value(y)
    return vx is not None and vy is not None and vx == vy


@dataclass(frozen=True)
class MathTask:
    """Competition mathematics with LaTeX final answers in ``\\boxed{}``."""

    name: str = "math"

    def load(self, path: str | Path) -> list[Example]:
        """Read MATH problems from a ``.jsonl`` file, a ``.json`` file or a directory.

        ``id``: the record's ``id`` / ``unique_id`` when present, else the line number
        (``.jsonl``), the 1-based position (``.json`` list) or the file's path relative to the
        directory without ``.json`` (``algebra/1``). ``answer``: the normalised gold;
        ``rationale``: the solution as given; ``meta``: ``level``, ``type`` when present and
        ``raw_answer`` (the boxed text before normalisation).
        """
        p = Path(path)
        expected = (
            "MATH .jsonl file, .json file or directory of .json problem files "
            '(each problem {"problem": ..., "solution": ... \\boxed{...}})'
        )
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.json") if f.is_file())
            if not files:
                raise DataError(
                    f"MATH directory {str(p)!r} holds no .json problem files; pass a directory "
                    "laid out like MATH/test/<subject>/<n>.json, or a .jsonl / .json file."
                )
            items = []
            for f in files:
                record = _load_json(f)
                if not isinstance(record, dict):
                    raise DataError(
                        f"{str(f)!r}: expected one problem as a JSON object, got a JSON "
                        f"{type(record).__name__}."
                    )
                rel_id = f.relative_to(p).with_suffix("").as_posix()
                items.append((rel_id, repr(str(f)), record))
        else:
            _check_file(p, "MATH", expected)
            if p.suffix == ".jsonl":
                items = [
                    (str(n), f"{str(p)!r}, line {n}", r)
                    for n, r in _read_jsonl_numbered(p, "MATH", expected)
                ]
            elif p.suffix == ".json":
                data = _load_json(p)
                if isinstance(data, dict):
                    data = [data]
                if not isinstance(data, list):
                    raise DataError(
                        f"{str(p)!r}: expected a JSON list of problems or one problem object, "
                        f"got a JSON {type(data).__name__}."
                    )
                items = []
                for n, r in enumerate(data, start=1):
                    if not isinstance(r, dict):
                        raise DataError(
                            f"{str(p)!r}, item {n}: expected a problem object ({{...}}), got a "
                            f"JSON {type(r).__name__}."
                        )
                    items.append((str(n), f"{str(p)!r}, item {n}", r))
            else:
                raise DataError(
                    f"MATH path {str(p)!r} has suffix {p.suffix!r}; expected a {expected}."
                )
        return [self._example(default_id, where, record) for default_id, where, record in items]

    def extract_answer(self, text: str | None) -> str | None:
        """The normalised answer in the last ``\\boxed{}``; else after the last "The answer
        is" / "answer:" (up to the end of that sentence, ``$...$`` unwrapped); else ``None``."""
        if not text:
            return None
        boxed = last_boxed_content(text)
        if boxed is not None:
            return normalize_math_answer(boxed) or None
        for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
            rest = text[marker.end():].lstrip(" \t:")
            line = rest.split("\n", 1)[0].strip()
            if line.startswith("$"):
                candidate = line[1:].split("$", 1)[0]
            elif line.startswith("\\("):
                candidate = line[2:].split("\\)", 1)[0]
            else:
                candidate = _SENTENCE.match(line)[1]  # type: ignore[index]  # always matches
            normalized = normalize_math_answer(candidate)
            if normalized:
                return normalized
        return None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        return math_answers_equal(prediction, gold)

    def accuracy(self, predictions: Sequence[str | None], golds: Sequence[str]) -> float:
        return accuracy(self.is_correct, predictions, golds)

    def _example(self, default_id: str, where: str, record: Mapping[str, Any]) -> Example:
        problem = _require_str(record, "problem", where)
        solution = record.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise DataError(f"{where}: field 'solution' is {solution!r}; expected a string.")
        raw = last_boxed_content(solution)
        if raw is None and record.get("answer") not in (None, ""):
            raw = str(record["answer"])
        if raw is None:
            what = "is missing" if solution is None else "has no \\boxed{...} answer"
            raise DataError(
                f"{where}: field 'solution' {what} and there is no 'answer' field; expected "
                "the worked solution with the final answer in \\boxed{...}, as in MATH."
            )
        gold = normalize_math_answer(raw)
        if not gold:
            raise DataError(
                f"{where}: the gold answer {raw!r} is empty after normalisation; expected a "
                "non-empty \\boxed{...} in field 'solution'."
            )
        meta: dict[str, Any] = {"raw_answer": raw}
        if record.get("level") is not None:
            meta["level"] = record["level"]
        kind = record.get("type", record.get("subject"))
        if kind is not None:
            meta["type"] = kind
        return Example(
            id=_record_id(record, default_id, ("id", "unique_id")),
            question=problem.strip(),
            answer=gold,
            rationale=solution,
            meta=meta,
        )


def _braced(text: str, start: int) -> str | None:
    """The text inside the brace group opening at ``text[start] == "{"``; ``None`` if it never
    closes. Escaped braces (``\\{``) do not count."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _argument(s: str, i: int) -> tuple[str, int] | None:
    """One LaTeX argument at ``s[i]``: a brace group, a command (``\\pi``) or one character,
    returned braced, with the index after it."""
    if i >= len(s):
        return None
    if s[i] == "{":
        inner = _braced(s, i)
        if inner is None:
            return None
        return "{" + inner + "}", i + len(inner) + 2
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return "{" + m[0] + "}", i + len(m[0])
    return "{" + s[i] + "}", i + 1


def _fill_braces(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac{1}2`` -> ``\\frac{1}{2}``, ``\\sqrt3`` ->
    ``\\sqrt{3}``; anything it cannot parse is left as it was."""
    out: list[str] = []
    i = 0
    while i < len(s):
        m = re.match(r"\\(frac|sqrt)(?![a-zA-Z])", s[i:])
        if not m:
            out.append(s[i])
            i += 1
            continue
        j = i + len(m[0])
        head = m[0]
        if m[1] == "sqrt" and j < len(s) and s[j] == "[":  # \sqrt[3]{x}: keep the index
            close = s.find("]", j)
            if close != -1:
                head += s[j : close + 1]
                j = close + 1
        args: list[str] = []
        for _ in range(2 if m[1] == "frac" else 1):
            arg = _argument(s, j)
            if arg is None:
                break
            args.append(_fill_braces(arg[0][1:-1]).join("{}"))
            j = arg[1]
        if len(args) != (2 if m[1] == "frac" else 1):
            out.append(s[i:])
            break
        out.append(head + "".join(args))
        i = j
    return "".join(out)


def _number_value(s: str) -> Fraction | None:
    """The value of a normalised plain number (``-3``, ``2.50``, ``\\frac{1}{2}``), else None."""
    try:
        if m := _PLAIN_NUMBER.fullmatch(s):
            value = Fraction(Decimal(m[2]))
            return -value if m[1] else value
        if m := _FRAC_NUMBER.fullmatch(s):
            if int(m[3]) == 0:
                return None
            value = Fraction(int(m[2]), int(m[3]))
            return -value if m[1] else value
    except (InvalidOperation, ValueError):  # pragma: no cover - the patterns admit digits only
        return None
    return None


def _remove_units(s: str) -> str:
    """Drop a trailing ``\\text{ cm}``-style unit after a non-empty answer (``10\\text{ cm}``)."""
    if "\\text{ " in s:
        head = s.split("\\text{ ")[0].strip()
        if head:
            s = head
    m = _TEXT_UNITS.search(s)
    if m and re.search(r"[\d})]\s*$", s[: m.start()]):
        s = s[: m.start()].strip()
    return s


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{str(path)!r}: not valid JSON ({err.msg} at line {err.lineno}, column "
            f"{err.colno}); expected a MATH problem object or a list of them."
        ) from err
