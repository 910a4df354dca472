"""SaliencyResult: reduced saliency of one batch; flows between segments and exactly pooled
groups of segments, proportions, the long table, save/load (``_repr_html_`` / ``show`` go here,
drawing delegated to plotting)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import flows as F
from .._typing import Tensor
from ..errors import DpcLensWarning, InputError
from ..segments import SegmentLayout
from .config import SaliencyConfig, _did_you_mean

__all__ = ["SaliencyResult"]


@dataclass(frozen=True, eq=False)
class SaliencyResult:
    """Reduced saliency of one batch. Leading axes: ``[layer, batch]`` (+ ``head_index`` when
    ``config.per_head``). Positions are padded-batch positions (see ``layouts``).

    Attributes:
        config: the :class:`SaliencyConfig` used.
        layers: the model layers, in the order of the layer axis.
        segment_names: order of the ``target``/``source`` axes of ``flow_sums``.
        layouts: per example, the named spans in padded coordinates.
        flow_sums: ``[layer, batch, (head), target, source]`` sums of ``I`` over segment pairs.
        pair_counts: ``[batch, target, source]`` pairs that enter each sum (the causal pairs:
            those of a global layer).
        layer_pair_counts: ``[layer, batch, target, source]``, each layer's pairs under its own
            attention mask, when some measured layer has a sliding window (Gemma 2/3); ``None``
            when every layer is global. Means divide by these when present.
        column_sums / column_shares: ``[layer, batch, (head), key_pos]`` column scores over
            ``config.column_targets`` rows, raw and row-normalised.
        row_sums / row_totals: ``[layer, batch, (head), query_pos]`` incoming flow from
            ``config.row_sources``, and each row's whole incoming flow.
        full: ``[layer, batch, (head), query_pos, key_pos]`` when ``keep_full``.
        loss: ``[batch]`` per-example loss.
        tokens: per example, a readable string per padded position (the token's text,
            ``<soft k>`` on soft-prompt positions, ``""`` on pads), or ``None``.
        groups: named groups of segments (see :meth:`with_groups`), usable wherever a segment
            name is.

    A flow's source or target may be a segment, a group, a list of segments, or names joined by
    ``+`` (``"label0+label1->target"``): a group's flow pools exactly, the sum over all its pairs
    divided by the number of all its pairs (not the mean of per-span means).
    """

    config: SaliencyConfig
    layers: tuple[int, ...]
    segment_names: tuple[str, ...]
    layouts: tuple[SegmentLayout, ...]
    flow_sums: Tensor
    pair_counts: Tensor
    loss: Tensor
    column_sums: Tensor | None = None
    column_shares: Tensor | None = None
    row_sums: Tensor | None = None
    row_totals: Tensor | None = None
    full: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tokens: tuple[tuple[str, ...], ...] | None = None
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    layer_pair_counts: Tensor | None = None

    def __post_init__(self) -> None:
        groups = {str(k): tuple(v) for k, v in dict(self.groups).items()}
        for g, members in groups.items():
            if g in self.segment_names:
                raise InputError(f"Group name {g!r} is already a segment; give the group another name.")
            if not members:
                raise InputError(f"Group {g!r} is empty; list the segments it pools.")
            for m in members:
                self._seg_index(m)
        object.__setattr__(self, "groups", groups)

    def __repr__(self) -> str:
        head = f", heads={self.flow_sums.shape[2]}" if self.config.per_head else ""
        extra = [k for k in ("column_sums", "row_sums", "full") if getattr(self, k) is not None]
        groups = f", groups={dict(self.groups)}" if self.groups else ""
        return (f"SaliencyResult(layers={list(self.layers)}, batch={self.flow_sums.shape[1]}{head}, "
                f"segments={list(self.segment_names)}{groups}, "
                f"flow_sums={tuple(self.flow_sums.shape)}"
                f"{', has ' + '/'.join(extra) if extra else ''})")

    # ----------------------------------------------------------- views (dpc_lens.plotting.html)
    def show(self, example: int = 0, *, source: Any = None, target: Any = None, layers: Any = None,
             tokens: Sequence[str] | None = None) -> Any:
        """One example's tokens shaded by flow, as inseq's ``out.show()``: the flow *from*
        ``source`` (a segment, a group, or a list of them) into each token, or *from* each token
        into ``target``, averaged over ``layers`` (an index, a list, ``"shallow"``/``"deep"`` or
        a fraction band; default all), with the segment flow table below. Per-token flows come
        from ``keep_full=True`` or from ``row_sources`` / ``column_targets`` equal to the source /
        target. Returns a :class:`~dpc_lens.plotting.html.TokenView`, which a notebook displays
        and ``.save("view.html")`` writes as a self-contained page."""
        from ..plotting.html import TokenView, saliency_view

        return TokenView(saliency_view(self, example, source=source, target=target, layers=layers,
                                       tokens=tokens))

    def _repr_html_(self) -> str:
        from ..plotting.html import fragment, saliency_view

        more = (f'<p class="small muted">example 0 of {len(self.layouts)}; res.show(k, source=..., '
                "target=..., layers=...) for the others</p>" if len(self.layouts) > 1 else "")
        return fragment(saliency_view(self, 0) + more)

    # ----------------------------------------------------------- flows
    def _seg_index(self, name: str) -> int:
        try:
            return self.segment_names.index(name)
        except ValueError:
            known = list(self.segment_names) + list(getattr(self, "groups", {}) or {})
            raise InputError(
                f"Unknown segment {name!r}; flows were computed for {list(self.segment_names)}"
                f"{_groups_text(self)}."
                f"{_did_you_mean(name, known)}"
            ) from None

    def _members(self, spec: "str | Sequence[str]") -> list[int]:
        """Segment indices of a segment, a group, a ``+``-joined string or a list of them."""
        if isinstance(spec, str):
            if spec in self.segment_names:
                return [self.segment_names.index(spec)]
            if spec in self.groups:
                return [self.segment_names.index(m) for m in self.groups[spec]]
            if "+" in spec:
                return self._members([s.strip() for s in spec.split("+")])
            return [self._seg_index(spec)]
        out: list[int] = []
        for s in spec:
            for i in self._members(s):
                if i in out:
                    raise InputError(f"Segment {self.segment_names[i]!r} is named twice in {list(spec)!r}.")
                out.append(i)
        if not out:
            raise InputError("An empty list of segments; name at least one.")
        return out

    def _pooled(self, source: Any, target: Any) -> tuple[Tensor, Tensor]:
        """``(sums [layer, batch, (head)], counts)`` over every pair of the groups; ``counts``
        is ``[batch]``, or ``[layer, batch]`` with sliding-window layers (each layer's own
        pairs)."""
        ti, si = self._members(target), self._members(source)
        sums = self.flow_sums[..., ti, :][..., si].sum((-1, -2))
        if self.layer_pair_counts is not None:
            counts = self.layer_pair_counts[:, :, ti][:, :, :, si].sum((-1, -2))
        else:
            counts = self.pair_counts[:, ti][:, :, si].sum((-1, -2))
        return sums, counts

    def flow(self, source: "str | Sequence[str]", target: "str | Sequence[str]",
             reduce: str = "mean") -> Tensor:
        """``flow_l(source->target)`` per layer and example: ``[layer, batch, (head)]``.

        ``source`` and ``target`` are segment names, group names, ``+``-joined names or lists of
        names; a group pools its spans exactly (``sum`` of all pairs / ``count`` of all pairs).
        ``mean``: over pairs ``i in target, j in source, j < i`` (NaN where there is no pair,
        with a warning when causality forbids every pair: the target comes before the source);
        ``sum``: the plain sum.
        """
        sums, counts = self._pooled(source, target)
        if reduce == "sum":
            return sums
        if reduce != "mean":
            raise InputError(f"reduce must be 'mean' or 'sum', got {reduce!r}.")
        if counts.dim() == 2:  # sliding-window layers: each layer divides by its own pairs
            causal = self._pooled_causal(source, target)
            if bool((causal == 0).any()):
                self._warn_forbidden(source, target, causal)
            self._warn_out_of_window(source, target, counts, causal)
            shape = list(counts.shape) + [1] * (sums.dim() - 2)
        else:
            if bool((counts == 0).any()):
                self._warn_forbidden(source, target, counts)
            shape = [1, counts.shape[0]] + [1] * (sums.dim() - 2)
        c = counts.view(shape).to(sums.dtype)
        return torch.where(c > 0, sums / c.clamp(min=1), torch.full_like(sums, float("nan")))

    def _pooled_causal(self, source: Any, target: Any) -> Tensor:
        ti, si = self._members(target), self._members(source)
        return self.pair_counts[:, ti][:, :, si].sum((-1, -2))

    def _warn_out_of_window(self, source: Any, target: Any, counts: Tensor, causal: Tensor) -> None:
        """Warn (naming the layers) where a flow has causal pairs but none inside a sliding
        layer's window: its mean there is NaN (undefined), not a zero averaged in."""
        import warnings

        empty = (counts == 0) & (causal > 0).unsqueeze(0)  # [layer, batch]
        if not bool(empty.any()):
            return
        layers = [self.layers[i] for i in empty.any(1).nonzero().flatten().tolist()]
        examples = empty.any(0).nonzero().flatten().tolist()
        src, tgt = _spec_name(source), _spec_name(target)
        warnings.warn(
            f"The flow {src}->{tgt} is structurally empty in the sliding-window layers {layers} "
            f"(examples {examples}): every {tgt!r} token is a window or more away from every "
            f"{src!r} token, so those layers' attention never sees the pair. Its mean there is NaN "
            "(not a zero averaged into the statistics); choose the global layers "
            "(layers='global') or move the segments closer.", DpcLensWarning, stacklevel=3)

    def _warn_forbidden(self, source: Any, target: Any, counts: Tensor) -> None:
        import warnings

        si, ti = self._members(source), self._members(target)
        names = self.segment_names
        forbidden = []
        for b in (counts == 0).nonzero().flatten().tolist():
            lay = self.layouts[b]
            if _has_tokens(lay, names, si) and _has_tokens(lay, names, ti):
                forbidden.append(b)
        if forbidden:
            src = "+".join(names[i] for i in si)
            tgt = "+".join(names[i] for i in ti)
            warnings.warn(
                f"The flow {src}->{tgt} is NaN in examples {forbidden}: every {tgt!r} token comes "
                f"before every {src!r} token, and causal attention lets a token see only earlier "
                f"ones, so no pair exists. Did you mean {tgt}->{src}?", DpcLensWarning, stacklevel=3)

    def pair_count(self, source: "str | Sequence[str]", target: "str | Sequence[str]") -> Tensor:
        """``[batch]``: the pairs ``(i, j)``, ``i in target, j in source, j < i`` that a flow's
        mean divides by (groups pooled as in :meth:`flow`); ``[layer, batch]`` when some layer
        has a sliding window (:attr:`layer_pair_counts`)."""
        return self._pooled(source, target)[1]

    def flows(self, names: Sequence[Any], reduce: str = "mean") -> dict[str, Tensor]:
        """Several flows by ``"source->target"`` name (or ``(source, target)`` pairs, either a
        segment, a group or a list of segments); keys are ``"source->target"`` strings."""
        out: dict[str, Tensor] = {}
        for n in names:
            s, t = _split_flow_name(n)
            key = n if isinstance(n, str) else f"{_spec_name(s)}->{_spec_name(t)}"
            out[key] = self.flow(s, t, reduce=reduce)
        return out

    def proportions(self, names: Sequence[Any], reduce: str = "mean") -> dict[str, Tensor]:
        """Per-layer proportions over ``names`` (they sum to 1 per layer and example)."""
        flows = self.flows(names, reduce)
        return F.flow_proportions(flows, list(flows))

    def with_groups(self, groups: Mapping[str, Sequence[str]]) -> "SaliencyResult":
        """The same result with named groups of segments added, e.g.
        ``res.with_groups({"label": ["label0", "label1", "label2"]})``: then ``"label"`` works in
        :meth:`flow`, :meth:`flows`, :meth:`proportions`, :meth:`to_dataframe` and the figures."""
        merged = dict(self.groups)
        merged.update({k: tuple(v) for k, v in groups.items()})
        return dataclasses.replace(self, groups=merged)

    # ------------------------------------------------------------ export
    def to_dataframe(self):
        """Long table: one row per (layer, example, [head,] source, target) with sum, count,
        mean; sources and targets are the segments, then the groups (pooled exactly)."""
        import pandas as pd

        units = [(n, [i]) for i, n in enumerate(self.segment_names)]
        units += [(g, [self.segment_names.index(m) for m in ms]) for g, ms in self.groups.items()]
        fs = self.flow_sums.detach().cpu().double()
        pc = (self.layer_pair_counts if self.layer_pair_counts is not None
              else self.pair_counts.unsqueeze(0).expand(len(self.layers), -1, -1, -1)).cpu().double()
        per_head = self.config.per_head
        rows = []
        for tn, ti in units:
            for sn, si in units:
                s_all = fs[..., ti, :][..., si].sum((-1, -2))  # [layer, batch, (head)]
                c_all = pc[:, :, ti][:, :, :, si].sum((-1, -2))  # [layer, batch]
                for li, layer in enumerate(self.layers):
                    for b in range(fs.shape[1]):
                        c = float(c_all[li, b])
                        if c == 0:
                            continue
                        for h in (range(fs.shape[2]) if per_head else [None]):
                            s = float(s_all[li, b, h] if per_head else s_all[li, b])
                            row = {"layer": layer, "example": b, "source": sn, "target": tn,
                                   "flow": f"{sn}->{tn}", "sum": s, "count": c, "mean": s / c}
                            if per_head:
                                row["head"] = h
                            rows.append(row)
        df = pd.DataFrame(rows)
        if len(df):
            keys = ["layer", "example"] + (["head"] if per_head else [])
            df = df.sort_values(keys, kind="stable").reset_index(drop=True)
        return df

    def save(self, path: str | os.PathLike) -> str:
        """Write ``saliency.safetensors`` and ``saliency.json`` (config, layers, layouts, tokens,
        groups)."""
        from safetensors.torch import save_file

        from ..runs import check_out_dir

        path = check_out_dir(path, "SaliencyResult.save path")
        tensors = {"flow_sums": self.flow_sums, "pair_counts": self.pair_counts, "loss": self.loss}
        for name in ("column_sums", "column_shares", "row_sums", "row_totals", "full",
                     "layer_pair_counts"):
            v = getattr(self, name)
            if v is not None:
                tensors[name] = v
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(path, "saliency.safetensors"))
        meta = {
            "config": self.config.to_dict(),
            "layers": list(self.layers),
            "segment_names": list(self.segment_names),
            "layouts": [lay.to_dict() for lay in self.layouts],
            "meta": self.meta,
            "tokens": [list(t) for t in self.tokens] if self.tokens is not None else None,
            "groups": {k: list(v) for k, v in self.groups.items()},
        }
        with open(os.path.join(path, "saliency.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SaliencyResult":
        from safetensors.torch import load_file

        path = os.fspath(path)
        with open(os.path.join(path, "saliency.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        t = load_file(os.path.join(path, "saliency.safetensors"))
        toks = meta.get("tokens")
        return cls(
            config=SaliencyConfig.from_dict(meta["config"]),
            layers=tuple(meta["layers"]),
            segment_names=tuple(meta["segment_names"]),
            layouts=tuple(SegmentLayout.from_dict(d) for d in meta["layouts"]),
            flow_sums=t["flow_sums"],
            pair_counts=t["pair_counts"],
            loss=t["loss"],
            column_sums=t.get("column_sums"),
            column_shares=t.get("column_shares"),
            row_sums=t.get("row_sums"),
            row_totals=t.get("row_totals"),
            full=t.get("full"),
            meta=meta.get("meta", {}),
            tokens=tuple(tuple(x) for x in toks) if toks is not None else None,
            groups={k: tuple(v) for k, v in (meta.get("groups") or {}).items()},
            layer_pair_counts=t.get("layer_pair_counts"),
        )


def _has_tokens(lay: SegmentLayout, names: Sequence[str], idx: Sequence[int]) -> bool:
    return any(names[i] in lay.spans and lay.spans[names[i]][1] > lay.spans[names[i]][0] for i in idx)


def _groups_text(res: Any) -> str:
    groups = getattr(res, "groups", None)
    return f" and groups {list(groups)}" if isinstance(groups, dict) and groups else ""


def _spec_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else "+".join(spec)


def _split_flow_name(name: Any) -> tuple[Any, Any]:
    if isinstance(name, (tuple, list)) and len(name) == 2:
        return name[0], name[1]
    if not isinstance(name, str) or "->" not in name:
        raise InputError(
            "Flow names are 'source->target' (e.g. 'soft->rationale', 'label0+label1->target') "
            f"or (source, target) pairs; got {name!r}.")
    s, t = name.split("->", 1)
    return s.strip(), t.strip()
