"""IAP's candidate pool: flow names, :class:`CandidatePrompt`, :class:`PromptPool` and the
default pool of the IAP paper (instructive, misleading, irrelevant prompts), read from and
written to text or JSON files with file:line errors. Model-free."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, no_type_check

from dpc_lens.errors import DataError, InputError

if TYPE_CHECKING:  # pandas is imported lazily, only by to_dataframe()
    pass

__all__ = [
    "FLOW_QP",
    "FLOW_QR",
    "FLOW_PR",
    "IAP_FLOWS",
    "PROMPT_GROUPS",
    "CandidatePrompt",
    "DEFAULT_PROMPTS",
    "PromptPool",
]

# Classes marked ``@no_type_check`` validate and coerce raw user input in ``__post_init__``
# (lists -> tuples, strings -> prompts, ints -> floats) and explain what is wrong and how to fix
# it. The run-time type checker the test suite installs (jaxtyping's import hook) would otherwise
# check the raw ``__init__`` arguments against the *stored* field types and pre-empt those
# messages with a generic TypeCheckError. None of them has a tensor shape to check.


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

FLOW_QP = "question->prompt"
FLOW_QR = "question->rationale"
FLOW_PR = "prompt->rationale"
#: The three IAP flows, named "source->target" as in SPEC section 2.
IAP_FLOWS: tuple[str, str, str] = (FLOW_QP, FLOW_QR, FLOW_PR)

PromptGroup = Literal["instructive", "misleading", "irrelevant", "custom"]
#: Groups of the IAP paper's pool, plus ``"custom"`` for prompts a user brings.
PROMPT_GROUPS: tuple[str, ...] = ("instructive", "misleading", "irrelevant", "custom")

_JSON_VERSION = 1


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_flow_name(name: object, where: str) -> str:
    if not isinstance(name, str) or name not in IAP_FLOWS:
        raise InputError(
            f"{where}: unknown flow {name!r}; expected one of {list(IAP_FLOWS)}."
            + (_suggest(name, IAP_FLOWS) if isinstance(name, str) else "")
        )
    return name


# ---------------------------------------------------------------------------------------------
# The candidate pool
# ---------------------------------------------------------------------------------------------


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class CandidatePrompt:
    """One hard prompt of the pool.

    Attributes:
        text: the prompt exactly as it is placed after the question (not stripped: whitespace
            changes tokenisation, so what you give is what the model sees).
        group: ``"instructive"``, ``"misleading"``, ``"irrelevant"`` (the IAP paper's groups,
            taken from Kojima et al.'s zero-shot CoT study) or ``"custom"``.
    """

    text: str
    group: PromptGroup = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise InputError(
                f"CandidatePrompt.text must be a non-empty string, got {self.text!r}; "
                "give the prompt's words, e.g. \"Let's think step by step.\"."
            )
        if self.group not in PROMPT_GROUPS:
            raise InputError(
                f"CandidatePrompt.group must be one of {list(PROMPT_GROUPS)}, got {self.group!r}."
                + (_suggest(self.group, PROMPT_GROUPS) if isinstance(self.group, str) else "")
            )

    def to_dict(self) -> dict[str, str]:
        return {"text": self.text, "group": self.group}


#: The default pool: nine prompts, three per group, instructive ones first so that IAP-ss tries
#: them first. The groups and most wordings follow Kojima et al. (2022, table 4), which the IAP
#: paper builds its pool from; the exact nine prompts of the IAP paper are not reproduced here
#: (not verified against its appendix) — load your own list with :meth:`PromptPool.from_file`.
DEFAULT_PROMPTS: tuple[CandidatePrompt, ...] = (
    CandidatePrompt("Let's think step by step.", "instructive"),
    CandidatePrompt("Let's think about this logically.", "instructive"),
    CandidatePrompt("First, let's break the problem into steps.", "instructive"),
    CandidatePrompt("Don't think. Just feel.", "misleading"),
    CandidatePrompt("Let's solve it quickly without checking.", "misleading"),
    CandidatePrompt("Let's think step by step but reach an incorrect answer.", "misleading"),
    CandidatePrompt("It's a beautiful day.", "irrelevant"),
    CandidatePrompt("By the way, I found a good restaurant nearby.", "irrelevant"),
    CandidatePrompt("Abrakadabra!", "irrelevant"),
)


@no_type_check  # validated in __post_init__; see the note at the top of the module
@dataclass(frozen=True)
class PromptPool:
    """An ordered, validated pool of candidate prompts.

    The order matters: IAP-ss tries prompts in this order and every tie (in score or in votes)
    falls back to it. The pool is non-empty and its texts are unique (two equal texts would be
    the same (question, prompt) pair twice and would count twice in a vote).

    Build one with ``PromptPool(prompts)`` (a sequence of :class:`CandidatePrompt` or plain
    strings, which get group ``"custom"``), :meth:`default`, or :meth:`from_file`.
    """

    prompts: tuple[CandidatePrompt, ...] = DEFAULT_PROMPTS

    def __post_init__(self) -> None:
        if isinstance(self.prompts, (str, bytes)) or not isinstance(self.prompts, Iterable):
            raise InputError(
                f"PromptPool.prompts must be a sequence of prompts, got {type(self.prompts).__name__}; "
                "wrap a single prompt in a list: PromptPool([\"Let's think step by step.\"])."
            )
        items = tuple(
            p if isinstance(p, CandidatePrompt) else CandidatePrompt(p) for p in self.prompts
        )
        if not items:
            raise InputError(
                "PromptPool is empty; IAP needs at least one candidate prompt "
                "(use PromptPool.default() for the nine built-in ones)."
            )
        seen: dict[str, int] = {}
        for i, p in enumerate(items):
            if p.text in seen:
                raise InputError(
                    f"PromptPool has the prompt {p.text!r} twice (positions {seen[p.text]} and {i}); "
                    "prompt texts must be unique — remove the duplicate."
                )
            seen[p.text] = i
        object.__setattr__(self, "prompts", items)

    @classmethod
    def default(cls) -> PromptPool:
        """The nine built-in prompts, :data:`DEFAULT_PROMPTS`."""
        return cls(DEFAULT_PROMPTS)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i: int) -> CandidatePrompt:
        return self.prompts[i]

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.prompts)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(p.group for p in self.prompts)

    def index(self, text: str) -> int:
        """Position of the prompt with this text; :class:`InputError` if it is not in the pool."""
        for i, p in enumerate(self.prompts):
            if p.text == text:
                return i
        raise InputError(
            f"{text!r} is not in the prompt pool." + _suggest(text, self.texts)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": [p.to_dict() for p in self.prompts]}

    def save(self, path: str | Path) -> None:
        """Write the pool as a JSON list of ``{"text", "group"}`` objects (readable by
        :meth:`from_file`)."""
        Path(path).write_text(
            json.dumps([p.to_dict() for p in self.prompts], indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )

    @classmethod
    def from_file(cls, path: str | Path) -> PromptPool:
        """Read a pool from a local file.

        Two formats, chosen by the file suffix:

        * ``*.json``: a JSON list whose items are strings (group ``"custom"``) or objects
          ``{"text": ..., "group": ...}`` (``group`` optional).
        * anything else: plain text, one prompt per line. Each line is stripped of surrounding
          whitespace; blank lines and lines starting with ``#`` are skipped. Every prompt gets
          group ``"custom"``.

        Raises:
            DataError: the file is missing, unreadable, not valid JSON, has an item of the wrong
                type, an empty prompt, an unknown group, a duplicate prompt, or no prompt at all.
                The message names the file and the line.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"{path}: no such prompt file; give the path of a .json list or a text file "
                "with one prompt per line."
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read the prompt file as UTF-8 text ({e}).") from None
        if path.suffix.lower() == ".json":
            entries = _read_json_prompts(path, text)
        else:
            entries = _read_text_prompts(text)
        if not entries:
            raise DataError(
                f"{path}: the file holds no prompt; expected "
                + ("a non-empty JSON list." if path.suffix.lower() == ".json"
                   else "one prompt per line (blank and '#' lines are skipped).")
            )
        prompts: list[CandidatePrompt] = []
        first_line: dict[str, int] = {}
        for line, prompt_text, group in entries:
            if not prompt_text.strip():
                raise DataError(f"{path}, line {line}: empty prompt text; remove the entry or fill it.")
            if group not in PROMPT_GROUPS:
                raise DataError(
                    f"{path}, line {line}: unknown group {group!r}; expected one of "
                    f"{list(PROMPT_GROUPS)}." + _suggest(str(group), PROMPT_GROUPS)
                )
            if prompt_text in first_line:
                raise DataError(
                    f"{path}, line {line}: duplicate prompt {prompt_text!r} (first on line "
                    f"{first_line[prompt_text]}); prompt texts must be unique."
                )
            first_line[prompt_text] = line
            prompts.append(CandidatePrompt(prompt_text, group))  # type: ignore[arg-type]
        return cls(tuple(prompts))


def _read_text_prompts(text: str) -> list[tuple[int, str, str]]:
    out = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append((lineno, line, "custom"))
    return out


def _read_json_prompts(path: Path, text: str) -> list[tuple[int, str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}, line {e.lineno}: invalid JSON ({e.msg}); expected a list of strings or of "
            '{"text": ..., "group": ...} objects.'
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}, line 1: expected a JSON list of prompts, got a {type(data).__name__}; "
            'write ["Let\'s think step by step.", ...].'
        )
    lines = _json_array_item_lines(text)
    out = []
    for i, item in enumerate(data):
        line = lines[i] if i < len(lines) else 1
        if isinstance(item, str):
            out.append((line, item, "custom"))
        elif isinstance(item, dict):
            unknown = set(item) - {"text", "group"}
            if "text" not in item or not isinstance(item["text"], str):
                raise DataError(
                    f"{path}, line {line}: item {i} needs a string field 'text', got {item!r}."
                )
            if unknown:
                raise DataError(
                    f"{path}, line {line}: item {i} has unknown field(s) {sorted(unknown)}; "
                    "allowed fields are 'text' and 'group'."
                )
            out.append((line, item["text"], item.get("group", "custom")))
        else:
            raise DataError(
                f"{path}, line {line}: item {i} is a {type(item).__name__} ({item!r}); expected a "
                'string or a {"text": ..., "group": ...} object.'
            )
    return out


def _json_array_item_lines(text: str) -> list[int]:
    """Line numbers (1-based) where each item of a top-level JSON array starts.

    Only called on text that already parsed as a JSON list, so the walk cannot fail.
    """
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    lines: list[int] = []
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = dec.raw_decode(text, pos)
