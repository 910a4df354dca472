"""Tests of the AQuA-RAT task: option parsing, question format, letter extraction, the loader.

Expected values are written by hand, never computed by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpc_lens.errors import DataError
from dpc_lens.tasks import load_examples
from dpc_lens.tasks.aqua import AquaTask, format_aqua_question, parse_aqua_option

_OPTIONS = {"A": "21", "B": "21.5", "C": "22", "D": "22.5", "E": "23"}

_RECORD = {
    "question": "Two friends plan to walk along a 43-km trail, starting at opposite ends. "
    "If Friend P's rate is 15% faster than Friend Q's, how many kilometers will Friend P "
    "have walked when they pass each other?",
    "options": ["A)21", "B)21.5", "C)22", "D)22.5", "E)23"],
    "rationale": "If Q complete x kilometers, then P completes 1.15x kilometers.\n"
    "x + 1.15x = 43\n2.15x=43\nx = 43/2.15 = 20\nThen P will have have walked 1.15*20=23 km.\n"
    "The answer is E.",
    "correct": "E",
}


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("A)21", ("A", "21")),
        ("B) 21.5", ("B", "21.5")),
        ("(C) 22", ("C", "22")),
        ("d. Rs. 1,200", ("D", "Rs. 1,200")),
        ("E:None of these", ("E", "None of these")),
    ],
)
def test_parse_aqua_option(option: str, expected: tuple[str, str]) -> None:
    assert parse_aqua_option(option) == expected


def test_parse_aqua_option_rejects_text_without_letter() -> None:
    with pytest.raises(DataError, match=r"option '21' does not start with a letter"):
        parse_aqua_option("21")


def test_format_aqua_question() -> None:
    assert format_aqua_question(" How far? ", _OPTIONS) == (
        "How far?\nAnswer Choices: (A) 21 (B) 21.5 (C) 22 (D) 22.5 (E) 23"
    )


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("1.15 * 20 = 23 km. The answer is (E).", "E"),
        ("So P walks 23 km. The answer is E.", "E"),
        ("Answer: C", "C"),
        ("ANSWER:B", "B"),
        ("The answer is option D", "D"),
        ("the correct option is (b)", "B"),
        # Lower-case letters.
        ("The answer is (c).", "C"),
        ("The answer is d", "D"),
        # The last marker with a letter wins.
        ("The answer is (A). Wait, recheck: 1.15*20 = 23. The answer is (E).", "E"),
        # No marker: the last parenthesised capital letter.
        ("(A) is too small and (B) too; (E) fits.", "E"),
        # The article "a" after a marker is not an option letter.
        ("The answer is a number close to 22, so (C)", "C"),
        # Letters outside A-E are not options.
        ("The answer is (F).", None),
        # A number with no options to match against gives nothing.
        ("The answer is 23.", None),
        ("I am not sure.", None),
        ("", None),
    ],
)
def test_aqua_extract_letter(generation: str, expected: str | None) -> None:
    assert AquaTask().extract_answer(generation) == expected


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("x = 20, so P walks 1.15*20 = 23 km. The answer is 23.", "E"),
        ("The answer is 21.50 km", "B"),
        ("P walks 22 km in the end", "C"),
        ("The answer is 24.", None),
        ("No numbers here.", None),
        # A letter still wins over a number.
        ("The answer is (A), about 23 km", "A"),
    ],
)
def test_aqua_extract_number_matched_to_options(generation: str, expected: str | None) -> None:
    assert AquaTask().extract_answer(generation, options=_OPTIONS) == expected


def test_aqua_options_restrict_valid_letters() -> None:
    three = {"A": "1", "B": "2", "C": "3"}
    assert AquaTask().extract_answer("The answer is (D).", options=three) is None
    assert AquaTask().extract_answer("The answer is (B).", options=three) == "B"


def test_aqua_is_correct_and_accuracy() -> None:
    task = AquaTask()
    assert task.is_correct("c", "C")
    assert task.is_correct("(C)", "C")
    assert not task.is_correct("B", "C")
    assert not task.is_correct(None, "C")
    assert task.accuracy(["A", "B", None, "d"], ["A", "C", "E", "D"]) == 0.5


# -------------------------------------------------------------------------------- loader


def _write(path: Path, records: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_aqua_load(tmp_path: Path) -> None:
    no_answer_line = dict(_RECORD, rationale="x + 1.15x = 43 so x = 20; P walks 23.", correct="e")
    no_rationale = {k: v for k, v in _RECORD.items() if k != "rationale"}
    path = _write(tmp_path / "aqua.jsonl", [_RECORD, no_answer_line, no_rationale])
    examples = load_examples(path, "aqua")
    assert [e.id for e in examples] == ["1", "2", "3"]
    assert [e.answer for e in examples] == ["E", "E", "E"]
    assert examples[0].question == (
        _RECORD["question"] + "\nAnswer Choices: (A) 21 (B) 21.5 (C) 22 (D) 22.5 (E) 23"
    )
    assert examples[0].meta == {"options": _OPTIONS}
    # A rationale that already ends with the answer is kept; otherwise the line is appended.
    assert examples[0].rationale == _RECORD["rationale"]
    assert examples[1].rationale == "x + 1.15x = 43 so x = 20; P walks 23.\nThe answer is (E)."
    assert examples[2].rationale is None


def test_aqua_load_missing_options_names_file_line_and_field(tmp_path: Path) -> None:
    bad = {k: v for k, v in _RECORD.items() if k != "options"}
    path = _write(tmp_path / "aqua_bad.jsonl", [_RECORD, _RECORD, bad])
    with pytest.raises(DataError) as info:
        AquaTask().load(path)
    msg = str(info.value)
    assert "aqua_bad.jsonl" in msg
    assert "line 3" in msg
    assert "field 'options' is missing" in msg
    assert "['A)21', 'B)21.5'" in msg


def test_aqua_load_bad_json_on_line_3(tmp_path: Path) -> None:
    path = _write(tmp_path / "aqua.jsonl", [_RECORD, _RECORD, '{"question": "x", "options": ['])
    with pytest.raises(DataError, match=r"aqua\.jsonl', line 3: not valid JSON"):
        AquaTask().load(path)


def test_aqua_load_correct_not_an_option(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [dict(_RECORD, correct="F")])
    with pytest.raises(
        DataError,
        match=r"line 1: field 'correct' is 'F', which is not one of the option letters "
        r"A, B, C, D, E",
    ):
        AquaTask().load(path)


def test_aqua_load_missing_correct(tmp_path: Path) -> None:
    bad = {k: v for k, v in _RECORD.items() if k != "correct"}
    path = _write(tmp_path / "a.jsonl", [bad])
    with pytest.raises(DataError, match=r"line 1: field 'correct' is missing; expected an option"):
        AquaTask().load(path)


def test_aqua_load_malformed_option(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [dict(_RECORD, options=["A)21", "21.5"])])
    with pytest.raises(DataError, match=r"line 1: field 'options': option '21.5' does not start"):
        AquaTask().load(path)


def test_aqua_load_duplicate_letter(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [dict(_RECORD, options=["A)21", "A)22"])])
    with pytest.raises(DataError, match=r"field 'options' names letter 'A' twice"):
        AquaTask().load(path)


def test_aqua_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "AQuA" / "test.json"
    with pytest.raises(DataError) as info:
        AquaTask().load(path)
    assert "AQuA file not found" in str(info.value)
    assert str(path) in str(info.value)
