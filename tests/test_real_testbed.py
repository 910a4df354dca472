"""The real test bed's data and bookkeeping (dpc_lens.testbed.real), without the model."""

from __future__ import annotations

import json
import os

from dpc_lens.tasks import get_task
from dpc_lens.testbed import real as rt


def test_mixture_is_deterministic_non_negative_and_half_each_source():
    a = rt.make_real_mixture("dev", 20, 1)
    b = rt.make_real_mixture("dev", 20, 1)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.question for e in rt.make_real_mixture("test", 20, 1)] != [e.question for e in a]
    sources = [e.meta["source"] for e in a]
    assert sources.count("gym:basic_arithmetic") == sources.count("arith") == 10
    assert len({e.id for e in a}) == 20
    task = get_task("arith")
    for e in a:
        assert int(e.answer) >= 0
        assert e.question.endswith(rt.BUILD["instruction"])
        # the gold rationale is read back as the gold answer by the task that scores the test bed
        assert task.is_correct(task.extract_answer(e.rationale), e.answer)


def test_gym_part_keeps_reasoning_gym_provenance_and_its_scorer_agrees():
    from dpc_lens.tasks.gym import GymTask

    exs = rt.gym_part(8, 3)
    gym = GymTask("basic_arithmetic", instruction=None)
    for e in exs:
        entry = {"question": e.meta["gym"]["question"], "answer": e.answer,
                 "metadata": e.meta["gym"]["metadata"]}
        scorer = gym._rg.create_dataset("basic_arithmetic", size=1, seed=0, **e.meta["gym"]["config"])
        assert scorer.score_answer(e.answer, entry) == 1.0


def test_regime_counts_flips_ceiling_and_oracle():
    base = [True, True, False, False, True]
    pt = [True, False, True, False, False]
    r = rt.regime(base, pt, ["a", "a", "b", "b", "b"])
    assert r["n"] == 5 and r["base"] == 0.6 and r["pt"] == 0.4
    assert r["right_without_prompt_wrong_with"] == r["ceiling"] == 2
    assert r["wrong_without_prompt_right_with"] == 1
    assert r["oracle"] == 0.8
    assert r["by_source"]["b"] == {"n": 3, "base": 1 / 3, "pt": 1 / 3, "lost": 1, "gained": 1}


def test_iap_pool_has_the_papers_prompts():
    assert len(rt.IAP_POOL) >= 8 and len(set(rt.IAP_POOL)) == len(rt.IAP_POOL)
    assert "Let's think step by step." in rt.IAP_POOL
    assert "Don't think. Just feel." in rt.IAP_POOL


def test_shipped_artefacts_match_the_build(tmp_path):
    """The committed artefacts are what ``build`` makes from :data:`BUILD`: the recorded build
    settings, the IAP pool, and the dev/test splits byte for byte (regenerated here from the
    seeds, with reasoning-gym and dpc_lens's generator)."""
    from dpc_lens.tasks.io import write_jsonl

    art = rt.artefacts()
    assert art is not None, "the real test bed's adapter or test split is missing from dpc_lens/data/real"
    with open(art["regime"], encoding="utf-8") as fh:
        report = json.load(fh)
    assert report["build"] == json.loads(json.dumps(rt.BUILD))
    with open(os.path.join(rt.real_data_dir(), "iap_pool.json"), encoding="utf-8") as fh:
        assert json.load(fh) == list(rt.IAP_POOL)
    for split in ("dev", "test"):
        fresh = tmp_path / f"{split}.jsonl"
        write_jsonl(fresh, rt._split(split))
        assert fresh.read_bytes() == open(art[split], "rb").read(), \
            f"{split}.jsonl differs from its rebuild from BUILD's seeds"
        assert sum(1 for _ in open(art[split], encoding="utf-8")) == rt.BUILD[split]["n"]
