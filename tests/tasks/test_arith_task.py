"""The synthetic arithmetic task: seeded, correct by construction, and shifted where it says."""

from __future__ import annotations

import json
import re

import pytest

from dpc_lens.errors import ConfigError, DataError
from dpc_lens.tasks.arith import (
    SHIFTED_TEMPLATES,
    SPLITS,
    TRAIN_TEMPLATES,
    ArithTask,
    generate_examples,
    make_split,
    save_jsonl,
)

_EQ = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)\.$")


def _check_rationale(ex) -> list[int]:
    """Re-evaluate the rationale independently; return the chain of values."""
    assert ex.rationale.endswith(f"The answer is {ex.answer}.")
    equations = ex.rationale[: -len(f"The answer is {ex.answer}.")].split()
    chain = []
    for eq in equations:
        m = _EQ.match(eq)
        assert m, f"malformed equation {eq!r} in {ex.rationale!r}"
        a, op, k, r = int(m[1]), m[2], int(m[3]), int(m[4])
        expected = {"+": a + k, "-": a - k, "*": a * k}[op]
        assert r == expected, f"{eq} is wrong"
        if chain:
            assert a == chain[-1], "each equation starts from the previous result"
        else:
            chain.append(a)
        chain.append(r)
    assert str(chain[-1]) == ex.answer
    assert all(0 <= v <= 99 for v in chain)
    return chain


def test_same_seed_same_data_different_seed_different():
    a = generate_examples(50, seed=3, steps=(1, 5), templates="all", phrasing="any")
    b = generate_examples(50, seed=3, steps=(1, 5), templates="all", phrasing="any")
    c = generate_examples(50, seed=4, steps=(1, 5), templates="all", phrasing="any")
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.question for e in a] != [e.question for e in c]
    assert make_split("test", 20, 0)[0].to_dict() == make_split("test", 20, 0)[0].to_dict()
    # Same seed, different split names: different problems from the same distribution.
    assert [e.question for e in make_split("train", 20, 0)] != \
        [e.question for e in make_split("test", 20, 0)]


@pytest.mark.parametrize("ops", [("+", "-"), ("+", "-", "*")])
def test_answers_correct_by_construction(ops):
    examples = generate_examples(400, seed=1, steps=(1, 5), templates="all", phrasing="any",
                                 ops=ops)
    for ex in examples:
        chain = _check_rationale(ex)
        assert chain == ex.meta["values"]
        assert len(chain) - 1 == ex.meta["steps"]
        # The question states the start value and every operand, in order.
        numbers = [int(x) for x in re.findall(r"\d+", ex.question)]
        assert numbers[0] == chain[0]
        assert len(numbers) == ex.meta["steps"] + 1


def test_example_from_the_issue_shape():
    ex = generate_examples(1, seed=0, steps=2)[0]
    assert re.fullmatch(r"\d+[+\-]\d+=\d+\. \d+[+\-]\d+=\d+\. The answer is \d+\.", ex.rationale)
    assert ex.question.endswith("?")


@pytest.mark.parametrize("steps,lo,hi", [(2, 2, 2), ((1, 3), 1, 3), ((4, 5), 4, 5)])
def test_step_counts(steps, lo, hi):
    counts = {ex.meta["steps"] for ex in generate_examples(300, seed=2, steps=steps)}
    assert counts == set(range(lo, hi + 1))


def test_splits_shift_where_they_say():
    train = make_split("train", 500, 0)
    train_templates = {t.name for t in TRAIN_TEMPLATES}
    shifted_templates = {t.name for t in SHIFTED_TEMPLATES}
    assert len(train_templates) >= 6 and len(shifted_templates) >= 3
    assert {e.meta["template"] for e in train} == train_templates
    assert {e.meta["steps"] for e in train} == {1, 2, 3}
    assert {e.meta["phrasing"] for e in train} == {"standard"}
    shifted = make_split("shifted", 300, 0)
    assert {e.meta["template"] for e in shifted} == shifted_templates
    assert {e.meta["steps"] for e in shifted} == {4, 5}
    assert {e.meta["split"] for e in shifted} == {"shifted"}
    assert {e.meta["phrasing"] for e in make_split("alt", 50, 0)} == {"alt"}
    assert {e.meta["steps"] for e in make_split("steps4", 50, 0)} == {4}
    # New templates bring new words: none of their setup nouns occur in train questions.
    train_words = {w for e in train for w in re.findall(r"[A-Za-z]+", e.question)}
    for w in ("farmer", "barn", "scores", "tank"):
        assert w not in train_words


def test_every_split_is_well_formed():
    for name in SPLITS:
        for ex in make_split(name, 30, 7):
            _check_rationale(ex)
            assert ex.id.startswith(f"arith-{name}-7-")


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown arith split"):
        make_split("nope", 3)
    with pytest.raises(ConfigError, match="unknown arith template"):
        generate_examples(3, seed=0, templates=["possession", "spaceship"])
    with pytest.raises(ConfigError, match="steps"):
        generate_examples(3, seed=0, steps=(3, 1))
    with pytest.raises(ConfigError, match="phrasing"):
        generate_examples(3, seed=0, phrasing="fancy")
    with pytest.raises(ConfigError, match="ops"):
        generate_examples(3, seed=0, ops=("/",))


def test_task_load_roundtrip_and_errors(tmp_path):
    examples = make_split("dev", 10, 0)
    path = tmp_path / "dev.jsonl"
    save_jsonl(examples, path)
    task = ArithTask()
    assert task.name == "arith"
    assert [e.to_dict() for e in task.load(path)] == [e.to_dict() for e in examples]
    with pytest.raises(DataError, match="does not exist"):
        task.load(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "q", "answer": "1"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        task.load(bad)
    bad.write_text(json.dumps({"id": "1", "question": "q"}) + "\n")
    with pytest.raises(DataError, match="missing field 'answer'"):
        task.load(bad)


def test_task_scores_gold_rationales():
    pytest.importorskip("dpc_lens.tasks.gsm8k")
    task = ArithTask()
    examples = make_split("shifted", 50, 0)
    preds = [task.extract_answer(e.rationale) for e in examples]
    assert preds == [e.answer for e in examples]
    assert task.accuracy(preds, [e.answer for e in examples]) == 1.0
    assert task.extract_answer("7+5=12. 12-3=9. The answer is 9.") == "9"
    assert not task.is_correct(None, "9")
    assert not task.is_correct("8", "9")
    with pytest.raises(DataError):
        task.accuracy(["1"], ["1", "2"])


def test_mixtures_are_seeded_and_proportioned():
    from dpc_lens.tasks.arith import MIXTURES, make_mixture

    a = make_mixture("mixed_test", 101, 0)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in make_mixture("mixed_test", 101, 0)]
    assert len(a) == 101 and len({e.id for e in a}) == 101
    splits = [e.meta["split"] for e in a]
    assert sorted(set(splits)) == ["alt", "test"] and splits.count("alt") in (50, 51)
    assert splits != sorted(splits)  # interleaved, not blocks
    for ex in a:
        _check_rationale(ex)
    # Same distribution, different names: different problems.
    dev = {e.question for e in make_mixture("mixed_dev", 101, 0)}
    assert len(dev & {e.question for e in a}) < 10
    custom = make_mixture([("steps4", 1), ("shifted", 3)], 8, 1)
    assert [e.meta["split"] for e in custom].count("shifted") == 6
    assert set(MIXTURES) >= {"mixed_train", "mixed_dev", "mixed_test", "alt_train"}
    with pytest.raises(ConfigError, match="unknown arith mixture"):
        make_mixture("nope", 3)
    with pytest.raises(ConfigError, match="weight"):
        make_mixture([("test", 0)], 3)
