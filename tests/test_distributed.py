"""Data-parallel DPC over ranks started by torchrun (two CPU processes, gloo backend).

The reference is a plain single-process run_dpc on the same questions: the merged records must
equal it (answers, trigger decisions and corrupted rows exactly; the float saliency statistics
to rounding, since questions share generation batches with other questions), and so must the
summary. A run whose rank is SIGKILLed mid-way resumes with another number of ranks without
redoing anything that was finished.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from dpc_lens.distributed import RankInfo, owner_rank, rank_info, shard
from dpc_lens.errors import InputError

N = 12

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from dataclasses import replace
    from dpc_lens.distributed import run_dpc_distributed
    from dpc_lens.dpc import DPCConfig
    from dpc_lens.model import load_model
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts

    out, resume, kill_rank, kill_after = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
    art = shipped_artefacts()
    task = get_task("arith")
    exs = load_examples(art["test"], task)[:{n}]
    cfg = replace(DPCConfig.load(art["config"]), random_draws=2)
    cfg = replace(cfg, generation=replace(cfg.generation, batch_size=4))
    seen = []

    def on_record(r):
        seen.append(r["id"])
        print("DONE", r["id"], flush=True)
        if int(os.environ.get("RANK", "0")) == kill_rank and len(seen) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    run_dpc_distributed(load_model(art["model"], device="cpu"), SoftPrompt.from_peft(art["soft_prompt"]),
                        exs, task, cfg, out_dir=out, resume=resume, progress=False, on_record=on_record)
""").format(n=N)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, *target):
    """``torchrun --nproc_per_node NPROC TARGET...`` on this machine's CPUs (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", *map(str, target)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _launch(tmp_path, out, nproc, *, resume=False, kill_rank=-1, kill_after=0):
    script = tmp_path / "rank_script.py"
    script.write_text(SCRIPT)
    return _torchrun(nproc, script, out, "1" if resume else "0", kill_rank, kill_after)


def _comparable(r):
    r = dict(r)
    for k in ("timings", "flows", "loss"):
        r.pop(k, None)
    if r.get("trigger") is not None:
        r["trigger"] = {"fired": r["trigger"]["fired"]}
    return json.loads(json.dumps(r))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from dataclasses import replace

    from dpc_lens.dpc import DPCConfig, run_dpc
    from dpc_lens.model import load_model
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts

    art = shipped_artefacts()
    task = get_task("arith")
    exs = load_examples(art["test"], task)[:N]
    cfg = replace(DPCConfig.load(art["config"]), random_draws=2)
    cfg = replace(cfg, generation=replace(cfg.generation, batch_size=4))
    return run_dpc(load_model(art["model"], device="cpu"), SoftPrompt.from_peft(art["soft_prompt"]), exs,
                   task, cfg, out_dir=tmp_path_factory.mktemp("single") / "run", progress=False)


def _check_equal(out, reference):
    records, summary = reference
    merged = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert [_comparable(r) for r in merged] == [_comparable(r) for r in records]
    for a, b in zip(merged, records):
        for name in b["flows"]:
            assert a["flows"][name] == pytest.approx(b["flows"][name], rel=1e-4, abs=1e-7)
    got = json.loads((out / "summary.json").read_text())
    assert got.pop("ranks") >= 1
    assert got == json.loads(json.dumps(summary))


def test_two_cpu_ranks_merge_to_the_single_process_run(tmp_path, reference):
    out = tmp_path / "run"
    p = _launch(tmp_path, out, 2)
    assert p.returncode == 0, p.stderr[-3000:]
    ids0 = [json.loads(x)["id"] for x in (out / "rank-0" / "records.jsonl").read_text().splitlines()]
    ids1 = [json.loads(x)["id"] for x in (out / "rank-1" / "records.jsonl").read_text().splitlines()]
    assert ids0 and ids1 and not set(ids0) & set(ids1)  # both ranks worked, on different questions
    assert all(owner_rank(i, 2) == 0 for i in ids0) and all(owner_rank(i, 2) == 1 for i in ids1)
    _check_equal(out, reference)


def test_a_killed_rank_resumes_with_another_number_of_ranks(tmp_path, reference):
    out = tmp_path / "run"
    p = _launch(tmp_path, out, 2, kill_rank=1, kill_after=2)
    assert p.returncode != 0  # the launcher reports the killed rank
    finished = set()
    for d in ("rank-0", "rank-1"):
        path = out / d / "records.jsonl"
        if path.exists():
            finished |= {json.loads(x)["id"] for x in path.read_text().splitlines() if x.strip()}
    assert len(finished) >= 2 and not (out / "records.jsonl").exists()
    p = _launch(tmp_path, out, 1, resume=True)  # one rank now: it owns every question
    assert p.returncode == 0, p.stderr[-3000:]
    redone = {line.split()[1] for line in p.stdout.splitlines() if line.startswith("DONE ")}
    assert redone.isdisjoint(finished)  # nothing finished was computed again
    assert len(redone) == N - len(finished)
    _check_equal(out, reference)


IAP_SCRIPT = textwrap.dedent("""
    import sys
    from dpc_lens.distributed import run_iap_distributed
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.iap import IAPRunConfig
    from dpc_lens.model import load_model
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts
    from dpc_lens.testbed.reasoner import HARD_PROMPTS

    art = shipped_artefacts()
    task = get_task("arith")
    exs = load_examples(art["test"], task)[:{n}]
    cfg = IAPRunConfig(generation=GenerationConfig(max_new_tokens=24, batch_size=8))
    run_iap_distributed(load_model(art["model"], device="cpu"), exs, task, list(HARD_PROMPTS[:3]), cfg,
                        out_dir=sys.argv[1], progress=False)
""").format(n=8)


def test_iap_over_two_ranks_equals_the_single_process_run(tmp_path):
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.iap import IAPRunConfig, run_iap
    from dpc_lens.model import load_model
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts
    from dpc_lens.testbed.reasoner import HARD_PROMPTS

    script = tmp_path / "iap_script.py"
    script.write_text(IAP_SCRIPT)
    out = tmp_path / "run"
    p = _torchrun(2, script, out)
    assert p.returncode == 0, p.stderr[-3000:]
    art = shipped_artefacts()
    task = get_task("arith")
    exs = load_examples(art["test"], task)[:8]
    cfg = IAPRunConfig(generation=GenerationConfig(max_new_tokens=24, batch_size=8))
    pairs, summary = run_iap(load_model(art["model"], device="cpu"), exs, task, list(HARD_PROMPTS[:3]), cfg,
                             out_dir=tmp_path / "single", progress=False)
    assert (out / "rank-0" / "pairs.jsonl").exists() and (out / "rank-1" / "pairs.jsonl").exists()
    merged = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    floats = ("flows", "flow_means", "flows_per_head", "loss", "timings")  # batch-dependent rounding
    strip = lambda r: {k: v for k, v in r.items() if k not in floats}  # noqa: E731
    assert [strip(r) for r in merged] == [json.loads(json.dumps(strip(r))) for r in pairs]
    for a, b in zip(merged, pairs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        for name, v in b["flow_means"].items():
            assert a["flow_means"][name] == pytest.approx(v, rel=1e-4, abs=1e-9)
    got = json.loads((out / "summary.json").read_text())
    assert got.pop("ranks") == 2
    want = json.loads(json.dumps(summary))
    assert got["accuracy"] == want["accuracy"] and got["cost_per_question"] == want["cost_per_question"]
    for k in ("generations", "backward_passes", "pairs", "pairs_reused"):  # the same work, once
        assert got["this_run"][k] == want["this_run"][k], k
    assert got["this_run"]["saliency_passes"] >= want["this_run"]["saliency_passes"]  # batched per rank
    for name, mean in want["standardizer"]["mean"].items():
        assert got["standardizer"]["mean"][name] == pytest.approx(mean, rel=1e-5)


CAL_SCRIPT = textwrap.dedent("""
    import sys
    from dataclasses import replace
    from dpc_lens.distributed import calibrate_dpc_distributed
    from dpc_lens.dpc import DPCConfig
    from dpc_lens.model import load_model
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts

    art = shipped_artefacts()
    task = get_task("arith")
    exs = load_examples(art["dev"], task)[:{n}]
    cfg = DPCConfig.load(art["config"])
    cfg = replace(cfg, generation=replace(cfg.generation, batch_size=4))
    model, soft = load_model(art["model"], device="cpu"), SoftPrompt.from_peft(art["soft_prompt"])
    calibrate_dpc_distributed(model, soft, exs, task, cfg, out_dir=sys.argv[1], progress=False)
""").format(n=N)


def test_calibration_over_two_ranks_equals_the_single_process_one(tmp_path):
    from dataclasses import replace

    from dpc_lens.dpc import DPCConfig, calibrate_dpc
    from dpc_lens.model import load_model
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts

    script = tmp_path / "cal_script.py"
    script.write_text(CAL_SCRIPT)
    out = tmp_path / "cal"
    p = _torchrun(2, script, out)
    assert p.returncode == 0, p.stderr[-3000:]
    art = shipped_artefacts()
    task = get_task("arith")
    exs = load_examples(art["dev"], task)[:N]
    cfg = DPCConfig.load(art["config"])
    cfg = replace(cfg, generation=replace(cfg.generation, batch_size=4))
    model, soft = load_model(art["model"], device="cpu"), SoftPrompt.from_peft(art["soft_prompt"])
    single = calibrate_dpc(model, soft, exs, task, cfg, out_dir=tmp_path / "single", progress=False)
    merged = json.loads((out / "calibration.json").read_text())
    want = single.to_dict()
    for k in ("best_point", "best_accuracy", "pt_accuracy", "best_trigger_rate", "n_examples", "points",
              "corruption_oracle_accuracy"):
        assert merged[k] == json.loads(json.dumps(want[k])), k
    for r in (0, 1):  # both ranks did model work
        assert (out / f"rank-{r}" / "calibration_progress" / "pt.jsonl").exists()
    assert len(merged["points"]) > 1 and 0 <= merged["best_trigger_rate"] <= 1
    chosen = json.loads((out / "dpc_config.json").read_text())
    assert chosen == json.loads(json.dumps(single.config.to_dict()))


def test_sharding_is_by_id_and_covers_every_example():
    class E:
        def __init__(self, i):
            self.id = i

    exs = [E(f"q{i}") for i in range(50)]
    parts = [shard(exs, RankInfo(r, 3)) for r in range(3)]
    assert sorted(e.id for p in parts for e in p) == sorted(e.id for e in exs)
    assert all(owner_rank(e.id, 3) == r for r, p in enumerate(parts) for e in p)
    assert owner_rank("q7", 3) == owner_rank("q7", 3) and shard(exs, RankInfo(0, 1)) == exs


def test_rank_info_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_info() == RankInfo(1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="outside WORLD_SIZE=4"):
        rank_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InputError, match="not integers"):
        rank_info()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_info() == RankInfo(0, 1)





def test_the_cli_shards_when_started_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m dpc_lens dpc ...`: the same command line, sharded; rank 0
    writes the merged records (in input order) and the summary."""
    out = tmp_path / "run"
    p = _torchrun(2, "-m", "dpc_lens", "dpc", "--model", "testbed", "--soft-prompt", "testbed",
                  "--data", "testbed", "--task", "arith", "--limit", "8", "--out", out, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    from dpc_lens.tasks import get_task, load_examples
    from dpc_lens.testbed import shipped_artefacts

    want = [e.id for e in load_examples(shipped_artefacts()["test"], get_task("arith"))[:8]]
    merged = [json.loads(x)["id"] for x in (out / "records.jsonl").read_text().splitlines()]
    assert merged == want
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["n"] == 8
    assert (out / "rank-0" / "records.jsonl").exists() and (out / "rank-1" / "records.jsonl").exists()
    assert p.stdout.count("report: ") == 1 and (out / "report.html").exists()  # rank 0 writes it once
