"""Tests of the task registry, the JSONL helpers and GSM8K (loader, extraction, comparison).

Expected values are written by hand from the data-set formats, never computed by the code
under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpc_lens.errors import ConfigError, DataError, InputError
from dpc_lens.tasks import TASKS, Example, get_task, load_examples, read_jsonl, write_jsonl
from dpc_lens.tasks.gsm8k import (
    GSM8KTask,
    extract_number_answer,
    normalize_number,
    numbers_equal,
)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------- registry


def test_tasks_names() -> None:
    assert TASKS == ("gsm8k", "math", "aqua", "arith")


@pytest.mark.parametrize("name", ["gsm8k", "math", "aqua", " GSM8K ", "Math"])
def test_get_task_returns_task_with_that_name(name: str) -> None:
    task = get_task(name)
    assert task.name == name.strip().lower()
    for method in ("load", "extract_answer", "is_correct", "accuracy"):
        assert callable(getattr(task, method))


def test_get_task_arith_is_imported_lazily_and_reads_the_answer_line() -> None:
    pytest.importorskip("dpc_lens.tasks.arith")
    task = get_task("arith")
    assert task.name == "arith"
    assert task.extract_answer("7+5=12. 12-3=9. The answer is 9.") == "9"


def test_get_task_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("gsm8")
    msg = str(info.value)
    assert "unknown task 'gsm8'" in msg
    assert "gsm8k, math, aqua, arith" in msg
    assert "Did you mean 'gsm8k'?" in msg


def test_get_task_unknown_name_without_close_match() -> None:
    with pytest.raises(ConfigError, match="valid names are gsm8k, math, aqua, arith") as info:
        get_task("imagenet")
    assert "Did you mean" not in str(info.value)


def test_load_examples_by_name_and_by_object(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "g.jsonl",
        [json.dumps({"question": "How many?", "answer": "2 + 2 = 4\n#### 4"})],
    )
    by_name = load_examples(path, "gsm8k")
    by_object = load_examples(str(path), GSM8KTask())
    assert [e.answer for e in by_name] == ["4"]
    assert by_name == by_object


def test_load_examples_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown task 'aquarat'"):
        load_examples(tmp_path / "x.jsonl", "aquarat")


# ------------------------------------------------------------------------------ JSONL I/O


def test_write_then_read_jsonl_round_trip(tmp_path: Path) -> None:
    ex = Example(id="7", question="Q?", answer="3", rationale="1+2=3", meta={"k": [1, 2]})
    path = tmp_path / "sub" / "out.jsonl"
    n = write_jsonl(path, [{"a": 1, "b": "é"}, ex])
    assert n == 2
    assert path.read_text(encoding="utf-8").splitlines()[0] == '{"a": 1, "b": "é"}'
    records = read_jsonl(path)
    assert records[0] == {"a": 1, "b": "é"}
    assert records[1] == {
        "id": "7",
        "question": "Q?",
        "answer": "3",
        "rationale": "1+2=3",
        "meta": {"k": [1, 2]},
    }


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"x": 1}\n\n   \n{"x": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"x": 1}, {"x": 2}]


def test_read_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", ['{"x": 1}', '{"x": 2}', '{"x": 3,,}'])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    msg = str(info.value)
    assert "bad.jsonl" in msg
    assert "line 3" in msg
    assert "not valid JSON" in msg


def test_read_jsonl_non_object_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "list.jsonl", ['{"x": 1}', "[1, 2]"])
    with pytest.raises(DataError, match=r"line 2: expected a JSON object .* got a JSON list"):
        read_jsonl(path)


def test_read_jsonl_missing_file_says_path_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    msg = str(info.value)
    assert "file not found" in msg
    assert str(path) in msg
    assert "Pass the path to a local" in msg


def test_read_jsonl_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path)


def test_read_jsonl_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"q": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(path)


def test_write_jsonl_rejects_unserialisable_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="record 1 cannot be written as JSON"):
        write_jsonl(tmp_path / "o.jsonl", [{"a": 1}, {"a": object()}])
    with pytest.raises(DataError, match="record 0 is a list, expected a mapping"):
        write_jsonl(tmp_path / "o.jsonl", [[1, 2]])


# ------------------------------------------------------------------------- number helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18", "18"),
        ("18.00", "18"),
        ("-3", "-3"),
        ("-3.0", "-3"),
        ("1,234", "1234"),
        ("$1,234.50", "1234.5"),
        ("1,234,567", "1234567"),
        ("72.", "72"),
        ("5 dollars", "5"),
        ("$ 5", "5"),
        ("1/2", "0.5"),
        ("2/6", "1/3"),
        ("-1/4", "-0.25"),
        ("\\frac{3}{4}", "0.75"),
        ("-\\frac{1}{3}", "-1/3"),
        ("10{,}000", "10000"),
        ("0.125", "0.125"),
        (".5", "0.5"),
        ("\u22127", "-7"),
        (12, "12"),
        (2.5, "2.5"),
        ("no digits", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_number(text: object, expected: str | None) -> None:
    assert normalize_number(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("18.00", "18", True),
        ("1,234", "1234", True),
        ("$1,234.50", "1234.5", True),
        ("0.5", "1/2", True),
        ("-3", "3", False),
        ("18", "18.01", False),
        ("0.333", "1/3", False),
        (None, "3", False),
        ("three", "3", False),
        ("", "", False),
    ],
)
def test_numbers_equal(a: str | None, b: str | None, expected: bool) -> None:
    assert numbers_equal(a, b) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The chain-of-thought format, also the synthetic task's.
        ("7+5=12. 12-3=9. The answer is 9.", "9"),
        ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\nThe answer is 72.", "72"),
        # Commas, dollars and cents.
        ("He pays 3 x $411.50 = $1,234.50 in all. The answer is $1,234.50.", "1234.5"),
        ("The total is 1,000 + 250 = 1,250 dollars. The answer is 1,250", "1250"),
        # Negative answers; a minus between numbers is subtraction, not a sign.
        ("The temperature drops from 5 to -3 degrees. The answer is -3.", "-3"),
        ("So 10-4 = 6", "6"),
        # Other markers.
        ("48 / 2 = 24\n#### 24", "24"),
        ("Final answer: 15 apples", "15"),
        ("answer = 42", "42"),
        ("The answer is: 7", "7"),
        # The last marker with a number wins; earlier ones are superseded.
        ("The answer is 5. Wait, I made a mistake: 3 + 4 = 7. The answer is 7.", "7"),
        # A marker without a number falls back to an earlier one, then to other rules.
        ("The answer is 12.\nAnswer: twelve", "12"),
        ("The answer is unknown. We had 4 then 5", "5"),
        # Fractions.
        ("Each gets 1/2 of the cake. The answer is 1/2.", "0.5"),
        # Boxed, when there is no marker.
        ("So the total is $\\boxed{1,024}$ marbles, from 2 bags", "1024"),
        ("We get \\boxed{\\frac{3}{4}} of a pizza left over 2 days", "0.75"),
        # No marker, no box: the last number.
        ("She has 3 apples and buys 4 more, so 3 + 4 = 7 apples", "7"),
        ("Total: 2.50 + 3.25 = 5.75.", "5.75"),
        # Decimal answers with trailing zeros compare as their value.
        ("The answer is 18.00.", "18"),
        # Nothing to find.
        ("I do not know how to solve this.", None),
        ("The answer is unclear.", None),
        ("", None),
    ],
)
def test_extract_number_answer(text: str, expected: str | None) -> None:
    assert extract_number_answer(text) == expected


def test_extract_answer_ignores_numbers_glued_to_words() -> None:
    # "x2" and "H2O" are not numbers; the only number is 10.
    assert extract_number_answer("Let x2 be the amount of H2O, which is 10 litres") == "10"


# -------------------------------------------------------------------------- GSM8K loader


_GSM_LINES = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half "
        "as many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A shop earns $1,234.50 a day. How much in 2 days?",
        "answer": "1234.50*2=<<1234.50*2=2469>>2,469\n#### 2,469",
    },
    {
        "question": "The temperature was 4 and fell by 7. What is it now?",
        "answer": "4-7=<<4-7=-3>>-3\n#### -3",
        "id": "custom-3",
    },
    {"question": "Half of 1?", "answer": "1/2 = 0.50\n#### 0.50"},
]


def test_gsm8k_load(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "gsm.jsonl", [json.dumps(r) for r in _GSM_LINES])
    examples = GSM8KTask().load(path)
    assert [e.id for e in examples] == ["1", "2", "custom-3", "4"]
    assert [e.answer for e in examples] == ["72", "2469", "-3", "0.5"]
    assert examples[0].question.startswith("Natalia sold clips to 48")
    assert examples[0].rationale == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is 72."
    )
    assert examples[1].rationale == "1234.50*2=2,469\nThe answer is 2,469."
    assert examples[0].meta["raw_answer"] == _GSM_LINES[0]["answer"]


def test_gsm8k_gold_rationale_extracts_to_gold(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "gsm.jsonl", [json.dumps(r) for r in _GSM_LINES])
    task = GSM8KTask()
    examples = task.load(path)
    preds = [task.extract_answer(e.rationale) for e in examples]
    assert preds == ["72", "2469", "-3", "0.5"]
    assert task.accuracy(preds, [e.answer for e in examples]) == 1.0


def test_gsm8k_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "gsm_missing.jsonl",
        [json.dumps(_GSM_LINES[0]), json.dumps({"question": "Q?"})],
    )
    with pytest.raises(DataError) as info:
        GSM8KTask().load(path)
    msg = str(info.value)
    assert "gsm_missing.jsonl" in msg
    assert "line 2" in msg
    assert "field 'answer' is missing" in msg
    assert "#### <number>" in msg
    assert "Fields present: question" in msg


def test_gsm8k_bad_json_on_line_3(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "gsm_bad.jsonl",
        [json.dumps(_GSM_LINES[0]), json.dumps(_GSM_LINES[1]), '{"question": "Q", "answer": '],
    )
    with pytest.raises(DataError) as info:
        GSM8KTask().load(path)
    msg = str(info.value)
    assert "gsm_bad.jsonl" in msg
    assert "line 3" in msg
    assert "not valid JSON" in msg


def test_gsm8k_answer_without_hashes(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "Q", "answer": "It is 4"})])
    with pytest.raises(DataError, match=r"line 1: field 'answer' has no '#### <number>' line"):
        GSM8KTask().load(path)


def test_gsm8k_non_numeric_final_answer(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "g.jsonl", [json.dumps({"question": "Q", "answer": "so\n#### four"})]
    )
    with pytest.raises(DataError, match=r"ends in '#### four', which is not a number"):
        GSM8KTask().load(path)


def test_gsm8k_empty_question(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "  ", "answer": "#### 1"})])
    with pytest.raises(DataError, match=r"line 1: field 'question' is '  '; expected a non-empty"):
        GSM8KTask().load(path)


def test_gsm8k_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    with pytest.raises(DataError) as info:
        GSM8KTask().load(path)
    msg = str(info.value)
    assert msg.startswith("GSM8K file not found")
    assert str(path) in msg
    assert "never downloads data sets" in msg


def test_gsm8k_is_correct_and_accuracy() -> None:
    task = GSM8KTask()
    assert task.is_correct("18.0", "18")
    assert not task.is_correct(None, "18")
    assert not task.is_correct("17", "18")
    assert task.accuracy(["18", None, "1,000", "5"], ["18", "3", "1000", "6"]) == 0.5


def test_accuracy_rejects_mismatched_or_empty() -> None:
    task = GSM8KTask()
    with pytest.raises(InputError, match="got 2 predictions and 1 gold answers"):
        task.accuracy(["1", "2"], ["1"])
    with pytest.raises(InputError, match="zero examples is undefined"):
        task.accuracy([], [])
