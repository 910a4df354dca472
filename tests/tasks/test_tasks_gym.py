"""reasoning-gym tasks (dpc_lens.tasks.gym): generation, JSONL round trip, the answer convention,
and scoring checked against reasoning-gym's own ``score_answer`` on entries it generates itself."""

from __future__ import annotations

import json

import pytest
import reasoning_gym as rg  # a dev dependency: missing, these tests fail rather than skip
import torch

from dpc_lens.errors import ConfigError, DataError
from dpc_lens.tasks import answer_of, get_task, load_examples
from dpc_lens.tasks.gym import (
    ANSWER_INSTRUCTION,
    GymTask,
    chat_prompt_template,
    extract_gym_answer,
    gym_datasets,
)


def test_get_task_by_name_and_unknown_dataset():
    task = get_task("gym:basic_arithmetic")
    assert isinstance(task, GymTask) and task.name == "gym:basic_arithmetic"
    assert "chain_sum" in gym_datasets() and len(gym_datasets()) > 50
    with pytest.raises(ConfigError, match="Did you mean 'basic_arithmetic'"):
        get_task("gym:basic_arithmetik")
    with pytest.raises(ConfigError, match="gym:<name>"):
        get_task("nonsense")


def test_generate_is_deterministic_and_follows_the_generator():
    a = GymTask("basic_arithmetic").generate(20, seed=3, max_terms=3)
    b = GymTask("basic_arithmetic").generate(20, seed=3, max_terms=3)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    ds = rg.create_dataset("basic_arithmetic", size=20, seed=3, max_terms=3)  # the generator itself
    for i, ex in enumerate(a):
        assert ex.id == f"basic_arithmetic-3-{i}"
        assert ex.question == f"{ds[i]['question']}\n\n{ANSWER_INSTRUCTION}"
        assert ex.answer == ds[i]["answer"]
        assert ex.meta["gym"]["config"] == {"max_terms": 3} and ex.meta["gym"]["index"] == i
    c = GymTask("basic_arithmetic").generate(20, seed=4, max_terms=3)
    assert [e.question for e in c] != [e.question for e in a]
    with pytest.raises(ConfigError, match="rejected the config"):
        GymTask("basic_arithmetic").generate(3, seed=0, no_such_field=1)
    with pytest.raises(ConfigError, match="size"):
        GymTask("basic_arithmetic").generate(0)


def test_answer_convention():
    assert extract_gym_answer("5 - 3 = 2, 2 - 6 = -4.\nThe answer is -4.", numeric=True) == "-4"
    assert extract_gym_answer("The answer is 1,234.50 dollars", numeric=True) == "1234.5"
    assert extract_gym_answer("so we get 12 and then 15", numeric=True) == "15"  # GSM8K fallback
    assert extract_gym_answer("<answer>7</answer> and the answer is 9", numeric=True) == "7"
    words = "Sorting them: ...\nThe answer is: thought, sentence, federal.\nDone."
    assert extract_gym_answer(words) == "thought, sentence, federal"
    assert extract_gym_answer("The answer is **yes**.") == "yes"
    assert extract_gym_answer("blah \\boxed{abc}") == "abc"
    assert extract_gym_answer("no marker here") is None
    assert extract_gym_answer("") is None


def test_scores_equal_reasoning_gyms_own_scorer():
    """Metadata-dependent scorers included: every prediction scores as reasoning-gym scores it on
    the entry it generated (an independent create_dataset call, not the task's entries)."""
    for name, config, preds in [
        ("basic_arithmetic", {"max_terms": 3}, lambda e: [e["answer"], "0", "x", e["answer"] + "1"]),
        ("chain_sum", {}, lambda e: [e["answer"], "+0" + e["answer"].lstrip("-"), "7"]),
        ("word_sorting", {}, lambda e: [e["answer"], e["answer"].upper(), "a, b"]),
        ("countdown", {}, lambda e: [e["answer"], "1+1", e["answer"].replace("+", "-", 1)]),
    ]:
        task = GymTask(name)
        exs = task.generate(12, seed=1, **config)
        ds = rg.create_dataset(name, size=12, seed=1, **config)
        golds_unique = len({e.answer for e in exs}) == len(exs)
        n_right = n_wrong = 0
        for i, ex in enumerate(exs):
            for p in preds(ds[i]):
                want = ds.score_answer(p, ds[i])
                if golds_unique:
                    assert task.score(p, ex.answer) == pytest.approx(want), (name, i, p)
                ok = task.is_correct(p, ex.answer)
                if golds_unique:
                    assert ok == (want >= 1.0), (name, i, p)
                n_right += ok
                n_wrong += not ok
            assert task.is_correct(ex.answer, ex.answer)
            assert not task.is_correct(None, ex.answer)
        assert n_right >= len(exs) and n_wrong >= len(exs), name


def test_numeric_extraction_is_used_for_numeric_datasets():
    task = GymTask("chain_sum")
    ex = task.generate(5, seed=0)[0]
    assert task.numeric
    text = f"Let me add them up step by step: 1 + 2 = 3.\nThe answer is {ex.answer}."
    assert answer_of(task, text, ex) == ex.answer
    assert task.is_correct(answer_of(task, text, ex), ex.answer)
    words = GymTask("word_sorting")
    words.generate(3, seed=0)
    assert not words.numeric


def test_jsonl_round_trip_scores_without_regenerating(tmp_path):
    task = GymTask("countdown")
    exs = task.generate(8, seed=2)
    path = tmp_path / "cd.jsonl"
    assert task.export_jsonl(exs, path) == 8
    fresh = get_task("gym:countdown")
    back = load_examples(path, fresh)
    assert [e.to_dict() for e in back] == [e.to_dict() for e in exs]
    ds = rg.create_dataset("countdown", size=8, seed=2)
    for i, ex in enumerate(back):
        wrong = "1+2"
        assert fresh.is_correct(ds[i]["answer"], ex.answer)
        assert fresh.score(wrong, ex.answer) == pytest.approx(ds.score_answer(wrong, ds[i]))
    # a file of another data set, or not exported by dpc_lens, is refused with the line
    with pytest.raises(DataError, match="pass --task gym:countdown"):
        GymTask("chain_sum").load(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "q", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match="line 1: field meta.gym is missing"):
        fresh.load(bad)


def test_scoring_an_unknown_gold_is_an_error():
    task = GymTask("chain_sum")
    with pytest.raises(DataError, match="task object that generated or loaded"):
        task.is_correct("3", "3")


def test_cli_module_exports(tmp_path, capsys):
    from dpc_lens.tasks.gym import main

    out = tmp_path / "ba.jsonl"
    assert main(["basic_arithmetic", "--size", "4", "--seed", "5", "--config", '{"max_terms": 2}',
                 "--out", str(out)]) == 0
    assert "4 examples of gym:basic_arithmetic" in capsys.readouterr().out
    back = GymTask("basic_arithmetic").load(out)
    assert [e.to_dict() for e in back] == [e.to_dict() for e in
                                           GymTask("basic_arithmetic").generate(4, seed=5, max_terms=2)]


def test_chat_prompt_template_equals_apply_chat_template():
    from dpc_lens.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="no chat template"):
        chat_prompt_template(tok)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    q = "What is {x} + 2?"  # braces in the question survive str.format
    template = chat_prompt_template(tok, system="Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert template.format(question=q) == want


def test_cli_runs_dpc_on_a_gym_file(tmp_path, capsys):
    """--task gym:<name> goes through the CLI's ordinary task resolution."""
    from dpc_lens.cli import main
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.testing import save_tiny_hf_model

    model_dir = save_tiny_hf_model("llama", tmp_path / "m")
    adapter = tmp_path / "adapter"
    SoftPrompt(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 0.1).save_peft(adapter)
    data = tmp_path / "gym.jsonl"
    GymTask("chain_sum").export_jsonl(GymTask("chain_sum").generate(3, seed=0), data)
    out = tmp_path / "run"
    rc = main(["dpc", "--model", model_dir, "--soft-prompt", str(adapter), "--data", str(data),
               "--task", "gym:chain_sum", "--out", str(out), "--max-new-tokens", "4", "--baselines", "",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["chain_sum-0-0", "chain_sum-0-1", "chain_sum-0-2"]
