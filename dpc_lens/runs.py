"""Run I/O: JSON and JSONL files, run directories checked, locked and resumed -- the one place.

Every run that writes results (``run_dpc``, ``calibrate_dpc``, ``run_iap``, ``calibrate_iap``, the
CLI's ``demo``) reads and writes its files through here:

* :func:`read_json` / :func:`write_json` -- one JSON file, errors naming the file and line;
  writes are atomic (a kill never leaves half a config).
* :func:`read_records` / :func:`append_jsonl` / :func:`rewrite_jsonl` -- a run's JSONL records
  (a torn last line dropped, duplicated ids kept once, a corrupt middle line named).
* :func:`resume_run` -- THE resume guard: an existing run without ``resume`` is refused, a run
  made with other settings is refused, the settings are written, corrupt lines are repaired.

* :func:`check_out_dir` — the output path is a directory this process can write (not an existing
  file, not under a file, not read-only), checked before a model is loaded or a question run.
* :class:`RunLock` — an exclusive lock file (``.dpc_lens.lock``, holding the owner's pid, host
  and start time) for the whole run, so two runs into one directory cannot both write. A lock
  left by a process that no longer runs on this host is named and taken over.
* :func:`repair_jsonl` — on ``--resume``: lines that are not JSON objects are moved aside to
  ``<file>.rejected`` (with their line numbers) and their ids are redone; a torn last line (a
  write cut by a kill) is dropped; a duplicated id is kept once.
* :func:`unique_by_id` — what every reader uses so a duplicated record is never counted twice.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from .errors import DataError, RunError

__all__ = ["LOCK_NAME", "RunLock", "check_out_dir", "repair_jsonl", "unique_by_id", "read_lock",
           "read_json", "write_json", "read_records", "append_jsonl", "rewrite_jsonl", "resume_run",
           "check_unique_ids"]

LOCK_NAME = ".dpc_lens.lock"

# paths this process holds (a command that locks its --out and then calls run_dpc / run_iap,
# which lock it again, must not lock itself out)
_HELD: dict[str, int] = {}


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> str:
    """Make sure ``path`` is (or can become) a writable directory; create it; return it.

    Raises:
        RunError: ``path`` is an existing file, lies under a file, or cannot be written.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise RunError(f"{flag} must be a directory path, got {type(path).__name__} {path!r}.")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(
            f"{flag} {path!r} is an existing file, not a directory. Pass a directory path (a new "
            "one, or the directory of the run to resume)."
        )
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise RunError(
            f"{flag} {path!r} lies under {parent!r}, which is a file, not a directory. Pass a "
            "path whose parents are directories."
        )
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dpc_lens_probe_"):
            pass
    except OSError as exc:
        raise RunError(
            f"{flag} {path!r} cannot be written ({exc.strerror or exc}). Pass a directory you "
            "can write to, or fix its permissions."
        ) from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(lock_path: str) -> dict[str, Any] | None:
    """The holder recorded in a lock file (``pid``, ``host``, ``started``, ``command``), or
    ``None`` when it is unreadable (a lock torn by a kill right after it was created)."""
    try:
        with open(lock_path, encoding="utf-8") as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) and "pid" in d else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unreadable lock"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    cmd = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{cmd}, started {when}"


class RunLock:
    """Exclusive lock on a run directory for the length of a ``with`` block.

    The lock file ``<dir>/.dpc_lens.lock`` is created atomically (``O_EXCL``) and holds the
    owner's pid, host and start time; it is removed on exit. Re-entrant within one process.
    A lock whose pid no longer runs on this host is stale: it is named on stderr and taken over.

    Raises:
        RunError: another live process holds the directory (the message names it).
    """

    def __init__(self, directory: str | os.PathLike, command: str = "", *,
                 warn: Callable[[str], None] | None = None) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.command = command
        self.key = os.path.realpath(self.path)
        self._warn = warn or (lambda msg: print(msg, file=sys.stderr))
        self.recovered: dict[str, Any] | None = None

    def acquire(self) -> "RunLock":
        if self.key in _HELD:
            _HELD[self.key] += 1
            return self
        os.makedirs(self.directory, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": self.command}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is not None and not self._stale(holder):
                    raise RunError(
                        f"{self.directory} is in use by another run: {_describe(holder)} holds "
                        f"{self.path}. Wait for that run to finish, or write to another --out. If "
                        "that process is gone (e.g. it ran on another machine), delete the lock "
                        "file and run again."
                    ) from None
                if holder is None and time.time() - _mtime(self.path) < 5.0:
                    time.sleep(0.2)  # a lock being written right now
                    continue
                self._warn(f"dpc-lens: taking over a stale lock in {self.directory}: "
                           f"{_describe(holder)} is no longer running.")
                self.recovered = holder or {}
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            _HELD[self.key] = 1
            return self
        raise RunError(f"Could not take the lock {self.path}; delete it if no run is using "
                       f"{self.directory} and run again.")

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell: a run on another machine sharing this disk
        try:
            pid = int(holder["pid"])
        except (TypeError, ValueError):
            return True
        return pid != os.getpid() and not _pid_alive(pid)

    def release(self) -> None:
        n = _HELD.get(self.key, 0)
        if n > 1:
            _HELD[self.key] = n - 1
            return
        _HELD.pop(self.key, None)
        holder = read_lock(self.path)
        if holder is not None and holder.get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def unique_by_id(records: Iterable[dict[str, Any]],
                 key: Callable[[dict[str, Any]], Hashable] = lambda r: r.get("id")
                 ) -> tuple[list[dict[str, Any]], int]:
    """``(records with each key once, first occurrence kept; number of duplicates dropped)``."""
    seen: set = set()
    out, dups = [], 0
    for r in records:
        k = key(r)
        if k in seen:
            dups += 1
            continue
        seen.add(k)
        out.append(r)
    return out, dups


def repair_jsonl(path: str | os.PathLike,
                 key: Callable[[dict[str, Any]], Hashable] = lambda r: r.get("id"),
                 ) -> tuple[list[dict[str, Any]], list[int]]:
    """Make a run's JSONL file resumable: ``(good records, line numbers moved aside)``.

    Lines that are not JSON objects (except a torn last line, simply dropped) are appended to
    ``<path>.rejected`` as ``{"line": n, "text": ...}`` so nothing is lost; a record whose key
    was already seen is dropped; the file is rewritten atomically with the rest.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
    good, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if n == len(lines) and not line.endswith("\n"):
                continue  # a write cut by a kill
            bad.append((n, line.rstrip("\n")))
            continue
        good.append(rec)
    good, _ = unique_by_id(good, key)
    if bad:
        with open(path + ".rejected", "a", encoding="utf-8") as fh:
            for n, text in bad:
                fh.write(json.dumps({"line": n, "text": text}) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in good:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return good, [n for n, _ in bad]


def corrupt_line_error(path: str, line: int) -> DataError:
    """The error a reader raises on a corrupt middle line: the line, and the repair."""
    return DataError(
        f"{path}: line {line} is not valid JSON; the records file is corrupt there. Run the same "
        "command again with --resume (resume=True): bad lines are moved aside to "
        f"{os.path.basename(path)}.rejected and those questions are redone."
    )


def ids_preview(ids: Sequence[Any], n: int = 5) -> str:
    head = ", ".join(map(str, list(ids)[:n]))
    return head + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


# ---------------------------------------------------------------------------------------------
# JSON and JSONL files
# ---------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file's content; :class:`DataError` naming the file (and line) when missing or
    malformed (``what`` says which file it should have been: "DPC config", "standardizer"...)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataError(f"The {what} file {path!r} does not exist.") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg}).") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file renamed over ``path``)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def append_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records, one JSON object a line, flushed (a kill loses at most the torn last line,
    which :func:`read_records` drops and :func:`repair_jsonl` removes)."""
    with open(os.fspath(path), "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))


def rewrite_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replace a JSONL file with ``records`` atomically."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_records(path: str | os.PathLike,
                 key: Callable[[dict], Hashable] | None = None) -> list[dict[str, Any]]:
    """Records of a (possibly interrupted) ``records.jsonl``; a torn last line is dropped, and a
    record whose id appeared earlier in the file (two runs that wrote into one directory) is
    kept once, so nothing is counted twice (``key``: what makes a record unique, default its
    ``id``; IAP's ``pairs.jsonl`` uses ``(id, prompt)``).

    Raises:
        DataError: a line in the middle is not JSON (the message names it and the repair:
            ``--resume`` moves bad lines aside to ``records.jsonl.rejected`` and redoes them).
    """
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # a write cut by a kill: redo that record
                break
            raise corrupt_line_error(os.fspath(path), n) from None
    return unique_by_id(out, key)[0] if key is not None else unique_by_id(out)[0]


def check_unique_ids(ids: Sequence[Any], what: str = "Example ids") -> None:
    """Refuse repeated example ids before any work (resume and every reader key on them)."""
    from .errors import InputError

    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if list(ids).count(i) > 1})
        raise InputError(f"{what} must be unique (resume relies on them); repeated: {ids_preview(dup)}. "
                         "Give each line of the data file its own id.")


# ---------------------------------------------------------------------------------------------
# The resume guard
# ---------------------------------------------------------------------------------------------


def resume_run(
    records_path: str | os.PathLike,
    *,
    resume: bool,
    settings_path: str | os.PathLike,
    settings: dict[str, Any],
    exists_message: str,
    mismatch_message: Callable[[dict[str, Any], dict[str, Any]], str],
    comparable: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d,
    key: Callable[[dict[str, Any]], Hashable] = lambda r: r.get("id"),
    redone: str = "their questions are redone",
) -> list[dict[str, Any]]:
    """The one resume guard of every run; returns the records already on disk (``[]`` when
    starting afresh).

    1. ``records_path`` exists and ``resume`` is False: :class:`InputError` (``exists_message``):
       a run is never silently overwritten or appended to.
    2. ``resume`` with records and ``settings_path`` on disk: the settings they were made with
       must equal ``settings`` (after ``comparable``, which drops what cannot change a record,
       such as batch sizes); otherwise :class:`InputError` (``mismatch_message(old, new)``).
    3. ``settings`` are written to ``settings_path`` (atomically).
    4. With ``resume``: :func:`repair_jsonl` (corrupt lines moved aside to ``.rejected`` and said
       on stderr, a duplicated ``key`` kept once) and the good records returned.
    """
    from .errors import InputError

    records_path, settings_path = os.fspath(records_path), os.fspath(settings_path)
    have = os.path.exists(records_path)
    if have and not resume:
        raise InputError(exists_message)
    if resume and have and os.path.exists(settings_path):
        old = read_json(settings_path, "run settings")
        if comparable(copy_json(old)) != comparable(copy_json(settings)):
            raise InputError(mismatch_message(old, settings))
    os.makedirs(os.path.dirname(settings_path) or ".", exist_ok=True)
    write_json(settings_path, settings)
    if not resume:
        return []
    records, bad = repair_jsonl(records_path, key=key)
    if bad:
        print(f"dpc-lens: {records_path}: moved {len(bad)} corrupt line(s) (line "
              f"{', '.join(map(str, bad))}) to {records_path}.rejected; {redone}.", file=sys.stderr)
    return records


def copy_json(obj: Any) -> Any:
    """A deep copy of a JSON value (so ``comparable`` may pop keys freely)."""
    return json.loads(json.dumps(obj))
