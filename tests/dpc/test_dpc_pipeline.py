"""DPC end to end on a small offline model and the synthetic arithmetic task.

The model is a random 2-layer Llama whose tokenizer is the arith word-level tokenizer
(:func:`dpc_lens.testbed.reasoner.build_tokenizer`), saved to a temporary directory and loaded with
:func:`dpc_lens.model.load_model`, so arith questions tokenise without ``<unk>``. Checked here:
the JSONL record schema (every key and type), the summary against counts recomputed from the
records, that fired records answer with a regeneration whose located rows are zeroed (compared
with ``generate`` on ``corrupt_soft_prompt`` directly), and resuming: an interrupted run, a torn
last line, and the refusal to overwrite without ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from dpc_lens.dpc import DPC_FLOWS, DPCConfig, read_records, run_dpc
from dpc_lens.dpc.detector import DetectorConfig, TriggerDecision
from dpc_lens.errors import DataError, InputError
from dpc_lens.generation import GenerationConfig, generate
from dpc_lens.model import load_model
from dpc_lens.patching import corrupt_soft_prompt
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import get_task
from dpc_lens.tasks.arith import make_split

N_LAYERS = 2
CFG = DPCConfig(
    # R = 0: fire whenever any second-half rationale token has more deep soft-prompt flow than
    # the first half's mean -- so some records fire and some may not
    detector=DetectorConfig(R=0.0),
    generation=GenerationConfig(max_new_tokens=10, batch_size=6),
    seed=3,
)


class FirstWordArith:
    """The arith task, but the answer is the rationale's first word.

    A random model almost never writes a number, so with the real extraction every answer is
    ``None`` and every summary count is 0; with this one, gold answers can be set to what the
    model says (see ``setup``) and every count is exercised. Loading and data are arith's.
    """

    name = "arith_first_word"

    def __init__(self):
        self._arith = get_task("arith")

    def load(self, path):
        return self._arith.load(path)

    def extract_answer(self, text):
        words = text.split()
        return words[0] if words else None

    def is_correct(self, prediction, gold):
        return prediction is not None and prediction == gold


TASK = FirstWordArith()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from dpc_lens.testbed.reasoner import ReasonerConfig, build_tokenizer, reasoner_config

    tok = build_tokenizer()
    hf_cfg = reasoner_config(
        tok,
        ReasonerConfig(n_layers=N_LAYERS, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, max_positions=128),
    )
    hf_cfg.initializer_range = 0.3  # spread weights: greedy text varies instead of one repeated token
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("arith_llama"))
    LlamaForCausalLM(hf_cfg).save_pretrained(d)
    tok.save_pretrained(d)
    model = load_model(d, device="cpu")
    assert model.cfg.n_layers == N_LAYERS and model.tokenizer.vocab_size == len(tok)
    g = torch.Generator().manual_seed(1)
    soft = SoftPrompt(torch.randn(4, 32, generator=g) * 0.5)
    examples = make_split("dev", 6, seed=0)
    for ex in examples:  # every question tokenises without <unk>
        assert tok.unk_token_id not in tok(ex.question)["input_ids"]
    # A random model is never right on its own; make some gold answers the answers it gives
    # with the soft prompt (even ids) or without it (id 1), so every summary count is exercised.
    qs = [e.question for e in examples]
    pt = generate(model, qs, soft, CFG.generation, add_bos=True, progress=False)
    base = generate(model, qs, None, CFG.generation, add_bos=True, progress=False)
    golds = [TASK.extract_answer(g.text) for g in pt]
    golds[1] = TASK.extract_answer(base[1].text)
    examples = [
        dataclasses.replace(e, answer=golds[i]) if i in (0, 1, 2, 4) and golds[i] else e
        for i, e in enumerate(examples)
    ]
    return model, soft, examples


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    model, soft, examples = setup
    out = tmp_path_factory.mktemp("full")
    records, summary = run_dpc(model, soft, examples, TASK, CFG, out_dir=out, progress=False)
    return out, records, summary


ANSWER_KEYS = {"rationale": str, "answer": (str, type(None)), "correct": bool, "stop_reason": str}


def check_answer(d: dict, extra: dict | None = None) -> None:
    want = {**ANSWER_KEYS, **(extra or {})}
    assert set(d) == set(want), sorted(d)
    for k, typ in want.items():
        assert isinstance(d[k], typ), (k, d[k])
    assert d["stop_reason"] in ("eos", "stop_string", "max_new_tokens")
    if d["answer"] is None:
        assert d["correct"] is False


def test_record_schema(setup, full_run):
    _, _, examples = setup
    out, records, _ = full_run
    assert read_records(os.path.join(out, "records.jsonl")) == json.loads(json.dumps(records))
    assert [r["id"] for r in records] == [e.id for e in examples]
    top = {
        "id",
        "question",
        "gold",
        "pt",
        "dpc",
        "final_answer",
        "final_correct",
        "trigger",
        "located_rows",
        "flows",
        "loss",
        "timings",
        "base",
        "always",
        "random",
        "rationale_tokens",
    }
    for r, ex in zip(records, examples):
        assert set(r) == top, sorted(r)
        # the text of each PT rationale token, in the order of the trigger's per-token flow f_i
        assert "".join(r["rationale_tokens"]) == r["pt"]["rationale"]
        if r["trigger"] is not None:
            assert len(r["rationale_tokens"]) == len(r["trigger"]["deep_flow"]["f"])
        assert (r["id"], r["question"], r["gold"]) == (ex.id, ex.question, ex.answer)
        check_answer(r["pt"])
        check_answer(r["dpc"], {"fired": bool, "corrupted_rows": list})
        check_answer(r["base"])
        check_answer(r["always"], {"corrupted_rows": list})
        check_answer(r["random"], {"corrupted_rows": list})
        assert r["final_answer"] == r["dpc"]["answer"] and r["final_correct"] is r["dpc"]["correct"]
        assert isinstance(r["located_rows"], list) and all(isinstance(x, int) for x in r["located_rows"])
        assert set(r["timings"]) == {"pt_generate_s", "saliency_s", "regenerate_s"}
        assert all(isinstance(v, float) and v >= 0 for v in r["timings"].values())
        if r["trigger"] is None:  # empty rationale: nothing measured
            assert r["flows"] == {} and r["loss"] is None and r["located_rows"] == []
            continue
        assert isinstance(r["trigger"], dict)
        d = TriggerDecision.from_dict(r["trigger"])  # the dict is a complete decision
        assert d.to_dict() == r["trigger"]
        assert isinstance(r["loss"], float) and r["loss"] > 0
        assert set(r["flows"]) == set(DPC_FLOWS)
        for name, per_layer in r["flows"].items():
            assert len(per_layer) == N_LAYERS and all(isinstance(x, float) for x in per_layer), name
        assert len(r["located_rows"]) == CFG.detector.top_k
        assert r["located_rows"] == list(d.accumulation.top_indices)
        assert r["dpc"]["fired"] is d.fired
        assert d.fired == (d.deep_flow.defined and d.deep_flow.affected_share > CFG.detector.R)


def test_summary_matches_counts_from_records(full_run):
    out, records, summary = full_run
    with open(os.path.join(out, "summary.json")) as fh:
        assert json.load(fh) == summary
    assert DPCConfig.load(os.path.join(out, "config.json")).to_dict() == CFG.to_dict()
    n = len(records)
    acc = {k: sum(r[k]["correct"] for r in records) / n for k in ("pt", "dpc", "base", "always", "random")}
    acc["oracle"] = sum(r["base"]["correct"] or r["pt"]["correct"] for r in records) / n
    fired = [r for r in records if r["dpc"]["fired"]]
    located = [r for r in records if r["located_rows"]]
    assert 0 < acc["pt"] < 1 and acc["base"] > 0  # the counts below are not all zero
    summary = dict(summary)
    sure = summary.pop("dpc_minus_pt")  # the interval itself: tests/test_evaluation.py
    # issue 19's diagnostics, counted here from the records (their maths: test_sinks_locate.py)
    lt = summary.pop("located_token")
    tops = [r["located_rows"][0] for r in located]
    assert lt["n"] == len(tops) and lt["histogram"] == {str(p): tops.count(p) for p in sorted(set(tops))}
    assert lt["modal_share"] == max(tops.count(p) for p in set(tops)) / len(tops)
    assert lt["sinks"] is not None  # analyse measured the attention received
    rc = summary.pop("random_candidates")  # sink='keep': every soft row is a candidate
    assert rc["questions_restricted"] == 0 and rc["accuracy"] == acc["random"]
    auc = summary.pop("trigger_auc")["corruption_helps_vs_hurts"]
    helps = [r for r in records if r["trigger"] and not r["pt"]["correct"] and r["always"]["correct"]]
    hurts = [r for r in records if r["trigger"] and r["pt"]["correct"] and not r["always"]["correct"]]
    assert (auc["n_pos"], auc["n_neg"]) == (len(helps), len(hurts))
    assert sure["diff"] == pytest.approx(acc["dpc"] - acc["pt"])
    assert sure["ci95"][0] <= sure["diff"] <= sure["ci95"][1]
    assert summary == {
        "n": n,
        "accuracy": acc,
        "trigger_rate": len(fired) / n,
        "flips": {
            "wrong_to_right": sum(not r["pt"]["correct"] and r["dpc"]["correct"] for r in fired),
            "right_to_wrong": sum(r["pt"]["correct"] and not r["dpc"]["correct"] for r in fired),
        },
        "sink_rate": sum(r["located_rows"][0] == 0 for r in located) / len(located) if located else None,
        "ceiling": sum(r["base"]["correct"] and not r["pt"]["correct"] for r in records),
        "pt_only": sum(r["pt"]["correct"] and not r["base"]["correct"] for r in records),
        "kv_cache_used": True,  # the tiny Llama bridge decodes with its cache
    }


def _gen(model, question, soft):
    return generate(model, [question], soft, CFG.generation, add_bos=True, progress=False)[0]


def test_answers_come_from_the_right_generations(setup, full_run):
    model, soft, _ = setup
    _, records, _ = full_run
    fired = [r for r in records if r["dpc"]["fired"]]
    assert fired, "R=0 should fire on some instance of this run"
    for r in records:
        pt = _gen(model, r["question"], soft)
        assert (r["pt"]["rationale"], r["pt"]["stop_reason"]) == (pt.text, pt.stop_reason)
        assert r["pt"]["answer"] == TASK.extract_answer(pt.text)
        assert r["base"]["rationale"] == _gen(model, r["question"], None).text
        rand = _gen(model, r["question"], corrupt_soft_prompt(soft, r["random"]["corrupted_rows"]))
        assert (
            r["random"]["rationale"] == rand.text and len(r["random"]["corrupted_rows"]) == CFG.detector.top_k
        )
        if r["located_rows"]:
            zeroed = corrupt_soft_prompt(soft, r["located_rows"])
            assert torch.count_nonzero(zeroed.embeddings.abs().sum(1) == 0) == len(r["located_rows"])
            again = _gen(model, r["question"], zeroed)
            assert r["always"]["rationale"] == again.text
            assert r["always"]["corrupted_rows"] == r["located_rows"]
        if r["dpc"]["fired"]:
            assert r["dpc"]["corrupted_rows"] == r["located_rows"]
            assert (r["dpc"]["rationale"], r["dpc"]["stop_reason"]) == (again.text, again.stop_reason)
            assert r["dpc"]["answer"] == TASK.extract_answer(again.text)
        else:  # not fired: the first answer is kept
            assert r["dpc"]["corrupted_rows"] == []
            assert {k: r["dpc"][k] for k in ANSWER_KEYS} == r["pt"]


def _comparable(r: dict) -> dict:
    keep = {k: r[k] for k in ("id", "gold", "final_answer", "final_correct", "located_rows")}
    for k in ("pt", "dpc", "base", "always", "random"):
        keep[k] = r[k]
    keep["fired"] = None if r["trigger"] is None else r["trigger"]["fired"]
    return keep


def test_resume_after_interruption_and_a_torn_line(setup, full_run, tmp_path):
    model, soft, examples = setup
    _, full_records, full_summary = full_run
    out = tmp_path / "run"
    seen = []

    def stop_after_three(record):
        seen.append(record["id"])
        if len(seen) == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        run_dpc(
            model,
            soft,
            examples,
            TASK,
            CFG,
            out_dir=out,
            chunk_size=3,
            progress=False,
            on_record=stop_after_three,
        )
    path = out / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 3  # the first chunk was written before the callback raised
    # a kill in the middle of writing the third record: half a JSON line, no newline
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    assert [r["id"] for r in read_records(path)] == [e.id for e in examples[:2]]

    with pytest.raises(InputError, match="--resume"):
        run_dpc(model, soft, examples, TASK, CFG, out_dir=out, progress=False)

    records, summary = run_dpc(model, soft, examples, TASK, CFG, out_dir=out, resume=True, progress=False)
    on_disk = read_records(path)
    ids = [r["id"] for r in on_disk]
    assert sorted(ids) == sorted(e.id for e in examples) and len(set(ids)) == len(ids)
    assert path.read_text().endswith("\n") and all(json.loads(x) for x in path.read_text().splitlines())
    assert [_comparable(r) for r in records] == [_comparable(r) for r in full_records]
    for a, b in zip(records, full_records):
        for name in a["flows"]:
            assert a["flows"][name] == pytest.approx(b["flows"][name], rel=1e-4, abs=1e-7)
    assert summary == full_summary

    # resuming a finished run does no work and changes nothing
    again, _ = run_dpc(model, soft, examples, TASK, CFG, out_dir=out, resume=True, progress=False)
    assert [_comparable(r) for r in again] == [_comparable(r) for r in full_records]
    assert len(read_records(path)) == len(examples)


def test_a_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(path)
    assert read_records(tmp_path / "missing.jsonl") == []


def test_modal_baseline_and_the_locate_vs_modal_test(setup, tmp_path):
    """Issue 19: with the opt-in ``modal`` baseline every question also gets the run's modal
    located rows corrupted, and the summary tests locating per question against that."""
    model, soft, examples = setup
    cfg = dataclasses.replace(CFG, baselines=("always", "modal"))
    records, summary = run_dpc(model, soft, examples, TASK, cfg, out_dir=tmp_path, progress=False)
    measured = [r for r in records if r["located_rows"]]
    sets = [tuple(r["located_rows"]) for r in measured]
    modal = min(set(sets), key=lambda s: (-sets.count(s), s))  # commonest; ties -> smallest
    for r, ex in zip(records, examples):
        if not r["located_rows"]:
            assert "modal" not in r
            continue
        assert tuple(r["modal"]["corrupted_rows"]) == modal
        ref = _gen(model, ex.question, corrupt_soft_prompt(soft, list(modal), cfg.corruption))
        assert r["modal"]["rationale"] == ref.text  # the modal rows really were corrupted
    lm = summary["located_token"]["locating_vs_modal"]
    n = len(measured)
    assert lm["n"] == n and lm["modal_rows"] == list(modal)
    assert lm["diff"] == pytest.approx(sum(r["always"]["correct"] for r in measured) / n
                                       - sum(r["modal"]["correct"] for r in measured) / n)
    assert read_records(os.path.join(tmp_path, "records.jsonl")) == json.loads(json.dumps(records))
