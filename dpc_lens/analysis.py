"""The one analysis driver both methods run: teacher-forced saliency over given rationales,
reduced to per-layer flows.

DPC (:func:`dpc_lens.dpc.analyse`, ``[soft; bos; question; rationale]``) and IAP
(:func:`dpc_lens.iap.score_pairs`, ``[bos; question; prompt; rationale]``) both generate a
rationale, then run one teacher-forced forward + backward per batch with the loss
``L = mean NLL of the rationale tokens`` and reduce each layer at once to segment flows
``flow_l(S -> T) = mean of I_l(i, j) over i in T, j in S, j < i``. :func:`measure_flows` is that
second step, batched; what differs between the methods (the layout, the soft prompt, the flow
names, DPC's detector tensors) comes in as arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .progress import bar
from .segments import PromptBatch, SegmentLayout

__all__ = ["FlowMeasurement", "measure_flows"]


@dataclass(frozen=True, eq=False)
class FlowMeasurement:
    """One sequence's saliency reduced: ``flows`` maps each flow name to its per-layer mean
    (in ``layers`` order), ``loss`` is the teacher-forced mean NLL, ``extra`` what the caller's
    ``per_example`` hook took from the :class:`~dpc_lens.saliency.SaliencyResult`."""

    flows: dict[str, list[float]]
    loss: float
    layers: tuple[int, ...]
    extra: Any = None
    per_head: dict[str, list[list[float]]] | None = field(default=None)


def measure_flows(
    model: Any,
    sequences: Sequence[Sequence[int]],
    layouts: Sequence[SegmentLayout],
    flow_names: Sequence[str],
    config: Any,
    *,
    soft: Any = None,
    batch_size: int = 8,
    per_head_config: Any = None,
    per_example: Callable[[Any, int, PromptBatch], Any] | None = None,
    progress: bool | None = False,
    desc: str = "saliency",
) -> list[FlowMeasurement]:
    """One saliency pass per ``batch_size`` sequences; per sequence its flows and loss.

    Args:
        sequences, layouts: token ids (prompt and rationale) and their segment layouts.
        flow_names: ``"source->target"`` flows to keep per layer.
        config: the :class:`~dpc_lens.saliency.SaliencyConfig` of the pass.
        soft: a soft prompt put first (DPC), or ``None`` (IAP).
        per_head_config: also a second, per-head pass with this config (IAP's layer x head maps).
        per_example: ``fn(result, b, batch)`` -> anything kept as ``extra`` (DPC's detector
            tensors).
    """
    from . import saliency  # looked up at call time, so a test may count the passes

    # length buckets: sequences of similar length share a pass (padding costs T^2 attention), the
    # measurements come back in input order; each row's saliency is what it gets alone, to
    # float rounding (tested: batched == one by one)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[FlowMeasurement | None] = [None] * len(sequences)
    for s in bar(range(0, len(sequences), batch_size), progress=progress, desc=desc, leave=False):
        idx = order[s:s + batch_size]
        seqs, lays = [sequences[i] for i in idx], [layouts[i] for i in idx]
        batch = PromptBatch.build(model, seqs, lays, soft)
        res = saliency.compute_saliency(model, batch, config)
        per_layer = res.flows(flow_names)  # name -> [layer, batch]
        heads = None
        if per_head_config is not None:
            hres = saliency.compute_saliency(model, batch, per_head_config)
            heads = hres.flows(flow_names)  # name -> [layer, batch, head]
        for b, i in enumerate(idx):
            out[i] = (FlowMeasurement(
                flows={n: [float(x) for x in v[:, b].double().cpu().tolist()] for n, v in per_layer.items()},
                loss=float(res.loss[b]),
                layers=tuple(res.layers),
                extra=per_example(res, b, batch) if per_example is not None else None,
                per_head=None if heads is None else {
                    n: [[float(x) for x in row] for row in v[:, b].double().cpu().tolist()]
                    for n, v in heads.items()},
            ))
    return out  # type: ignore[return-value]
