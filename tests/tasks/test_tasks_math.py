"""Tests of the MATH task: boxed extraction, LaTeX normalisation and equivalence, the loaders.

Expected values are written by hand, never computed by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpc_lens.errors import DataError
from dpc_lens.tasks import get_task, load_examples
from dpc_lens.tasks.math import (
    MathTask,
    last_boxed_content,
    math_answers_equal,
    normalize_math_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is $\\boxed{5}$.", "5"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
        ("First \\boxed{3}, then correcting: \\boxed{x^{2}+\\{1\\}}", "x^{2}+\\{1\\}"),
        ("\\fbox{\\left(1, 2\\right)}", "\\left(1, 2\\right)"),
        ("The result is $\\boxed 7$.", "7"),
        ("\\boxed { 12 }", "12"),
        # A box cut off at the end of a generation falls back to the complete one before it.
        ("\\boxed{5} but then \\boxed{\\frac{6", "5"),
        ("no box here", None),
        ("\\boxed{\\frac{1}{2}", None),
        ("", None),
    ],
)
def test_last_boxed_content(text: str, expected: str | None) -> None:
    assert last_boxed_content(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("\\frac{1}2", "\\frac{1}{2}"),
        ("\\frac1{\\sqrt3}", "\\frac{1}{\\sqrt{3}}"),
        ("0.5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$18.00", "18"),
        ("10\\text{ cm}", "10"),
        ("4 \\mbox{inches}", "4"),
        ("\\text{(B)}", "(B)"),
        ("\\text{Monday}", "Monday"),
        ("50\\%", "50"),
        ("x = 5", "5"),
        ("k=\\frac{1}{3}", "\\frac{1}{3}"),
        ("y = 2x + 3", "2x+3"),
        ("10{,}000", "10000"),
        ("1,000", "1000"),
        ("(1,2)", "(1,2)"),
        (".5", "\\frac{1}{2}"),
        ("x^2 + 1.", "x^2+1"),
        ("\\!\\!5", "5"),
        ("\\sqrt[3]{2}", "\\sqrt[3]{2}"),
        ("\\boxed{7}", "7"),
        ("2\\sqrt{2}", "2\\sqrt{2}"),
        (None, ""),
    ],
)
def test_normalize_math_answer(answer: str | None, expected: str) -> None:
    assert normalize_math_answer(answer) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("\\frac12", "\\dfrac{1}{2}", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("0.25", "\\frac{1}{4}", True),
        ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
        ("18.0", "18", True),
        ("\\$1,000", "1000", True),
        ("10\\text{ cm}", "10", True),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("2", "3", False),
        ("\\frac{1}{3}", "0.33", False),
        ("\\sqrt{2}", "2", False),
        (None, "5", False),
        ("", "", False),
    ],
)
def test_math_answers_equal(a: str | None, b: str | None, expected: bool) -> None:
    assert math_answers_equal(a, b) is expected


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("We factor: $(x-2)(x+3)=0$, so the roots sum to $\\boxed{-1}$.", "-1"),
        ("Thus $r = \\boxed{\\dfrac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("Area is $\\boxed{12\\text{ cm}^2}$", "12"),
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("The answer is 3.5. Then we stop.", "3.5"),
        ("The answer is \\(x=4\\)", "4"),
        # Boxed beats a marker; the last box wins.
        ("The answer is 3. Actually \\boxed{4}", "4"),
        # Nothing to find.
        ("We cannot determine it without more data.", None),
        ("The answer is", None),
        ("", None),
    ],
)
def test_math_extract_answer(generation: str, expected: str | None) -> None:
    assert MathTask().extract_answer(generation) == expected


def test_math_is_correct_and_accuracy() -> None:
    task = MathTask()
    assert task.is_correct("\\frac{1}{2}", "\\frac{1}{2}")
    assert task.is_correct("0.5", "\\frac{1}{2}")
    assert not task.is_correct(None, "\\frac{1}{2}")
    preds = ["5", "\\frac{1}{3}", None]
    assert task.accuracy(preds, ["5", "\\frac13", "2"]) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------- loaders

_PROBLEMS = [
    {
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "solution": "We have $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\dfrac{3}{4}}$.",
        "level": "Level 2",
        "type": "Prealgebra",
    },
    {
        "problem": "Find the set $\\{x : x^2 = 1\\}$.",
        "solution": "Both signs work, so it is $\\boxed{\\{-1, 1\\}}$.",
        "level": "Level 1",
        "type": "Algebra",
    },
]


def test_math_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in _PROBLEMS) + "\n", encoding="utf-8")
    examples = MathTask().load(path)
    assert [e.id for e in examples] == ["1", "2"]
    assert [e.answer for e in examples] == ["\\frac{3}{4}", "\\{-1,1\\}"]
    assert examples[0].question == "What is $\\frac{1}{2} + \\frac{1}{4}$?"
    assert examples[0].rationale == _PROBLEMS[0]["solution"]
    assert examples[0].meta == {
        "raw_answer": "\\dfrac{3}{4}",
        "level": "Level 2",
        "type": "Prealgebra",
    }


def test_math_load_math500_style_jsonl(tmp_path: Path) -> None:
    record = {
        "problem": "Compute $2+2$.",
        "solution": "It is $\\boxed{4}$.",
        "answer": "4",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    }
    path = tmp_path / "math500.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (ex,) = load_examples(path, "math")
    assert ex.id == "test/prealgebra/1.json"
    assert ex.answer == "4"
    assert ex.meta["type"] == "Prealgebra"
    assert ex.meta["level"] == 1


def test_math_load_answer_field_when_no_box(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"problem": "P", "solution": "no box", "answer": "\\frac12"}) + "\n",
        encoding="utf-8",
    )
    (ex,) = MathTask().load(path)
    assert ex.answer == "\\frac{1}{2}"


def test_math_load_json_list(tmp_path: Path) -> None:
    path = tmp_path / "math.json"
    path.write_text(json.dumps(_PROBLEMS), encoding="utf-8")
    examples = MathTask().load(path)
    assert [e.id for e in examples] == ["1", "2"]
    assert examples[1].answer == "\\{-1,1\\}"


def test_math_load_directory_layout(tmp_path: Path) -> None:
    root = tmp_path / "MATH" / "test"
    (root / "algebra").mkdir(parents=True)
    (root / "prealgebra").mkdir(parents=True)
    (root / "prealgebra" / "12.json").write_text(json.dumps(_PROBLEMS[0]), encoding="utf-8")
    (root / "algebra" / "3.json").write_text(json.dumps(_PROBLEMS[1]), encoding="utf-8")
    examples = get_task("math").load(root)
    assert [e.id for e in examples] == ["algebra/3", "prealgebra/12"]
    assert [e.answer for e in examples] == ["\\{-1,1\\}", "\\frac{3}{4}"]
    assert examples[0].meta["level"] == "Level 1"


def test_math_load_missing_box_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "nobox.jsonl"
    bad = {"problem": "P", "solution": "The answer is 4."}
    path.write_text(
        "\n".join([json.dumps(_PROBLEMS[0]), json.dumps(_PROBLEMS[1]), json.dumps(bad)]) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        MathTask().load(path)
    msg = str(info.value)
    assert "nobox.jsonl" in msg
    assert "line 3" in msg
    assert "field 'solution' has no \\boxed{...} answer" in msg


def test_math_load_missing_problem_field(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"solution": "\\boxed{1}"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field 'problem' is missing"):
        MathTask().load(path)


def test_math_load_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_PROBLEMS[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.jsonl', line 2: not valid JSON"):
        MathTask().load(path)


def test_math_load_bad_json_file_in_directory(tmp_path: Path) -> None:
    (tmp_path / "1.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"1\.json': not valid JSON .* line 1"):
        MathTask().load(tmp_path)


def test_math_load_json_list_item_missing_problem(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([_PROBLEMS[0], {"solution": "\\boxed{2}"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.json', item 2: field 'problem' is missing"):
        MathTask().load(path)


def test_math_load_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no .json problem files"):
        MathTask().load(tmp_path)


def test_math_load_wrong_suffix(tmp_path: Path) -> None:
    path = tmp_path / "math.csv"
    path.write_text("problem,solution\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"has suffix '\.csv'; expected a MATH \.jsonl file"):
        MathTask().load(path)


def test_math_load_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "MATH" / "test.jsonl"
    with pytest.raises(DataError) as info:
        MathTask().load(path)
    assert str(path) in str(info.value)
    assert "MATH file not found" in str(info.value)
