"""No run loses, duplicates or overwrites work (issue 13): the run-directory lock and SIGKILL.

* Two runs into one directory: while one holds the lock, the other is refused with a message
  naming the holder's pid and host; a lock left by a killed process is named and taken over.
* A DPC run SIGKILLed in the middle (a subprocess that kills itself after some records) resumes
  redoing at most the questions that were in flight; records and summary equal an
  uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from dpc_lens.errors import RunError

N_QUESTIONS = 10
BATCH = 3


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    from conftest import make_arith_bed

    return make_arith_bed(tmp_path_factory.mktemp("safety"), n_questions=N_QUESTIONS, init_range=0.3,
                          soft_scale=0.5)


def _argv(bed, out, *extra):
    root, model_dir, adapter, data = bed
    return ["dpc", "--model", str(model_dir), "--soft-prompt", str(adapter), "--data", str(data), "--task",
            "arith", "--out", str(out), "--max-new-tokens", "6", "--no-progress", "--baselines", "base",
            "--device", "cpu", *extra]


def _holder(directory):
    """A live process that takes the run lock on ``directory`` and keeps it."""
    code = ("import sys, time\nfrom dpc_lens.runs import RunLock\nRunLock(sys.argv[1], 'dpc').acquire()\n"
            "print('locked', flush=True)\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_into_a_locked_directory_is_refused_and_a_stale_lock_recovered(bed, tmp_path, capsys):
    from dpc_lens.cli import main
    from dpc_lens.runs import LOCK_NAME, RunLock, read_lock

    out = tmp_path / "run"
    holder = _holder(out)
    try:
        assert main(_argv(bed, out)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host {socket.gethostname()} (dpc)" in err and "RunError" in err
        assert "Wait for that run to finish" in err
        assert not (out / "records.jsonl").exists()  # the refused run wrote nothing
        with pytest.raises(RunError, match=f"pid {holder.pid}"):  # the API refuses the same way
            RunLock(out).acquire()
        # --resume does not get around it either
        assert main(_argv(bed, out, "--resume")) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert read_lock(str(out / LOCK_NAME))["pid"] == holder.pid  # left behind by the kill
    assert main(_argv(bed, out)) == 0
    err = capsys.readouterr().err
    assert f"taking over a stale lock in {out}: pid {holder.pid}" in err and "no longer running" in err
    assert not (out / LOCK_NAME).exists()  # released at the end of the run
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == N_QUESTIONS == len({r["id"] for r in recs})


def test_two_runs_at_once_cannot_both_write(bed, tmp_path):
    """Two real `dpc-lens dpc` processes started together into one directory: one runs, the
    other is refused naming the first; the records are written once."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpc_lens", *_argv(bed, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ra, rb = a.communicate(timeout=300), b.communicate(timeout=300)
    codes = sorted([a.returncode, b.returncode])
    # one ran; the other was refused: by the lock while the first ran, or (had it started only
    # after the first finished) by the finished run's records -- never both writing
    assert codes == [0, 2], (ra, rb)
    loser_err = ra[1] if a.returncode == 2 else rb[1]
    assert "in use by another run" in loser_err or "already exists" in loser_err
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == N_QUESTIONS == len({r["id"] for r in recs})


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from dpc_lens.dpc import DPCConfig, run_dpc
    from dpc_lens.dpc.detector import DetectorConfig
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.model import load_model
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples

    model_dir, adapter, data, out, kill_after = sys.argv[1:6]
    task = get_task("arith")
    cfg = DPCConfig(detector=DetectorConfig(R=0.0), generation=GenerationConfig(max_new_tokens=6,
                    batch_size={batch}), seed=3, random_draws=2)
    seen = []

    def on_record(rec):
        seen.append(rec["id"])
        if len(seen) == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    run_dpc(load_model(model_dir, device="cpu"), SoftPrompt.from_peft(adapter), load_examples(data, task),
            task, cfg, out_dir=out, on_record=on_record, progress=False)
""").format(batch=BATCH)


def _comparable(r):
    """Everything but timings and the float saliency statistics (batched with other questions,
    so equal only to float rounding; compared approximately below); answers, the trigger's
    decision and the corrupted rows exactly."""
    r = dict(r)
    for k in ("timings", "flows", "loss"):
        r.pop(k, None)
    if r.get("trigger") is not None:
        r["trigger"] = {"fired": r["trigger"]["fired"]}
    return json.loads(json.dumps(r))


def test_sigkill_mid_run_redoes_at_most_the_questions_in_flight(bed, tmp_path):
    from dpc_lens.dpc import DPCConfig, run_dpc
    from dpc_lens.dpc.detector import DetectorConfig
    from dpc_lens.generation import GenerationConfig
    from dpc_lens.model import load_model
    from dpc_lens.runs import LOCK_NAME
    from dpc_lens.soft_prompt import SoftPrompt
    from dpc_lens.tasks import get_task, load_examples

    root, model_dir, adapter, data = bed
    script = tmp_path / "killed_run.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "run"
    kill_after = 4
    p = subprocess.run([sys.executable, str(script), str(model_dir), str(adapter), str(data), str(out),
                        str(kill_after)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    on_disk = [json.loads(x)["id"] for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(on_disk) == kill_after  # each record was on disk as soon as it was final
    assert (out / LOCK_NAME).exists()  # the kill left its lock behind

    task = get_task("arith")
    exs = load_examples(data, task)
    cfg = DPCConfig(detector=DetectorConfig(R=0.0), generation=GenerationConfig(max_new_tokens=6,
                    batch_size=BATCH), seed=3, random_draws=2)
    model, soft = load_model(str(model_dir), device="cpu"), SoftPrompt.from_peft(adapter)
    redone = []
    records, summary = run_dpc(model, soft, exs, task, cfg, out_dir=out, resume=True, progress=False,
                               on_record=lambda r: redone.append(r["id"]))
    assert set(redone).isdisjoint(on_disk)  # nothing finished was computed again
    assert len(redone) == N_QUESTIONS - kill_after
    full, full_summary = run_dpc(model, soft, exs, task, cfg, out_dir=tmp_path / "full", progress=False)
    assert [_comparable(r) for r in records] == [_comparable(r) for r in full]
    for a, b in zip(records, full):
        for name in a["flows"]:
            assert a["flows"][name] == pytest.approx(b["flows"][name], rel=1e-4, abs=1e-7)
    assert summary == full_summary
    def on_disk_records(d):
        return [_comparable(json.loads(x)) for x in (d / "records.jsonl").read_text().splitlines()]

    assert on_disk_records(out) == on_disk_records(tmp_path / "full")  # same records, same order, once each
    assert json.loads((out / "summary.json").read_text()) == json.loads(
        (tmp_path / "full" / "summary.json").read_text())
    assert summary["random_draws"]["n"] == 2 and "random" in summary["accuracy"]
