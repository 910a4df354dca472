"""IAP's per-pair record, typed: :class:`PairRecord`, one (question, prompt) pair generated and
scored once; its JSON (plus the example and the graded answer) is a line of ``pairs.jsonl``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from dpc_lens.errors import DataError

__all__ = ["PairRecord"]


@dataclass(frozen=True)
class PairRecord:
    """One (question, prompt) pair, generated and scored once.

    Attributes:
        question_index, prompt_index: positions in the question list and the pool.
        prompt, group: the prompt's text and group.
        rationale: the generated text; ``rationale_ids`` its token ids (no EOS).
        stop_reason: why generation stopped.
        flows: flow name -> per-layer mean flow ``flow_l(source->target)`` (all layers, in
            ``layers`` order); ``{}`` when the rationale is empty (nothing to measure).
        flow_means: flow name -> mean of ``flows`` over the config's layer set of that flow
            (the value that is standardised); ``{}`` when unscored.
        layer_sets: flow name -> the layer indices averaged.
        flows_per_head: flow name -> ``[layer][head]`` flows (``per_head`` runs only).
        n_tokens: tokens per segment and in total.
        loss: the teacher-forced mean NLL of the rationale (the saliency loss).
        chat_template: whether the input went through the tokenizer's chat template.
        id, question, gold, answer, correct: what a ``pairs.jsonl`` line adds to the pair (the
            example and the graded answer); ``None`` on a pair :func:`score_pairs` returned.
    """

    question_index: int
    prompt_index: int
    prompt: str
    group: str
    rationale: str
    rationale_ids: tuple[int, ...]
    stop_reason: str
    flows: Mapping[str, list[float]]
    flow_means: Mapping[str, float]
    layer_sets: Mapping[str, list[int]]
    n_tokens: Mapping[str, int]
    loss: float | None
    chat_template: bool
    layers: tuple[int, ...] = ()
    flows_per_head: Mapping[str, list[list[float]]] | None = None
    id: Any = None
    question: str | None = None
    gold: str | None = None
    answer: str | None = None
    correct: bool | None = None

    @property
    def scored(self) -> bool:
        return bool(self.flow_means)

    def _repr_html_(self) -> str:
        """The pair as the run report shows it (prompt, rationale, answer, flows), for notebooks."""
        from ..plotting.html import fragment, iap_pair

        return fragment(iap_pair(self))

    def to_dict(self) -> dict[str, Any]:
        return {
            "question_index": self.question_index,
            "prompt_index": self.prompt_index,
            "prompt": self.prompt,
            "group": self.group,
            "rationale": self.rationale,
            "rationale_ids": list(self.rationale_ids),
            "stop_reason": self.stop_reason,
            "flows": {k: list(v) for k, v in self.flows.items()},
            "flow_means": dict(self.flow_means),
            "layer_sets": {k: list(v) for k, v in self.layer_sets.items()},
            "layers": list(self.layers),
            "n_tokens": dict(self.n_tokens),
            "loss": self.loss,
            "chat_template": self.chat_template,
            "flows_per_head": self.flows_per_head,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | PairRecord) -> PairRecord:
        """A pair from :meth:`to_dict`'s JSON or from a line of ``pairs.jsonl`` (which has no
        ``question_index``: it is ``-1`` there, the line's ``id`` names the question, and its
        ``scored`` is recomputed). An unknown or misspelt key raises
        :class:`~dpc_lens.errors.DataError` naming it."""
        if isinstance(d, PairRecord):
            return d
        if not isinstance(d, Mapping):
            raise DataError(f"an IAP pair is a {type(d).__name__}; expected a JSON object (a dict).")
        known = [f.name for f in fields(cls)] + ["scored"]
        extra = [k for k in d if k not in known]
        if extra:
            close = difflib.get_close_matches(str(extra[0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"IAP pair {d.get('id', d.get('question_index'))!r} has an unknown key "
                            f"{extra[0]!r}{hint}; its keys are {known}.")
        missing = [f.name for f in fields(cls)
                   if f.default is MISSING and f.name != "question_index" and f.name not in d]
        if missing:
            raise DataError(f"IAP pair {d.get('id', d.get('question_index'))!r} has no {missing}.")
        kw = {k: v for k, v in d.items() if k != "scored"}
        kw.setdefault("question_index", -1)
        kw["rationale_ids"] = tuple(int(t) for t in kw["rationale_ids"])
        kw["layers"] = tuple(int(x) for x in kw.get("layers", ()))
        return cls(**kw)
