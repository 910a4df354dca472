"""Data-parallel runs over ranks started by ``torchrun`` / ``accelerate launch``.

The same code runs on one process or many, on one node or several: each rank reads ``RANK`` /
``WORLD_SIZE`` from the environment the launcher sets (one process per GPU, or per CPU socket),
takes the questions whose id hashes to it, and runs the ordinary pipeline on them into its own
directory ``OUT/rank-<r>/`` — with everything that pipeline guarantees there (its own lock,
records appended per question, ``--resume``, repair of a torn line). After a barrier
(``torch.distributed``, gloo on CPU, nccl on GPU) rank 0 merges every rank directory into
``OUT/records.jsonl`` (input order, one record per id) and ``OUT/summary.json``.

Sharding is by a stable hash of the example id (CRC-32 modulo the number of ranks), never by
position, and a rank skips every id already finished in *any* rank directory: so ``resume``
works per rank, after killing one rank, and after a change in the number of ranks (old rank
directories are read, and merged, too). No process pool of dpc_lens's own: the launcher owns the
processes.

    torchrun --nproc_per_node 2 my_script.py      # my_script calls run_dpc_distributed(...)
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError, InputError
from .runs import read_json, read_records, rewrite_jsonl, write_json

__all__ = ["RankInfo", "rank_info", "owner_rank", "shard", "run_dpc_distributed", "merge_dpc_runs",
           "run_iap_distributed", "merge_iap_runs", "calibrate_dpc_distributed", "merge_dpc_calibrations"]


@dataclass(frozen=True)
class RankInfo:
    """This process's place among the ranks (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """Rank and world size from the launcher's environment (``RANK`` / ``WORLD_SIZE``, set by
    torchrun and accelerate launch); ``RankInfo(0, 1)`` when not launched that way."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not "
            "integers; start the script with torchrun or accelerate launch, or unset them."
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}; check the launcher's settings.")
    return RankInfo(rank, world)


def owner_rank(example_id: Any, world: int) -> int:
    """The rank that owns ``example_id`` among ``world`` ranks (stable across runs and machines)."""
    return zlib.crc32(str(example_id).encode("utf-8")) % world


def shard(examples: Sequence[Any], info: RankInfo) -> list[Any]:
    """The examples this rank owns, in input order."""
    return [e for e in examples if owner_rank(e.id, info.world) == info.rank]


def _rank_dirs(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "rank-*")))


def _finished_ids(out_dir: str) -> set[Any]:
    """Ids finished in any rank directory (read only; a file with a corrupt line is left to its
    own rank's resume, which repairs it: its ids may then be done twice, and merged once)."""
    done: set[Any] = set()
    for d in _rank_dirs(out_dir):
        try:
            done.update(r["id"] for r in read_records(os.path.join(d, "records.jsonl")))
        except DataError:
            continue
    return done


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _init(info: RankInfo) -> bool:
    """Join the process group the launcher prepared (gloo on CPU, nccl with CUDA); return
    whether this call created it (then it is destroyed at the end)."""
    if info.world == 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _sharded(examples: Sequence[Any], out_dir: str | os.PathLike, *, resume: bool, info: RankInfo | None,
             marker: str, run: Any, merge: Any, finished: Any = None) -> Any:
    """The skeleton every data-parallel runner shares: join the launcher's process group,
    refuse an existing rank directory without ``resume`` (``marker``: the file that says one
    exists), run this rank's shard (``run(examples, rank_dir, resume_here, info)``; with
    ``finished(out_dir)``, ids finished in any rank directory are skipped) and let rank 0
    ``merge(out_dir)`` between barriers. Returns the merge on rank 0, ``None`` elsewhere."""
    info = info or rank_info()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    created = _init(info)
    try:
        mine_dir = os.path.join(out_dir, f"rank-{info.rank}")
        here = os.path.exists(os.path.join(mine_dir, marker))
        if here and not resume:
            raise InputError(f"{mine_dir} already holds a run ({marker}): pass resume=True (--resume) to "
                             "continue it, or choose another output directory.")
        skip = finished(out_dir) if (resume and finished is not None) else set()
        mine = [e for e in shard(examples, info) if e.id not in skip]
        _barrier()  # every rank has read what is finished before any rank writes
        if mine:
            run(mine, mine_dir, here, info)
        _barrier()
        result = merge(out_dir) if info.is_main else None
        _barrier()
        return result
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def merge_dpc_runs(out_dir: str | os.PathLike, examples: Sequence[Any]) -> tuple[list[dict], dict]:
    """Rank 0's merge: every rank directory's records, one per id, in the order of
    ``examples``, into ``out_dir/records.jsonl``; their summary into ``out_dir/summary.json``."""
    from .dpc import summarize

    out_dir = os.fspath(out_dir)
    by_id: dict[Any, dict] = {}
    for d in _rank_dirs(out_dir):
        path = os.path.join(d, "records.jsonl")
        if os.path.exists(path):
            for r in read_records(path):
                by_id.setdefault(r["id"], r)
    records = [by_id[e.id] for e in examples if e.id in by_id]
    summary = summarize(records)
    used = []
    for d in _rank_dirs(out_dir):
        path = os.path.join(d, "summary.json")
        if os.path.exists(path):
            used.append(bool(read_json(path, "a rank's summary").get("kv_cache_used")))
    summary["kv_cache_used"] = bool(used) and all(used)
    summary["ranks"] = len(_rank_dirs(out_dir))
    rewrite_jsonl(os.path.join(out_dir, "records.jsonl"), records)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    if records and summary.get("n", 0) == 0:  # the whole run, not one rank's shard
        from .dpc.pipeline import nothing_evaluated

        raise nothing_evaluated(summary, out_dir)
    return records, summary


def run_dpc_distributed(
    model: Any,
    soft_prompt: Any,
    examples: Sequence[Any],
    task: Any,
    config: Any = None,
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool | None = None,
    info: RankInfo | None = None,
    on_record: Any = None,
) -> tuple[list[dict], dict] | None:
    """:func:`dpc_lens.dpc.run_dpc` sharded over the launcher's ranks (see the module docstring).

    Every rank calls this with the same arguments. Returns ``(records, summary)`` of the whole
    run on rank 0 (after the merge) and ``None`` on the other ranks.
    """
    from .dpc import DPCConfig, run_dpc
    from .tasks import resolve_task
    from .validate import as_config

    task, config = resolve_task(task), as_config(config, DPCConfig)  # before any model work

    def run(mine, mine_dir, here, info):
        try:
            run_dpc(model, soft_prompt, mine, task, config, out_dir=mine_dir, resume=here,
                    progress=progress and info.is_main, on_record=on_record)
        except DataError as exc:  # one shard all skipped: judged on the merged run instead
            if not getattr(exc, "nothing_evaluated", False):
                raise

    return _sharded(examples, out_dir, resume=resume, info=info, marker="records.jsonl", run=run,
                    merge=lambda out: merge_dpc_runs(out, examples), finished=_finished_ids)


def _sum_costs(out_dir: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in _rank_dirs(out_dir):
        path = os.path.join(d, "summary.json")
        if os.path.exists(path):
            for k, v in read_json(path, "a rank's summary").get("this_run", {}).items():
                if k != "pairs":
                    total[k] = total.get(k, 0) + v
    return total


def merge_iap_runs(out_dir: str | os.PathLike, examples: Sequence[Any], task: Any, pool: Any = None,
                   config: Any = None, *, standardizer: Any = None, kv_cache_used: bool = True
                   ) -> tuple[list[dict], dict]:
    """Rank 0's merge of an IAP run: every rank's (question, prompt) pairs, question-major in the
    order of ``examples`` and the pool, evaluated together as one single-process run would
    (the standardiser, when none was given, fitted on all the pairs, not per rank); writes
    ``pairs.jsonl``, ``questions.jsonl``, ``standardizer.json``, ``config.json`` and
    ``summary.json`` into ``out_dir``."""
    from pathlib import Path

    from .iap.pipeline import _as_pool, _as_run_config, _pair_key, evaluate, fit_standardizer
    from .tasks import resolve_task

    task = resolve_task(task)
    out_dir = os.fspath(out_dir)
    cfg, pool = _as_run_config(config), _as_pool(pool)
    found: dict[Any, dict] = {}
    for d in _rank_dirs(out_dir):
        for r in read_records(os.path.join(d, "pairs.jsonl"), key=_pair_key):
            found.setdefault(_pair_key(r), r)
    pairs = []
    for ex in examples:
        for k, p in enumerate(pool):
            r = found.get((str(ex.id), p.text))
            if r is None:
                raise DataError(f"{out_dir}: no rank has the pair ({ex.id!r}, {p.text!r}); resume the "
                                "run (--resume) so every question is finished before the merge.")
            pairs.append({**r, "prompt_index": k})
    if standardizer is None:
        std = fit_standardizer(pairs)
        note = {"fitted_on": "run", "note": ("No dev split was given: the standardiser was fitted on this "
                                             "run's own flows, so z-scores (and tau) are in-sample.")}
    else:
        std, note = standardizer, {"fitted_on": "dev", "note": "Standardiser fitted on a separate dev split."}
    rows, summary = evaluate(pairs, pool, std, cfg, task)
    summary["standardizer"] = {**note, **std.to_dict()}
    summary["this_run"] = {**_sum_costs(out_dir), "pairs": len(pairs)}
    summary["config"] = cfg.to_dict()
    summary["kv_cache_used"] = kv_cache_used
    summary["ranks"] = len(_rank_dirs(out_dir))
    out = Path(out_dir)
    rewrite_jsonl(out / "pairs.jsonl", pairs)
    rewrite_jsonl(out / "questions.jsonl", rows)
    std.save(out / "standardizer.json")
    cfg.save(out / "config.json")
    write_json(out / "summary.json", summary)
    return pairs, summary


def run_iap_distributed(
    model: Any,
    examples: Sequence[Any],
    task: Any,
    pool: Any = None,
    config: Any = None,
    *,
    out_dir: str | os.PathLike,
    standardizer: Any = None,
    resume: bool = False,
    progress: bool | None = None,
    info: RankInfo | None = None,
) -> tuple[list[dict], dict] | None:
    """:func:`dpc_lens.iap.run_iap` sharded over the launcher's ranks: each rank scores the
    (question, prompt) pairs of the questions it owns into ``OUT/rank-<r>/`` (resumable per
    pair), rank 0 evaluates all pairs together (:func:`merge_iap_runs`). Returns the whole
    run's ``(pairs, summary)`` on rank 0 and ``None`` elsewhere."""
    from .iap import run_iap
    from .iap.pipeline import _as_run_config
    from .model import as_adapter
    from .tasks import resolve_task

    task, config = resolve_task(task), _as_run_config(config)  # before any model work

    def run(mine, mine_dir, here, info):
        run_iap(model, mine, task, pool, config, standardizer=standardizer, out_dir=mine_dir,
                resume=here, progress=progress and info.is_main)

    def merge(out):
        kv = bool(_as_generation_uses_cache(config) and as_adapter(model).supports_kv_cache)
        return merge_iap_runs(out, examples, task, pool, config, standardizer=standardizer, kv_cache_used=kv)

    return _sharded(examples, out_dir, resume=resume, info=info, marker="pairs.jsonl", run=run, merge=merge)


def _as_generation_uses_cache(config: Any) -> bool:
    from .iap.pipeline import _as_run_config

    return bool(_as_run_config(config).generation.use_kv_cache)


def merge_dpc_calibrations(out_dir: str | os.PathLike, examples: Sequence[Any], base_config: Any = None,
                           grid: Any = None) -> Any:
    """Rank 0's merge of a sharded DPC calibration: every rank's cached per-example work (PT
    correctness and detector inputs, correctness of each corrupted generation; a calibration
    depends on an example only through these) read from ``OUT/rank-<r>/calibration_progress/``,
    then the grid scored over all dev examples at once (:func:`calibrate_from_cache`) and saved
    in ``out_dir`` (``calibration.json``, ``dpc_config.json``)."""
    from .dpc.calibration import (
        CalibrationGrid,
        _inputs_from_json,
        calibrate_from_cache,
        needed_pairs,
        sweep_triggers,
    )
    from .dpc.pipeline import DPCConfig

    out_dir = os.fspath(out_dir)
    cfg, grid = base_config or DPCConfig(), grid or CalibrationGrid()
    pt: dict[Any, dict] = {}
    cor: dict[tuple[Any, tuple[int, ...]], bool] = {}
    for d in _rank_dirs(out_dir):
        prog = os.path.join(d, "calibration_progress")
        for r in read_records(os.path.join(prog, "pt.jsonl")):
            pt.setdefault(r["id"], r)
        for r in read_records(os.path.join(prog, "corrupted.jsonl"),
                              key=lambda r: (r["id"], tuple(r["rows"]))):
            cor.setdefault((r["id"], tuple(r["rows"])), bool(r["correct"]))
    missing = [e.id for e in examples if e.id not in pt]
    if missing:
        raise DataError(f"{out_dir}: no rank has calibrated {missing[:5]}; resume the calibration "
                        "(--resume) so every dev example is finished before the merge.")
    inputs = [_inputs_from_json(pt[e.id]["inputs"]) for e in examples]
    pt_correct = [bool(pt[e.id]["pt_correct"]) for e in examples]
    sweep = sweep_triggers(inputs, grid, cfg.detector)
    table = {}
    for i, rows in needed_pairs(sweep):
        key = (examples[i].id, tuple(rows))
        if key not in cor:
            raise DataError(f"{out_dir}: the corrupted generation {key} is missing from every rank.")
        table[(i, rows)] = cor[key]
    gens = {"pt": len(pt), "corrupted": len(cor), "total": len(pt) + len(cor)}
    cal = calibrate_from_cache(inputs, pt_correct, table, grid, cfg, sweep=sweep, n_generations=gens)
    cal.save(out_dir)
    return cal


def calibrate_dpc_distributed(
    model: Any,
    soft_prompt: Any,
    examples: Sequence[Any],
    task: Any,
    base_config: Any = None,
    grid: Any = None,
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool | None = None,
    info: RankInfo | None = None,
) -> Any:
    """:func:`dpc_lens.dpc.calibrate_dpc` sharded over the launcher's ranks: each rank does the
    model work for the dev examples it owns into ``OUT/rank-<r>/`` (resumable), rank 0 scores
    the grid over all of them (:func:`merge_dpc_calibrations`). Returns the calibration on rank
    0 and ``None`` elsewhere."""
    from .dpc import CalibrationGrid, DPCConfig, calibrate_dpc
    from .tasks import resolve_task
    from .validate import as_config

    task = resolve_task(task)  # before any model work
    base_config = as_config(base_config, DPCConfig, "base_config")
    grid = as_config(grid, CalibrationGrid, "grid")

    def run(mine, mine_dir, here, info):
        calibrate_dpc(model, soft_prompt, mine, task, base_config, grid, out_dir=mine_dir, resume=here,
                      progress=progress and info.is_main)

    return _sharded(examples, out_dir, resume=resume, info=info,
                    marker=os.path.join("calibration_progress", "pt.jsonl"), run=run,
                    merge=lambda out: merge_dpc_calibrations(out, examples, base_config, grid))
