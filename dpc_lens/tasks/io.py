"""Reading and writing task data files (JSON Lines) with errors that point at the bad line.

Every task loader goes through here, so a missing file, a line that is not JSON, or a record
that is not a JSON object always gives the same kind of message: the file, the 1-based line
number, what was wrong and how to fix it. Nothing here downloads anything: data sets are read
from local paths the user gives (see SPEC section 7).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dpc_lens.errors import DataError

__all__ = ["read_jsonl", "write_jsonl", "guess_task", "task_hint"]

_PLAIN_NUMBER = re.compile(r"\s*-?\d[\d,]*(?:\.\d+)?\s*")


def guess_task(record: Mapping[str, Any]) -> str | None:
    """The task whose file format ``record`` fits, from its fields alone (``None``: no idea).

    GSM8K: ``question`` + an ``answer`` holding ``#### n``; MATH: ``problem`` + ``solution``;
    AQuA: ``question`` + ``options`` + ``correct``; arith: ``question`` + a plain-number ``answer``.
    """
    if not isinstance(record, Mapping):
        return None
    answer = record.get("answer")
    if "problem" in record and "solution" in record:
        return "math"
    if "question" in record and "options" in record and "correct" in record:
        return "aqua"
    if "question" in record and isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    if "question" in record and isinstance(answer, (str, int, float)) and not isinstance(answer, bool) \
            and _PLAIN_NUMBER.fullmatch(str(answer)):
        return "arith"
    return None


def task_hint(record: Mapping[str, Any], task: str) -> str:
    """`` Fields present: ...; they look like a 'gsm8k' file (pass --task gsm8k).`` or less."""
    fields = ", ".join(sorted(map(str, record))) or "none"
    guess = guess_task(record)
    looks = (f" They look like a {guess!r} file: if it is one, pass --task {guess}."
             if guess is not None and guess != task else "")
    return f" Fields present: {fields}.{looks}"



def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file: one JSON object per line; blank lines are skipped.

    Raises:
        DataError: the file is missing, is a directory, is not UTF-8, or a line is not a JSON
            object (the message names the file and the 1-based line number).
    """
    return [record for _, record in _read_jsonl_numbered(path)]


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any] | Any]) -> int:
    """Write records as JSON Lines (UTF-8, one object per line) and return how many were written.

    A record is a mapping or an object with ``to_dict()`` (such as :class:`Example`). The parent
    directory is created when missing.

    Raises:
        DataError: a record is not a mapping or holds a value JSON cannot encode.
    """
    path = Path(path)
    lines: list[str] = []
    for index, record in enumerate(records):
        if hasattr(record, "to_dict"):
            record = record.to_dict()
        if not isinstance(record, Mapping):
            raise DataError(
                f"write_jsonl({str(path)!r}): record {index} is a {type(record).__name__}, "
                "expected a mapping (dict) or an object with to_dict(), such as an Example."
            )
        try:
            lines.append(json.dumps(dict(record), ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise DataError(
                f"write_jsonl({str(path)!r}): record {index} cannot be written as JSON ({err}); "
                "convert tensors and other objects to lists, numbers or strings first."
            ) from err
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if lines else "")
    path.write_text(text, encoding="utf-8")
    return len(lines)


def _check_file(path: str | Path, what: str, expected: str) -> Path:
    """The path as a Path, or a DataError saying it is missing and what to pass instead."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{what} file not found: {str(path)!r}. Pass the path to a local {expected}; "
            "dpc_lens never downloads data sets, so get the file first and point to it."
        )
    if path.is_dir():
        raise DataError(
            f"{what} path {str(path)!r} is a directory; pass the path to a {expected}."
        )
    return path


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: tolerate a byte-order mark that some editors write at the start.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text ({err}); re-save it as UTF-8."
        ) from err


def _read_jsonl_numbered(
    path: str | Path,
    what: str = "JSONL",
    expected: str = "JSON Lines file (one JSON object per line)",
) -> list[tuple[int, dict[str, Any]]]:
    """``(line_number, record)`` pairs, 1-based, so loaders can name the line of a bad field."""
    path = _check_file(path, what, expected)
    records: list[tuple[int, dict[str, Any]]] = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{str(path)!r}, line {line_no}: not valid JSON ({err.msg} at column "
                f"{err.colno}); each line must hold exactly one JSON object."
            ) from err
        if not isinstance(record, dict):
            raise DataError(
                f"{str(path)!r}, line {line_no}: expected a JSON object ({{...}}), got a "
                f"JSON {type(record).__name__}; each line must hold exactly one JSON object."
            )
        records.append((line_no, record))
    return records


def _require_str(
    record: Mapping[str, Any], key: str, where: str, expected: str = "a non-empty string"
) -> str:
    """``record[key]`` when it is a non-empty string, else a DataError naming place and field."""
    if key not in record:
        present = ", ".join(sorted(map(str, record))) or "none"
        guess = guess_task(record)
        looks = (f" These fields look like a {guess!r} data file: if it is one, pass --task {guess}."
                 if guess is not None else "")
        raise DataError(
            f"{where}: field {key!r} is missing; expected {expected}. "
            f"Fields present: {present}.{looks}"
        )
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} is {value!r}; expected {expected}.")
    return value


def _record_id(record: Mapping[str, Any], default: str, keys: tuple[str, ...] = ("id",)) -> str:
    """The record's own id under one of ``keys``, else ``default`` (the line number)."""
    for key in keys:
        value = record.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return default
