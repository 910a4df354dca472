"""The task registry: data sets by name, and the loaders behind them.

``get_task("gsm8k" | "math" | "aqua" | "arith" | "gym:<reasoning-gym data set>")`` returns a
:class:`Task` object (loader,
answer extraction, comparison, accuracy); :func:`load_examples` reads a local data file for a
task. The synthetic arithmetic task lives in :mod:`dpc_lens.tasks.arith` and is imported only
when asked for. Task objects are stateless; each call returns a fresh one.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from dpc_lens.errors import ConfigError
from dpc_lens.tasks.aqua import AquaTask
from dpc_lens.tasks.base import Example, Task
from dpc_lens.tasks.gsm8k import GSM8KTask
from dpc_lens.tasks.io import read_jsonl, write_jsonl
from dpc_lens.tasks.math import MathTask

__all__ = [
    "answer_of",
    "Example",
    "Task",
    "TASKS",
    "get_task",
    "resolve_task",
    "load_examples",
    "read_jsonl",
    "write_jsonl",
]

TASKS: tuple[str, ...] = ("gsm8k", "math", "aqua", "arith")
"""The names :func:`get_task` accepts."""


def get_task(name: str) -> Task:
    """The task called ``name`` (case and surrounding spaces ignored).

    Raises:
        ConfigError: ``name`` is not one of :data:`TASKS` (the message lists them).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "gsm8k":
        return GSM8KTask()
    if key == "math":
        return MathTask()
    if key == "aqua":
        return AquaTask()
    if key == "arith":
        from dpc_lens.tasks.arith import ArithTask  # lazy: the module is optional here

        return ArithTask()
    if isinstance(key, str) and key.startswith("gym:"):
        from dpc_lens.tasks.gym import GymTask  # lazy: needs the reasoning-gym package

        return GymTask(name.strip()[len("gym:"):].strip())
    close = difflib.get_close_matches(str(key), TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown task {name!r}; valid names are {', '.join(TASKS)}, or gym:<name> for a "
        f"reasoning-gym data set.{hint}"
    )


def resolve_task(task: str | Task) -> Task:
    """The task object for ``task``: a name goes through :func:`get_task`, a task object (anything
    with ``extract_answer`` and ``is_correct``) is returned as it is.

    Every function that takes a task (``run_dpc``, ``calibrate_dpc``, ``run_iap``,
    ``calibrate_iap``, ``evaluate_accuracy`` ...) resolves it here first, before any model work,
    so a name is accepted everywhere and a wrong one fails at once.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
        InputError: neither a name nor a task object.
    """
    if isinstance(task, str):
        return get_task(task)
    if callable(getattr(task, "extract_answer", None)) and callable(getattr(task, "is_correct", None)):
        return task
    from dpc_lens.errors import InputError

    raise InputError(
        f"task must be a task name ({', '.join(TASKS)}, or gym:<name>) or a task object with "
        f"extract_answer and is_correct, e.g. task='arith' or dpc_lens.tasks.get_task('arith'); "
        f"got {type(task).__name__} {task!r:.60}."
    )


def load_examples(path: str | Path, task: str | Task) -> list[Example]:
    """Read the local data file (or MATH directory) at ``path`` with ``task``'s loader.

    ``task`` is a name from :data:`TASKS` or a task object.

    Raises:
        ConfigError: unknown task name.
        DataError: missing or malformed file (the message names the file, line and field).
    """
    return resolve_task(task).load(path)


def answer_of(task: Task, text: str, example: Example) -> str | None:
    """The task's answer in ``text`` for ``example`` (AQuA maps numbers to the example's options).

    Every pipeline (DPC, calibration, IAP, prompt-tuning evaluation) scores through this, so an
    answer is read the same way everywhere.
    """
    if getattr(task, "name", "") == "aqua" and "options" in example.meta:
        return task.extract_answer(text, options=example.meta["options"])  # type: ignore[call-arg]
    return task.extract_answer(text)
