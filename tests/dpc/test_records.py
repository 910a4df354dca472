"""Typed run records: DPCRecord (records.jsonl) and IAP's PairRecord (pairs.jsonl) read back
what the pipelines write, key for key, and name a misspelt key instead of a bare TypeError."""

from __future__ import annotations

import json

import pytest

from dpc_lens.dpc import AnswerRecord, DPCRecord, read_dpc_records
from dpc_lens.errors import DataError
from dpc_lens.iap import PairRecord

_TRIGGER = {"fired": True, "reason": "r", "deep_layers": [3], "accumulation": {"scores": [0.1, 0.2]}}


def _full() -> dict:
    """A records.jsonl line as run_dpc writes it (every optional key present, in its order)."""
    ans = {"rationale": "2 + 3 = 5 .", "answer": "5", "correct": True, "stop_reason": "eos"}
    return {
        "id": "q1", "question": "how many?", "gold": "5",
        "pt": dict(ans),
        "dpc": {**ans, "answer": "6", "correct": False, "fired": True, "corrupted_rows": [1]},
        "final_answer": "6", "final_correct": False,
        "trigger": _TRIGGER, "located_rows": [1],
        "flows": {"soft->question": [0.1, 0.2], "soft->rationale": [0.3, 0.4],
                  "question->rationale": [0.5, 0.6]},
        "loss": 0.7, "timings": {"pt_generate_s": 0.1, "saliency_s": 0.2, "regenerate_s": 0.3},
        "trigger_error": "none",
        "base": dict(ans),
        "always": {**ans, "corrupted_rows": [1]},
        "random": {**ans, "corrupted_rows": [0]},
        "random_draws": [{**ans, "corrupted_rows": [0]}, {**ans, "corrupted_rows": [1]}],
    }


def test_dpc_record_round_trips_key_for_key():
    d = _full()
    rec = DPCRecord.from_dict(d)
    assert rec.to_dict() == d
    assert json.dumps(rec.to_dict()) == json.dumps(d)  # the same order: the same bytes on disk
    assert rec.dpc == AnswerRecord("6", False, "2 + 3 = 5 .", "eos", True, (1,))
    assert rec.answer("base").correct and rec.trigger["fired"]
    skipped = {"id": "q2", "question": "q", "gold": "1", "skipped": "too long",
               "final_answer": None, "final_correct": False}
    assert json.dumps(DPCRecord.from_dict(skipped).to_dict()) == json.dumps(skipped)
    df = DPCRecord.to_dataframe([d, skipped])
    assert list(df["id"]) == ["q1", "q2"] and df.loc[0, "fired"] and df.loc[0, "random_correct"]


def test_dpc_record_names_a_misspelt_key():
    with pytest.raises(DataError, match=r"unknown key 'flow' \(did you mean 'flows'\?\)"):
        DPCRecord.from_dict({**_full(), "flow": {}})
    with pytest.raises(DataError, match=r"answer 'pt' has an unknown key 'corect'"):
        DPCRecord.from_dict({"id": "q", "pt": {"answer": "1", "corect": True}})
    with pytest.raises(DataError, match="expected a JSON object"):
        DPCRecord.from_dict(["not", "a", "dict"])


def test_read_dpc_records_types_a_run_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_full()) + "\n" + '{"id": "torn', encoding="utf-8")
    (rec,) = read_dpc_records(path)
    assert isinstance(rec, DPCRecord) and rec.id == "q1"


def _pair_line() -> dict:
    """A pairs.jsonl line as run_iap writes it."""
    return {"id": "q1", "question": "how many?", "gold": "5", "prompt_index": 2,
            "prompt": "Let's think step by step.", "group": "instructive", "rationale": "5 .",
            "rationale_ids": [7, 8], "stop_reason": "eos",
            "flows": {"question->prompt": [0.1], "question->rationale": [0.2],
                      "prompt->rationale": [0.3]},
            "flow_means": {"question->prompt": 0.1}, "layer_sets": {"question->prompt": [0]},
            "layers": [0], "n_tokens": {"question": 3}, "loss": 0.5, "chat_template": False,
            "flows_per_head": None, "answer": "5", "correct": True, "scored": True}


def test_pair_record_reads_a_pairs_line_and_names_a_typo():
    rec = PairRecord.from_dict(_pair_line())
    assert (rec.id, rec.prompt_index, rec.question_index, rec.correct) == ("q1", 2, -1, True)
    assert rec.scored and rec.rationale_ids == (7, 8)
    back = PairRecord.from_dict(rec.to_dict())
    assert back.to_dict() == rec.to_dict()
    with pytest.raises(DataError, match=r"unknown key 'flowz' \(did you mean 'flows'\?\)"):
        PairRecord.from_dict({**_pair_line(), "flowz": {}})
    line = _pair_line()
    del line["prompt"]
    with pytest.raises(DataError, match=r"has no \['prompt'\]"):
        PairRecord.from_dict(line)


def test_plotting_reads_typed_records_and_their_dicts_alike():
    from dpc_lens import plotting as P

    d = _full()
    rec = DPCRecord.from_dict(d)
    a, b = P.before_after_data([d]), P.before_after_data([rec])
    assert a["accuracy"] == b["accuracy"] and a["flips"] == b["flips"]
    assert (a["corrupted"] == b["corrupted"]).all()
    c1, c2 = P.flow_curve_data([d]), P.flow_curve_data([rec])
    assert all((c1.center[n] == c2.center[n]).all() for n in c1.names)
    pairs = P.flow_curve_data([_pair_line(), PairRecord.from_dict(_pair_line())])
    assert pairs.names == ("question->prompt", "question->rationale", "prompt->rationale")
    with pytest.raises(DataError, match="did you mean 'flows'"):
        P.before_after_data([{**d, "flow": {}}])


def test_a_saved_trigger_decision_names_a_missing_or_misspelt_key():
    """The trigger dict a record holds is read back by TriggerDecision.from_dict (plotting's
    contingency, DPCRecord.decision): a damaged one is a DataError naming the key, not a KeyError."""
    import torch

    from dpc_lens.dpc import DetectorConfig, DetectorInputs, TriggerDecision, dynamic_trigger

    g = torch.Generator().manual_seed(0)
    cols, rows = (torch.rand(4, n, generator=g, dtype=torch.float64) for n in (3, 5))
    inputs = DetectorInputs(cols, cols / 10, rows, rows / 10)
    d = dynamic_trigger(inputs, DetectorConfig()).to_dict()
    assert TriggerDecision.from_dict(d).to_dict() == d
    bad = {**d, "resaon": d["reason"]}
    del bad["reason"]
    with pytest.raises(DataError, match=r"no \['reason'\]; it has 'resaon' \(did you mean 'reason'\?\)"):
        TriggerDecision.from_dict(bad)
    with pytest.raises(DataError, match=r"AccumulationStats has no \['scores'\]"):
        TriggerDecision.from_dict({**d, "accumulation": {k: v for k, v in d["accumulation"].items()
                                                          if k != "scores"}})
