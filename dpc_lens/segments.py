"""Named token spans per example, and the padded embedding batch built from them.

A :class:`SegmentLayout` says which positions of one example belong to which named segment
(``soft``, ``bos``, ``question``, ``prompt``, ``rationale``, ``answer``, or any user name).
It is built from text pieces through the tokenizer (:func:`encode_pieces`; each piece is
tokenised on its own, so boundaries are exact — include the leading space a BPE model expects)
or directly from spans, and validated: names unique, spans inside the sequence, no overlap,
non-empty where required.

:class:`PromptBatch` turns a list of tokenised examples plus an optional soft prompt into the
model input. Layout per row: ``[pad ...][soft][tokens]`` with the mask 0 on pads and
``position_ids = cumsum(mask) - 1``. An unpadded row is exactly PEFT's layout (soft first,
mask of ones, positions 0..P+T-1), so PEFT parity holds. For left-padded batches dpc_lens puts
the padding *before* the soft prompt ("adjacent" layout), whereas PEFT gives
``[soft][pad ...][text]`` with default positions: dpc_lens's choice makes every row of a batch
compute exactly what it computes alone (the pads are masked and do not shift positions), which
is what batched saliency needs. Segment spans in a batch are in padded coordinates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._typing import Float, Int, Tensor
from .errors import InputError

__all__ = ["SegmentLayout", "PromptBatch", "encode_pieces", "SOFT"]

SOFT = "soft"

Piece = tuple[str, "str | Sequence[int]"]


@dataclass(frozen=True)
class SegmentLayout:
    """Ordered named half-open spans ``name -> (start, end)`` over a sequence of ``length``."""

    spans: Mapping[str, tuple[int, int]]
    length: int
    required: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        spans = {str(k): (int(v[0]), int(v[1])) for k, v in dict(self.spans).items()}
        object.__setattr__(self, "spans", spans)
        if self.length < 0:
            raise InputError(f"Sequence length must be >= 0, got {self.length}.")
        for name, (s, e) in spans.items():
            if s < 0 or e > self.length or s > e:
                raise InputError(
                    f"Segment {name!r} span ({s}, {e}) lies outside the sequence of length "
                    f"{self.length}; spans are half-open (start, end) with 0 <= start <= end <= length."
                )
        ordered = sorted((s, e, n) for n, (s, e) in spans.items() if e > s)
        for (s1, e1, n1), (s2, e2, n2) in zip(ordered, ordered[1:]):
            if s2 < e1:
                raise InputError(
                    f"Segments {n1!r} ({s1}, {e1}) and {n2!r} ({s2}, {e2}) overlap; every token "
                    "belongs to at most one segment."
                )
        for name in self.required:
            if name not in spans:
                raise InputError(
                    f"Segment {name!r} is required but missing; the layout has {list(spans)}."
                )
            s, e = spans[name]
            if e <= s:
                raise InputError(
                    f"Segment {name!r} is empty; it must hold at least one token (for a rationale: "
                    "generate one first, or give the text)."
                )

    @property
    def names(self) -> list[str]:
        return list(self.spans)

    def span(self, name: str) -> tuple[int, int]:
        if name not in self.spans:
            raise InputError(f"Unknown segment {name!r}; this layout has {list(self.spans)}.")
        return self.spans[name]

    def positions(self, name: str) -> range:
        s, e = self.span(name)
        return range(s, e)

    def shifted(self, offset: int, length: int | None = None) -> "SegmentLayout":
        """The same spans moved right by ``offset`` (e.g. after left padding)."""
        return SegmentLayout(
            {n: (s + offset, e + offset) for n, (s, e) in self.spans.items()},
            self.length + offset if length is None else length,
            self.required,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"spans": {n: list(v) for n, v in self.spans.items()}, "length": self.length}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SegmentLayout":
        from .errors import DataError
        from .validate import check_keys

        check_keys(d, ["spans", "length"], "A saved SegmentLayout", required=["spans", "length"],
                   error=DataError)
        return cls({n: tuple(v) for n, v in d["spans"].items()}, int(d["length"]))


def encode_pieces(tokenizer: Any, pieces: Iterable[Piece]) -> tuple[list[int], SegmentLayout]:
    """Tokenise named pieces one by one and concatenate: ``(token_ids, layout)``.

    Each piece is ``(name, text)`` or ``(name, token_ids)``; texts are tokenised without special
    tokens. Use ``("bos", [tokenizer.bos_token_id])`` for a BOS segment. Names must be unique.
    """
    ids: list[int] = []
    spans: dict[str, tuple[int, int]] = {}
    if isinstance(pieces, (str, bytes)) or not isinstance(pieces, Iterable):
        raise InputError(
            f"pieces must be a list of (name, text or token ids) pairs, got {type(pieces).__name__}. "
            "Example: [('bos', [tok.bos_token_id]), ('question', 'how many ...')]."
        )
    for item in pieces:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise InputError(
                f"Each piece must be a (name, text or token ids) pair, got {item!r}. If you passed "
                "one example's pieces to PromptBatch.from_pieces, wrap them in an outer list (one "
                "list of pieces per example): [[('bos', [1]), ('question', '...')]]."
            )
        name, piece = item
        if name in spans or name == SOFT:
            raise InputError(
                f"Segment name {name!r} is used twice (or is the reserved soft-prompt name "
                f"{SOFT!r}); give each piece its own name."
            )
        if isinstance(piece, str):
            if tokenizer is None:
                raise InputError("Text pieces need a tokenizer; pass token ids instead.")
            toks = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
            _warn_if_all_unknown(tokenizer, name, piece, toks)
        elif isinstance(piece, (list, tuple)) or (isinstance(piece, torch.Tensor) and piece.dim() == 1):
            toks = [int(t) for t in piece]
            if isinstance(piece, (list, tuple)) and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in piece
            ):
                raise InputError(f"Piece {name!r}: token ids must be ints, got {list(piece)[:8]!r}.")
        else:
            raise InputError(
                f"Piece {name!r} is a {type(piece).__name__} ({piece!r:.40}); expected text (str) or a "
                f"list of token ids. For one token write [{piece!r:.20}], e.g. ('bos', [tok.bos_token_id])."
            )
        spans[name] = (len(ids), len(ids) + len(toks))
        ids.extend(toks)
    return ids, SegmentLayout(spans, len(ids))


@dataclass(frozen=True, eq=False)
class PromptBatch:
    """A left-padded model input with its segment layouts (see the module docstring).

    Attributes:
        embeds: ``[batch, pos, d_model]`` input embeddings, soft prompt included.
        attention_mask: ``[batch, pos]`` 1 on real positions (soft and tokens), 0 on pads.
        position_ids: ``[batch, pos]`` ``cumsum(mask) - 1`` on real positions, 0 on pads.
        token_ids: ``[batch, pos]`` token ids; -1 on soft positions, the pad id on pads.
        layouts: per example, the segments in padded coordinates (``soft`` included).
        pad_lengths: per example, the number of pad positions on the left.
        n_soft: soft-prompt length (0 without one).
    """

    embeds: Float[Tensor, "batch pos d_model"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    token_ids: Int[Tensor, "batch pos"]
    layouts: tuple[SegmentLayout, ...]
    pad_lengths: tuple[int, ...]
    n_soft: int

    def __repr__(self) -> str:
        names: list[str] = []
        for lay in self.layouts:
            names.extend(n for n in lay.spans if n not in names)
        return (f"PromptBatch(batch={self.batch_size}, pos={self.seq_len}, "
                f"d_model={int(self.embeds.shape[-1])}, n_soft={self.n_soft}, segments={names}, "
                f"pads={list(self.pad_lengths)}, dtype={self.embeds.dtype}, device={self.embeds.device})")

    @property
    def batch_size(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.embeds.shape[1])

    def segment_masks(self, names: Sequence[str]) -> Float[Tensor, "batch segment pos"]:
        """1.0 where position ``p`` of example ``b`` is in segment ``names[n]`` (absent: all 0)."""
        m = torch.zeros(self.batch_size, len(names), self.seq_len, device=self.embeds.device)
        for b, lay in enumerate(self.layouts):
            for n, name in enumerate(names):
                if name in lay.spans:
                    s, e = lay.spans[name]
                    m[b, n, s:e] = 1.0
        return m

    def union_mask(self, names: Sequence[str]) -> Float[Tensor, "batch pos"]:
        return self.segment_masks(names).sum(1).clamp(max=1.0)

    @classmethod
    def build(
        cls,
        adapter: Any,
        sequences: Sequence[Sequence[int]],
        layouts: Sequence[SegmentLayout],
        soft: Any = None,
        *,
        soft_name: str = SOFT,
    ) -> "PromptBatch":
        """Build the padded input for ``sequences`` (token ids per example) with ``soft`` first.

        ``adapter``: the model (bridge, HookedTransformer) or its ``ModelAdapter``.

        ``soft`` is a :class:`~dpc_lens.soft_prompt.SoftPrompt`, a ``[P, d_model]`` tensor (kept in
        the autograd graph, for prompt tuning), a list of either (one per example, same ``P``:
        e.g. differently corrupted prompts regenerated together), or ``None``. Raises
        :class:`InputError` when a row is empty or longer than the model's context.
        """
        from .model import as_adapter  # any model the user holds: bridge, HookedTransformer, adapter

        adapter = as_adapter(adapter)
        if len(sequences) == 0:
            raise InputError("An empty batch: give at least one example.")
        if len(sequences) != len(layouts):
            raise InputError(f"{len(sequences)} sequences but {len(layouts)} layouts.")
        if isinstance(soft, (list, tuple)):
            if len(soft) != len(sequences):
                raise InputError(
                    f"Per-example soft prompts: got {len(soft)} for {len(sequences)} examples."
                )
            soft_rows = [_soft_tensor(adapter, s) for s in soft]
            if len({int(s.shape[0]) for s in soft_rows}) != 1:
                raise InputError("Per-example soft prompts must all have the same number of tokens.")
        else:
            one = _soft_tensor(adapter, soft) if soft is not None else None
            soft_rows = [one] * len(sequences) if one is not None else None
        n_soft = 0 if soft_rows is None else int(soft_rows[0].shape[0])
        lengths = [len(s) + n_soft for s in sequences]
        vocab = _vocab_size(adapter)
        for i, (seq, lay) in enumerate(zip(sequences, layouts)):
            bad = [int(t) for t in seq if not 0 <= int(t) < vocab] if vocab else []
            if bad:
                raise InputError(
                    f"Example {i} holds token id(s) {bad[:5]} outside the model's vocabulary "
                    f"(0..{vocab - 1}). Encode the text with this model's tokenizer, or check the "
                    "ids came from the same tokenizer."
                )
            if len(seq) == 0 and n_soft == 0:
                raise InputError(f"Example {i} has no tokens; give each example some text.")
            if lay.length != len(seq):
                raise InputError(
                    f"Example {i}: its layout covers {lay.length} tokens but the sequence has "
                    f"{len(seq)}; build both with encode_pieces."
                )
        T = max(lengths)
        if adapter.n_ctx is not None and T > adapter.n_ctx:
            worst = max(range(len(lengths)), key=lengths.__getitem__)
            raise InputError(
                f"Example {worst} is {T} positions long (soft prompt {n_soft} + {T - n_soft} "
                f"tokens) but the model's context is n_ctx={adapter.n_ctx}. Shorten the text "
                "(or max_new_tokens), or use a model with a longer context."
            )
        pad_id = adapter.pad_token_id()
        B = len(sequences)
        dev = adapter.device
        tok = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros(B, T, dtype=torch.long, device=dev)
        pads: list[int] = []
        new_layouts: list[SegmentLayout] = []
        for b, (seq, lay) in enumerate(zip(sequences, layouts)):
            pad = T - lengths[b]
            pads.append(pad)
            if len(seq):
                tok[b, pad + n_soft:] = torch.as_tensor(list(seq), dtype=torch.long, device=dev)
            mask[b, pad:] = 1
            spans = {}
            if n_soft:
                spans[soft_name] = (pad, pad + n_soft)
            for name, (s, e) in lay.spans.items():
                spans[name] = (s + pad + n_soft, e + pad + n_soft)
            new_layouts.append(SegmentLayout(spans, T, lay.required))
        embeds = adapter.embed_tokens(tok)
        if n_soft:
            rows = []
            for b in range(B):
                p = pads[b]
                rows.append(torch.cat([embeds[b, :p], soft_rows[b], embeds[b, p + n_soft:]], dim=0))
            embeds = torch.stack(rows)
            for b in range(B):
                tok[b, pads[b]:pads[b] + n_soft] = -1
        pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
        return cls(embeds, mask, pos, tok, tuple(new_layouts), tuple(pads), n_soft)

    @classmethod
    def from_pieces(
        cls,
        adapter: Any,
        examples: Sequence[Iterable[Piece]],
        soft: Any = None,
        *,
        required: Sequence[str] = (),
    ) -> "PromptBatch":
        """Tokenise each example's named pieces and build the batch (see :func:`encode_pieces`).

        ``adapter`` is the model as the user holds it (a ``TransformerBridge``, a
        ``HookedTransformer``) or its :class:`~dpc_lens.model.ModelAdapter`."""
        from .model import as_adapter

        adapter = as_adapter(adapter)
        seqs, lays = [], []
        for pieces in examples:
            ids, lay = encode_pieces(adapter.tokenizer, pieces)
            seqs.append(ids)
            lays.append(SegmentLayout(lay.spans, lay.length, tuple(required)))
        return cls.build(adapter, seqs, lays, soft)


def _warn_if_all_unknown(tokenizer: Any, name: str, text: str, toks: Sequence[int]) -> None:
    """Text whose every token is the tokenizer's ``<unk>`` carries nothing of its words: say so."""
    import warnings

    from .errors import DpcLensWarning

    unk = getattr(tokenizer, "unk_token_id", None)
    if toks and unk is not None and all(int(t) == int(unk) for t in toks):
        warnings.warn(
            f"Piece {name!r} ({text[:40]!r}) tokenizes to {len(toks)} unknown token(s) (<unk>) "
            "only: the model sees none of its words. Check the text uses this tokenizer's "
            "alphabet (or the right tokenizer is loaded).", DpcLensWarning, stacklevel=4)


def _vocab_size(adapter: Any) -> int | None:
    try:
        return int(adapter.embedding_weight.shape[0])
    except Exception:  # an adapter without an embedding matrix: nothing to check against
        return None


def _soft_tensor(adapter: Any, soft: Any) -> Tensor:
    """``soft`` as a ``[P, d_model]`` tensor on the model's device and dtype, validated."""
    from .soft_prompt import SoftPrompt

    if isinstance(soft, SoftPrompt):
        return soft.for_model(adapter)
    if isinstance(soft, torch.Tensor):
        SoftPrompt(soft.detach()).for_model(adapter)  # validates shape, values and width
        return soft.to(device=adapter.device, dtype=adapter.dtype)  # keeps the autograd graph
    raise InputError(
        f"soft must be a SoftPrompt, a [P, d_model] tensor, a list of them, or None; got "
        f"{type(soft).__name__}."
    )
