"""The blockwise saliency engine (``SaliencyConfig(memory="blockwise")``): saliency from q, k, v
and dz, block by block over query rows, without a ``T x T`` pattern (docs/blockwise.md).

For one layer, with the post-rotary query ``q_i``, key ``k_j`` and value ``v_j`` (shared across a
group under GQA), scale ``s``, additive mask ``M`` (causal, padding, sliding window) and softcap
``c`` where the architecture has one::

    A_ij = softmax_j(c tanh(s q_i.k_j / c) + M_ij),  z_i = sum_j A_ij v_j,  dL/dA_ij = dz_i . v_j
    I(i, j) = | sum_h A^h_ij (dz^h_i . v^h_j) |

During the pass the model's own attention function is replaced, layer by layer, by
:class:`_BlockwiseAttention`, which receives exactly what the model's eager attention receives
(q and k after the rotary embedding, v, the layer's own mask — a sliding window for Gemma 3's
sliding layers, the full causal mask for its global ones — the scale and the softcap). Its forward
computes ``z`` a block of query rows at a time (op for op, as the model's eager attention does) and keeps
only q, k, v. Its backward recomputes each block with the model's own operations under autograd
(activation checkpointing per block), takes ``dq, dk, dv`` and ``dL/dA`` for the block, and
reduces ``A * dL/dA`` at once into what the config asks for. Memory is linear in ``T`` apart from
one block's ``[batch, head, Bq, T]`` (and the ``[batch, 1, T, T]`` mask the model itself builds
for eager attention); only ``keep_full=True`` holds ``T x T`` per layer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import flows as F
from .._typing import Tensor
from ..errors import ConfigError, InputError, SaliencyError
from ..model import frozen_for_saliency
from ..segments import PromptBatch
from .capture import SaliencyStore, _checkpointed_blocks  # the lean mode's per-block checkpointing
from .config import SaliencyConfig, scored_positions, target_nll

__all__ = ["activation_bytes", "blockwise_supported", "checkpoint_blocks", "compute_blockwise",
           "default_block_size", "lean_mode_bytes"]

# Hugging Face attention classes whose eager attention is ``softmax(s q.k^T [softcap] + mask)``
# with no other term, the function this engine reproduces; the value says whether the softmax
# runs in float32 (``softmax(..., dtype=float32).to(q.dtype)``) or in q's dtype.
_KNOWN_HF_ATTENTION = {
    "GPT2Attention": False,
    "LlamaAttention": True,
    "MistralAttention": True,
    "Qwen2Attention": True,
    "OPTAttention": True,
    "Gemma3Attention": True,
    "Gemma2Attention": True,
}
# keyword arguments of the attention call that change the function (attention sinks, ALiBi or a
# position bias): refused rather than ignored
_UNKNOWN_TERMS = ("s_aux", "sinks", "alibi", "position_bias", "attention_bias", "head_mask")
_CALL_KNOWN = ("dropout", "scaling", "softcap", "sliding_window", "position_ids", "cache_position",
               "is_causal", "output_attentions", "use_cache", "past_key_values", "cache",
               "layer_idx", "position_embeddings")


def _fallback(what: str) -> str:
    return (f"{what} Use the eager engine instead: SaliencyConfig(memory='normal') (every layer's "
            "pattern kept) or memory='lean' (one layer's pattern at a time, recomputed).")


def _hf_attention_modules(adapter: Any) -> list[Any]:
    """The Hugging Face attention module inside each block's attention bridge (raises when the
    architecture's attention is not one this engine reproduces exactly)."""
    if adapter.family != "bridge":
        raise SaliencyError(_fallback(
            "memory='blockwise' needs a TransformerBridge over a Hugging Face model; this is a "
            f"{adapter.family} model."))
    mods = []
    for l, block in enumerate(adapter.model.blocks):
        bridge = getattr(block, "attn", None)
        hf = getattr(bridge, "original_component", None)
        name = type(hf).__name__
        in_hf = type(hf).__module__.split(".")[:2] == ["transformers", "models"]
        if name not in _KNOWN_HF_ATTENTION or not in_hf:
            raise SaliencyError(_fallback(
                f"memory='blockwise' cannot reproduce the attention of layer {l} ({name}, in a "
                f"{type(adapter.model).__name__}) exactly: it knows the eager attention of "
                f"{sorted(_KNOWN_HF_ATTENTION)} (softmax of scaled q.k plus mask, with softcap)."))
        if getattr(hf, "reorder_and_upcast_attn", False) or getattr(hf, "sinks", None) is not None:
            raise SaliencyError(_fallback(
                f"memory='blockwise' does not reproduce {name} with reorder_and_upcast_attn or "
                "attention sinks."))
        if getattr(getattr(hf, "config", None), "_attn_implementation", "eager") != "eager":
            raise SaliencyError(_fallback(
                f"Layer {l}'s attention runs {hf.config._attn_implementation!r}; blockwise "
                "replaces the eager function, so load the model with eager attention "
                "(dpc_lens.load_model does)."))
        mods.append((bridge, hf))
    return mods


def blockwise_supported(adapter: Any) -> bool:
    """Whether :func:`compute_blockwise` can reproduce this model's attention exactly."""
    try:
        _hf_attention_modules(adapter)
    except SaliencyError:
        return False
    return True


def lean_mode_bytes(adapter: Any, batch: PromptBatch) -> int:
    """Estimated attention memory of the lean mode: one layer's three ``[batch, head, T, T]``
    tensors (scores, pattern, saved pattern) at the model's element size."""
    T = batch.seq_len
    elt = torch.finfo(adapter.dtype).bits // 8
    return 3 * batch.batch_size * adapter.n_heads * T * T * elt


def default_block_size(adapter: Any, batch: PromptBatch, free: int | None) -> int:
    """Query rows per block: about six ``[batch, head, Bq, T]`` float32 work tensors are alive
    per block; they get 5% of the free memory of the model's device (at most 512 MiB, 256 MiB
    when the free memory is unknown), rounded down to a multiple of 16, between 16 and T, and at
    most 256 rows, so that the causal column skipping saves most of the masked half (a block of
    ``Bq`` rows sees about ``Bq / 2`` columns it need not)."""
    T = batch.seq_len
    budget = min(512 << 20, int(0.05 * free)) if free else 256 << 20
    per_row = 6 * batch.batch_size * adapter.n_heads * T * 4
    bq = max(16, (budget // max(per_row, 1)) // 16 * 16)
    return int(min(T, bq, 256))


# --------------------------------------------------------------------------- the attention
# The forward's z through SDPA where that is mathematically the same function. Off: on CPU,
# torch's fused SDPA kernel differs from the eager ops by up to 4.6e-4 of a layer's largest
# saliency entry on SmolLM2 (the differences reach dz through 30 layers), while op-for-op blocks
# give 3e-6 (block 8) and 0 (one block) — exactness is the point of this engine.
_USE_SDPA = False

def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``[B, KV, T, D] -> [B, KV * groups, T, D]``, head ``h`` using kv head ``h // groups``
    (Hugging Face's ``repeat_kv``)."""
    if groups == 1:
        return x
    B, KV, T, D = x.shape
    return x[:, :, None].expand(B, KV, groups, T, D).reshape(B, KV * groups, T, D)


def _scores(qb: Tensor, k: Tensor, scaling: float, softcap: float | None,
            slope: bool = False) -> tuple[Tensor, Tensor | None]:
    """The model's scores ``s q.k`` (through the softcap where it has one), op for op, and with
    ``slope`` the softcap's derivative ``1 - tanh^2(x / c)`` (``None`` without a softcap)."""
    s = torch.matmul(qb, k.transpose(-1, -2)) * scaling
    if softcap is None:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, (1 - t * t) if slope else None


def _softmax(s: Tensor, sm_fp32: bool, dtype: torch.dtype) -> Tensor:
    if sm_fp32:
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype)
    return torch.softmax(s, dim=-1)


def _block_probs(qb: Tensor, k: Tensor, mask_b: Tensor | None, scaling: float,
                 softcap: float | None, sm_fp32: bool) -> Tensor:
    """The model's eager attention weights for one block of query rows, op for op."""
    s, _ = _scores(qb, k, scaling, softcap)
    return _softmax(s if mask_b is None else s + mask_b, sm_fp32, qb.dtype)


# Work only on the key columns a block can see: about half the attention work under a causal
# mask (FlashAttention's block skipping). Every skipped weight is exactly 0 (the mask there is
# finfo.min for every row of the block). The kept columns are a prefix whose end is rounded up to
# a multiple of _SPAN_ALIGN, so the float32 softmax and its backward reduce the kept entries in
# the same vector lanes as over the full row (the skipped terms add exact zeros): without the
# alignment, short unaligned rows moved SmolLM2's saliency 1.4e-5 of a layer's largest entry and
# float64 Llama-family models (float32 softmax) ~1e-8 from the eager engine; with it, results
# match as without skipping (tested at T = 300 against 1e-10 in float64).
_SKIP_MASKED_COLUMNS = True
_SPAN_ALIGN = 64
# float32 blocks (and float64 ones whose softmax runs in float64): the backward by hand
# (dL/dA = dz v^T, the softmax backward from the same A * dL/dA the saliency reads, no
# recomputed z), 7 matmuls a block as in FlashAttention's forward + backward. Otherwise (half
# precision, or a float32 softmax inside a float64 model, whose backward autograd runs in
# float32) the model's ops under autograd (8 matmuls), so every cast rounds as in the eager engine.
_MANUAL_BACKWARD = True


def _key_span(mb: Tensor | None, T: int) -> tuple[int, int]:
    """The columns ``[c0, c1)`` a block of query rows can see: outside them the model's mask is
    ``finfo.min`` for every row of the block, so their attention weight is exactly 0 (``exp`` of
    about ``-3.4e38`` underflows to 0) and so is everything they contribute (z, dL/dA * A, dq,
    dk, dv, saliency). The causal triangle, a sliding window and left padding all shrink it.
    A block holding a fully masked row (whose softmax is uniform over every column) keeps all."""
    if mb is None or not _SKIP_MASKED_COLUMNS:
        return 0, T
    masked = mb == torch.finfo(mb.dtype).min
    if bool(masked.all(-1).any()):
        return 0, T
    seen = (~masked).flatten(0, -2).any(0).nonzero().flatten()
    if _SPAN_ALIGN:  # a prefix, its end rounded up: the kept columns reduce in the eager order
        return 0, min(T, -(-(int(seen[-1]) + 1) // _SPAN_ALIGN) * _SPAN_ALIGN)
    return int(seen[0]), int(seen[-1]) + 1


class _BlockwiseAttention(torch.autograd.Function):
    """``z = softmax(s q k^T [+ softcap] + M) v`` keeping only q, k, v; the backward recomputes
    one block of query rows at a time and hands ``(A, dL/dA)`` of the block to ``sink``. Each
    block works only on the key columns its mask lets it see (:func:`_key_span`)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                softcap: float | None, sm_fp32: bool, block: int,
                sink: Callable[[Tensor, Tensor, int, int, int, int], None] | None) -> Tensor:
        B, H, T, D = q.shape
        g = H // k.shape[1]
        ke, ve = _repeat_kv(k, g), _repeat_kv(v, g)
        out = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
        # SDPA is the same function when the softmax runs in q's dtype and nothing else enters
        sdpa = _USE_SDPA and softcap is None and (not sm_fp32 or q.dtype == torch.float32) and \
            q.dtype in (torch.float32, torch.float64)
        spans = []
        for r0 in range(0, T, block):
            r1 = min(T, r0 + block)
            mb = None if mask is None else mask[:, :, r0:r1]
            c0, c1 = _key_span(mb, T)
            spans.append((r0, r1, c0, c1))
            if sdpa:
                mb = None if mb is None else mb[..., c0:c1]
                out[:, :, r0:r1] = torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, r0:r1], ke[:, :, c0:c1], ve[:, :, c0:c1], attn_mask=mb, scale=scaling)
                continue
            # The forward's z must be the model's to the last bit: an ulp-level change in z,
            # carried forward through 18 layers, moved Gemma 3 270M's saliency (T = 779,
            # 128-row blocks) 2.5e-4 of a layer's largest entry from the eager engine. Skipping
            # the masked columns in A v (a shorter inner dimension: the BLAS kernel sums it in
            # another order) did that; so A v runs over every column and the softmax over the
            # full row, as in the model (2.4e-6, as without skipping). Only the scores q.k skip
            # the masked columns: there the model's score is s q.k + finfo.min, which is the
            # mask value exactly (|s q.k| is far below half an ulp of finfo.min). The backward
            # skips them throughout (its rounding is not carried forward).
            full = mb is not None and c1 < T
            if not full:
                c0, c1 = 0, T
            for h0, h1 in _head_chunks(B, H, r1 - r0, T if full else c1, q.element_size()):
                qb = q[:, h0:h1, r0:r1]
                if full:
                    A = _block_probs_padded(qb, ke[:, h0:h1, :c1], mb, scaling, softcap, sm_fp32)
                else:
                    A = _block_probs(qb, ke[:, h0:h1], mb, scaling, softcap, sm_fp32)
                out[:, h0:h1, r0:r1] = torch.matmul(A, ve[:, h0:h1])  # over every column (below)
                del A
        ctx.save_for_backward(q, k, v)
        ctx.mask = mask
        ctx.args = (scaling, softcap, sm_fp32, spans, sink)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> Any:
        q, k, v = ctx.saved_tensors
        mask = ctx.mask
        scaling, softcap, sm_fp32, spans, sink = ctx.args
        B, H, T, D = q.shape
        KV = k.shape[1]
        g = H // KV
        dq = torch.zeros_like(q)
        dke = torch.zeros(B, H, T, k.shape[-1], dtype=k.dtype, device=k.device)
        dve = torch.zeros(B, H, T, v.shape[-1], dtype=v.dtype, device=v.device)
        ke_all, ve_all = _repeat_kv(k.detach(), g), _repeat_kv(v.detach(), g)
        if _MANUAL_BACKWARD and (q.dtype == torch.float32 or (q.dtype == torch.float64 and not sm_fp32)):
            per_head = bool(getattr(getattr(sink, "config", None), "per_head", False))
            for r0, r1, c0, c1 in spans:
                mb = None if mask is None else mask[:, :, r0:r1, c0:c1]
                heads = _head_chunks(B, H, r1 - r0, c1 - c0, q.element_size())
                # the saliency term A * dL/dA, summed over the heads as they go (or kept per head)
                P_all = None
                for h0, h1 in heads:
                    qb, kb = q[:, h0:h1, r0:r1].detach(), ke_all[:, h0:h1, c0:c1]
                    vb, db = ve_all[:, h0:h1, c0:c1], dout[:, h0:h1, r0:r1]
                    A, dA_ds = _block_probs_and_slope(qb, kb, mb, scaling, softcap, sm_fp32)
                    gA = torch.matmul(db, vb.transpose(-1, -2))  # dL/dA = dz . v
                    dve[:, h0:h1, c0:c1] += torch.matmul(A.transpose(-1, -2), db)
                    P = A * gA  # the saliency's per-head term, and the softmax backward's
                    dS = torch.addcmul(P, A, P.sum(-1, keepdim=True), value=-1)  # A (gA - sum A gA)
                    del A, gA
                    if dA_ds is not None:
                        dS.mul_(dA_ds)
                    # the scale on the [Bq, D] and [Tc, D] products, not on the [Bq, Tc] block
                    dq[:, h0:h1, r0:r1] = torch.matmul(dS, kb).mul_(scaling)
                    dke[:, h0:h1, c0:c1].add_(torch.matmul(dS.transpose(-1, -2), qb), alpha=scaling)
                    del dS
                    if sink is None:
                        continue
                    if per_head:
                        if P_all is None:
                            P_all = P.new_empty(B, H, r1 - r0, c1 - c0)
                        P_all[:, h0:h1] = P
                    elif P_all is None:
                        P_all = P.sum(1)
                    else:
                        P_all += P.sum(1)
                    del P
                if sink is not None:
                    sink(None, None, r0, r1, c0, c1, product=P_all, heads_summed=not per_head)
                del P_all
        else:
            _autograd_blocks(q, ke_all, ve_all, mask, dout, spans, scaling, softcap, sm_fp32, sink,
                             dq, dke, dve)
        if g > 1:
            dk = dke.view(B, KV, g, T, -1).sum(2)
            dv = dve.view(B, KV, g, T, -1).sum(2)
        else:
            dk, dv = dke, dve
        return dq, dk, dv, None, None, None, None, None, None


#: bytes of one head chunk's ``[batch, heads, Bq, Tc]`` work tensor in the float32/float64
#: passes: small enough that the elementwise steps between the matmuls (scale, mask, softmax,
#: its backward, A * dL/dA) run in the core's cache instead of streaming through memory
_CHUNK_BYTES = 1 << 20


def _head_chunks(B: int, H: int, rows: int, cols: int, elt: int) -> list[tuple[int, int]]:
    """Head ranges ``[h0, h1)`` whose block tensor fits :data:`_CHUNK_BYTES` (at least one head)."""
    n = max(1, _CHUNK_BYTES // max(1, B * rows * cols * elt))
    return [(h, min(H, h + n)) for h in range(0, H, n)]


def _block_probs_padded(qb: Tensor, k: Tensor, mask_b: Tensor, scaling: float,
                        softcap: float | None, sm_fp32: bool) -> Tensor:
    """:func:`_block_probs` over the full row of ``mask_b`` (``[.., Bq, T]``) with the scores
    computed only for the first ``k.shape[-2]`` columns: beyond them the score is the mask value
    itself, as in the model (``s q.k + finfo.min == finfo.min``), so the softmax sees the row the
    model's eager attention sees."""
    c1 = k.shape[-2]
    s, _ = _scores(qb, k, scaling, softcap)
    full = mask_b.expand(*s.shape[:-1], mask_b.shape[-1]).clone()
    full[..., :c1] = s + mask_b[..., :c1]
    return _softmax(full, sm_fp32, qb.dtype)


def _block_probs_and_slope(qb: Tensor, k: Tensor, mask_b: Tensor | None, scaling: float,
                           softcap: float | None, sm_fp32: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`_block_probs` for float32/float64 blocks, and the softcap's slope
    ``d(c tanh(x / c))/dx = 1 - tanh^2(x / c)`` (``None`` without a softcap)."""
    s, slope = _scores(qb, k, scaling, softcap, slope=True)
    return _softmax(s if mask_b is None else s + mask_b, sm_fp32, qb.dtype), slope


def _autograd_blocks(q: Tensor, ke_all: Tensor, ve_all: Tensor, mask: Tensor | None, dout: Tensor,
                     spans: list[tuple[int, int, int, int]], scaling: float, softcap: float | None,
                     sm_fp32: bool, sink: Any, dq: Tensor, dke: Tensor, dve: Tensor) -> None:
    """The backward of blocks in half precision (or with a float32 softmax in a float64 model):
    the model's own ops under autograd, so every cast rounds as in the eager engine."""
    with torch.enable_grad():
        for r0, r1, c0, c1 in spans:
            qb = q[:, :, r0:r1].detach().requires_grad_(True)
            kb = ke_all[:, :, c0:c1].detach().requires_grad_(True)
            vb = ve_all[:, :, c0:c1].detach().requires_grad_(True)
            mb = None if mask is None else mask[:, :, r0:r1, c0:c1]
            A = _block_probs(qb, kb, mb, scaling, softcap, sm_fp32)
            zb = torch.matmul(A, vb)
            gq, gk, gv, gA = torch.autograd.grad(zb, (qb, kb, vb, A), dout[:, :, r0:r1])
            dq[:, :, r0:r1] = gq
            dke[:, :, c0:c1] += gk
            dve[:, :, c0:c1] += gv
            if sink is not None:
                sink(A.detach(), gA, r0, r1, c0, c1)
            del A, zb, gA, gk, gv


# --------------------------------------------------------------------------- reduction
class _LayerReducer:
    """Reduces one layer's row blocks of ``A * dL/dA`` into the keys the eager capture fills
    (``flow_sums``, ``row_sums``/``row_totals``, ``column_sums``/``column_shares``, ``full``),
    with :mod:`dpc_lens.flows`' own functions on each block."""

    def __init__(self, config: SaliencyConfig, seg: Tensor, targets: Tensor | None,
                 sources: Tensor | None) -> None:
        self.config = config
        self.seg, self.targets, self.sources = seg, targets, sources
        self.out: dict[str, Tensor] = {}

    def _acc(self, key: str, value: Tensor) -> None:
        if key in self.out:
            self.out[key] += value
        else:
            self.out[key] = value

    def _zeros(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if key not in self.out:
            self.out[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.out[key]

    def __call__(self, A: Tensor | None, gA: Tensor | None, r0: int, r1: int, c0: int, c1: int,
                 product: Tensor | None = None, heads_summed: bool = False) -> None:
        """One block: rows ``[r0, r1)``, the key columns ``[c0, c1)`` it can see (elsewhere
        its saliency is exactly 0). ``product``: ``A * gA`` where the caller has it already
        (float32/float64), per head ``[B, H, Bq, Tc]`` or, with ``heads_summed``, summed over
        the heads ``[B, Bq, Tc]``; the reducer may overwrite it."""
        cfg = self.config
        T = self.seg.shape[-1]
        if product is None:
            I = F.saliency_map(A, gA, per_head=cfg.per_head, signed=cfg.signed,
                               include_diagonal=True, fp32=cfg.fp32)
        else:
            I = product if (cfg.per_head or heads_summed) else product.sum(1)
            if not cfg.signed:
                I.abs_()
        if not cfg.include_diagonal:
            idx = torch.arange(max(r0, c0), min(r1, c1), device=I.device)
            I[..., idx - r0, idx - c0] = 0
        m = self.seg.to(device=I.device, dtype=I.dtype)
        rows, cols = m[..., r0:r1], m[..., c0:c1]
        if I.dim() == 4:
            rows, cols = rows.unsqueeze(1), cols.unsqueeze(1)
        self._acc("flow_sums", (rows @ I) @ cols.transpose(-1, -2))
        lead = I.shape[:-2]
        if self.sources is not None or self.targets is not None:
            total = F.row_totals(I)
        if self.sources is not None:
            src = self.sources.to(I.device)[:, c0:c1]
            self._zeros("row_sums", (*lead, T), I)[..., r0:r1] = F.row_scores(I, src)
            self._zeros("row_totals", (*lead, T), I)[..., r0:r1] = total
        if self.targets is not None:
            tm = self.targets.to(I.device)[:, r0:r1]
            self._zeros("column_sums", (*lead, T), I)[..., c0:c1] += F.column_scores(I, tm)
            self._zeros("column_shares", (*lead, T), I)[..., c0:c1] += F.column_scores(
                I, tm, row_normalize=True, row_total=total)
        if cfg.keep_full:
            self._zeros("full", (*lead, T, T), I)[..., r0:r1, c0:c1] = I


# --------------------------------------------------------------------------- the pass
@contextlib.contextmanager
def _blockwise_attention(adapter: Any, store: SaliencyStore, pass_: Any, block: int) -> Iterator[None]:
    """Within the block every attention bridge runs its Hugging Face attention module directly
    with the eager attention function replaced by :class:`_BlockwiseAttention`; instance
    attributes and module globals are restored on exit, also after an exception."""
    mods = _hf_attention_modules(adapter)
    layer_of = {id(hf): l for l, (_, hf) in enumerate(mods)}
    wanted = set(store.layers)
    m = pass_.masks

    def attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  softcap: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        layer = layer_of.get(id(module))
        extra = sorted(k for k in kwargs if k in _UNKNOWN_TERMS or (
            k not in _CALL_KNOWN and isinstance(kwargs[k], torch.Tensor)))
        if layer is None or extra or (dropout and module.training):
            raise SaliencyError(_fallback(
                f"memory='blockwise' met an attention call it cannot reproduce exactly "
                f"({type(module).__name__}, extra terms {extra}, dropout {dropout})."))
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
        if mask is not None and mask.dtype == torch.bool:
            raise SaliencyError(_fallback("memory='blockwise' got a boolean attention mask (an "
                                          "SDPA-style mask), where eager attention adds a float one."))
        sink = None
        if layer in wanted:
            # under block checkpointing this runs twice (forward, recompute in the backward);
            # only the recomputed call's backward runs, into the same reducer
            if layer not in pass_.reducers:
                pass_.reducers[layer] = _LayerReducer(store.config, m.seg, m.targets, m.sources)
                pass_.hooked.append(layer)
                pass_.on_graph.append(layer)
            sink = pass_.reducers[layer]
        out = _BlockwiseAttention.apply(query, key, value, mask, float(scaling), softcap,
                                        _KNOWN_HF_ATTENTION[type(module).__name__], block, sink)
        return out.transpose(1, 2).contiguous(), None

    patched_modules = {}
    for _, hf in mods:
        mod = sys.modules[type(hf).__module__]
        if hasattr(mod, "eager_attention_forward"):
            patched_modules[mod.__name__] = mod
    olds = {n: mod.eager_attention_forward for n, mod in patched_modules.items()}
    missing = [type(hf).__name__ for _, hf in mods if type(hf).__module__ not in patched_modules]
    if missing:
        raise SaliencyError(_fallback(f"memory='blockwise' found no eager attention function for {missing}."))
    bridges = [b for b, _ in mods]
    for b in bridges:
        if "forward" in b.__dict__:
            raise SaliencyError(_fallback(
                f"{type(b).__name__} already has an instance-level forward; blockwise will not "
                "stack a second one."))
    try:
        for mod in patched_modules.values():
            mod.eager_attention_forward = attention
        for b, hf in mods:
            object.__setattr__(b, "forward", _without_cache(hf.forward))
        yield
    finally:
        for b in bridges:
            b.__dict__.pop("forward", None)
        for n, mod in patched_modules.items():
            mod.eager_attention_forward = olds[n]


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _without_cache(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The attention forward without a KV cache: a saliency pass has no use for one, and the
    recomputation of a checkpointed block would append its keys a second time."""
    def run(*args: Any, **kwargs: Any) -> Any:
        for k in _CACHE_KWARGS:
            if kwargs.get(k) is not None:
                kwargs[k] = None
        return forward(*args, **kwargs)

    return run


# attention hooks of the bridge that do not fire when the Hugging Face attention runs directly
_SILENT_HOOKS = ("hook_pattern", "hook_attn_scores", "hook_rot_q", "hook_rot_k", "hook_q_normed",
                 "hook_k_normed", "hook_result", "hook_in", "hook_out", "hook_hidden_states",
                 "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_cos", "hook_sin")


def _check_caller_hooks(fwd_hooks: Sequence[tuple[Any, Any]]) -> None:
    for name, _ in fwd_hooks:
        if isinstance(name, str):
            parts = name.split(".")
            if len(parts) >= 4 and parts[0] == "blocks" and parts[2] == "attn" and parts[-1] in _SILENT_HOOKS:
                raise ConfigError(
                    f"Hook {name!r} does not fire in memory='blockwise' (the attention runs "
                    "without a pattern: only attn.hook_q/hook_k/hook_v/hook_z and the q/k/v/o "
                    "projections fire there). Use SaliencyConfig(memory='normal') or 'lean' for "
                    "hooks inside the attention.")
        elif callable(name):
            raise ConfigError("memory='blockwise' takes fwd_hooks by name only (a name filter "
                              "could select attention hooks that do not fire); use 'normal'/'lean'.")


def activation_bytes(adapter: Any, batch: PromptBatch) -> int:
    """Estimated activations a plain forward keeps for the backward outside the attention
    patterns: about 20 ``d_model``-wide vectors per token per layer (GPT-2-small measured ~0.75
    MB per token over its 12 layers in float32)."""
    elt = torch.finfo(adapter.dtype).bits // 8
    return 20 * adapter.n_layers * batch.batch_size * batch.seq_len * adapter.d_model * elt


def checkpoint_blocks(adapter: Any, batch: PromptBatch, free: int | None) -> bool:
    """Whether the blockwise pass also checkpoints every transformer block: when the model's
    activations (:func:`activation_bytes`) would take more than 25% of the free memory (or the
    free memory is unknown). Checkpointing costs one more forward (about 1.3x the pass on
    CPU) and leaves only the residual stream and one block's activations alive."""
    if _CHECKPOINT_BLOCKS is not None:
        return _CHECKPOINT_BLOCKS
    return free is None or activation_bytes(adapter, batch) > 0.25 * free


_CHECKPOINT_BLOCKS: bool | None = None  # None: decided by checkpoint_blocks' rule (tests force it)


def _scored_positions(adapter: Any, batch: PromptBatch, config: SaliencyConfig,
                      loss_fn: Any) -> Tensor | None:
    """The positions the default loss reads, where the model can unembed only those (the logits
    at every position cost more than all of this engine's attention state at long T)."""
    if loss_fn is not None or not getattr(adapter, "keeps_logits_subset", False):
        return None
    return scored_positions(batch, config.loss_segments)


def compute_blockwise(adapter: Any, batch: PromptBatch, config: SaliencyConfig,
                      fwd_hooks: Sequence[tuple[Any, Any]], loss_fn: Any,
                      free: int | None) -> Any:
    """One forward + backward in the blockwise mode; the :class:`SaliencyResult` (the body of
    :func:`~dpc_lens.saliency.compute_saliency` for ``memory="blockwise"``)."""
    _check_caller_hooks(fwd_hooks)
    fired: set[str] = set()

    def noting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(tensor: Any, hook: Any) -> Any:
            fired.add(name)
            return fn(tensor, hook=hook)
        return run

    fwd_hooks = [(n, noting(n, f)) for n, f in fwd_hooks]
    block = config.block_size or default_block_size(adapter, batch, free)
    layers = config.resolved_layers(adapter.n_layers)
    store = SaliencyStore(config, layers, None, batch, adapter)
    p = store._start_pass()
    p.reducers = {}
    ckpt = checkpoint_blocks(adapter, batch, free)
    with frozen_for_saliency(adapter.model), torch.enable_grad(), \
            _blockwise_attention(adapter, store, p, block), \
            (_checkpointed_blocks(adapter) if ckpt else contextlib.nullcontext()):
        embeds = batch.embeds.detach().requires_grad_(True)
        with adapter.hooks(fwd_hooks=list(fwd_hooks)):
            keep = _scored_positions(adapter, batch, config, loss_fn)
            at = {} if keep is None else {"logits_at": keep}
            logits = adapter.forward_embeds(embeds, batch.attention_mask, batch.position_ids, **at)
            silent = [n for n, _ in fwd_hooks if n not in fired]
            if silent:
                raise ConfigError(
                    f"Your hooks {silent} did not fire in memory='blockwise' (on this architecture "
                    "the bridge fires them inside its own attention, which this mode replaces). "
                    "Use SaliencyConfig(memory='normal') or 'lean' with these hooks.")
            if loss_fn is None:
                per_example = target_nll(logits, batch, config.loss_segments,
                                         dtype=torch.float64 if config.loss_fp64 else None,
                                         **({} if keep is None else {"positions": keep}))
                loss = per_example.sum()
                per_example = per_example.detach().to(torch.promote_types(logits.dtype, torch.float32))
            else:
                raw = loss_fn(logits, batch)
                if not isinstance(raw, torch.Tensor) or raw.dim() > 1 or (
                        raw.dim() == 1 and raw.shape[0] != batch.batch_size):
                    raise SaliencyError(
                        f"The loss must be a scalar tensor or one value per example "
                        f"([{batch.batch_size}]); got {getattr(raw, 'shape', type(raw).__name__)}.")
                per_example = raw.detach().reshape(-1)
                loss = raw.sum()
            if not torch.isfinite(loss):
                raise SaliencyError(
                    f"The loss is not finite ({loss.item()}); check the inputs and loss function.")
            if not loss.requires_grad:
                raise InputError("The loss does not depend on the model's output (no gradient); a "
                                 "custom loss must be computed from the logits it is given.")
            del logits
            loss.backward(inputs=[embeds])
            p.backward_ran = True
    for l, red in p.reducers.items():
        if red.out:
            p.per_layer[l] = red.out
    return store.result(per_example)
