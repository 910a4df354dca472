"""The one renderer of tokens shaded by flow, and of a run's per-question views, as HTML.

Everything here returns self-contained HTML: styles inline in the page, no script, font, image
or request from anywhere else, and every string taken from data or model output (questions,
generations, prompts, token texts, ids, segment names) passes through :func:`esc` before it
reaches the page, so a generated ``<script>`` shows as text. The report's page also carries a
Content-Security-Policy that allows only its own nonce'd script and ``data:`` images, as a second
wall.

Users of this module:

* :meth:`dpc_lens.saliency.SaliencyResult.show` / ``_repr_html_`` (:func:`saliency_view`): one
  example's tokens shaded by the flow from a source segment (or group), or into a target, over a
  layer or band of layers, as inseq's ``out.show()`` or circuitsvis's ``colored_tokens`` do;
* :meth:`dpc_lens.dpc.DPCRecord._repr_html_` (:func:`dpc_question`) and IAP's
  :meth:`~dpc_lens.iap.PairRecord._repr_html_` (:func:`iap_pair`);
* :mod:`dpc_lens.plotting.report`, which puts the same views in one page per run.

It imports nothing above :mod:`dpc_lens.errors` / :mod:`dpc_lens.layers` (the saliency result is
read by duck typing), so the core's result objects may call it (``tests/test_architecture.py``
names it as the one plotting module they may import).
"""

from __future__ import annotations

import html as _html
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError

__all__ = ["esc", "fragment", "page", "TokenView", "shade_tokens", "saliency_view", "saliency_token_scores",
           "dpc_question", "dpc_flags", "iap_question", "iap_flags", "iap_pair", "json_attr",
           "N_SHADES"]

#: shading levels of a token's background (0 = none, N_SHADES - 1 = the largest value)
N_SHADES = 10

_SHADE_CSS = "".join(
    f".dpcl .s{k}{{background:rgba(33,102,172,{0.85 * k / (N_SHADES - 1):.3f})}}" for k in range(N_SHADES)
) + ".dpcl .s7,.dpcl .s8,.dpcl .s9{color:#fff}"

CSS = """
.dpcl{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 font-size:14px;color:#1b1f24;line-height:1.45}
.dpcl h1{font-size:22px;margin:0 0 4px}.dpcl h2{font-size:18px;margin:26px 0 8px;
 border-bottom:1px solid #d0d7de;padding-bottom:4px}.dpcl h3{font-size:15px;margin:14px 0 6px}
.dpcl table{border-collapse:collapse;margin:4px 0 10px}.dpcl td,.dpcl th{border:1px solid #d0d7de;
 padding:3px 8px;vertical-align:top;text-align:left}.dpcl th{background:#f3f5f7;font-weight:600}
.dpcl td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.dpcl .muted{color:#656d76}.dpcl .small{font-size:12px}
.dpcl .toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
 white-space:pre-wrap;word-break:break-word;line-height:1.9;background:#fff;padding:4px 6px;
 border:1px solid #e4e8ec;border-radius:4px}
.dpcl .toks i{font-style:normal;border-radius:2px;padding:1px 0}
.dpcl .toks i.hi{outline:2px solid #d62728;outline-offset:-1px}
.dpcl .toks i.mk{outline:2px solid #e08e0b;outline-offset:-1px}
.dpcl .toks span.seg{color:#656d76;font-size:11px;background:#eef1f4;padding:0 3px;margin:0 2px}
.dpcl .split{display:inline-block;width:0;border-left:3px solid #d62728;height:1.3em;
 vertical-align:middle;margin:0 3px}
.dpcl .legend{display:flex;gap:10px;align-items:center;font-size:12px;color:#656d76;margin:3px 0}
.dpcl .ramp{display:inline-flex}.dpcl .ramp span{width:14px;height:12px;display:inline-block}
.dpcl .ok{color:#1a7f37;font-weight:600}.dpcl .bad{color:#cf222e;font-weight:600}
.dpcl .badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;margin-left:4px;
 background:#eef1f4;color:#424a53}.dpcl .badge.fired{background:#ffebe9;color:#a40e26}
.dpcl .badge.flip{background:#fff8c5;color:#7d4e00}
.dpcl .cols{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.dpcl .box{border:1px solid #d0d7de;border-radius:6px;padding:8px 10px;background:#fbfcfd}
.dpcl .text{white-space:pre-wrap;word-break:break-word}
.dpcl details.q{border:1px solid #d0d7de;border-radius:6px;margin:6px 0;background:#fff}
.dpcl details.q>summary{cursor:pointer;padding:6px 10px;list-style-position:inside}
.dpcl details.q>div{padding:4px 12px 10px}
.dpcl tr.chosen td{background:#dafbe1}.dpcl .filters button{margin:2px 4px 2px 0;padding:3px 10px;
 border:1px solid #d0d7de;border-radius:14px;background:#f6f8fa;cursor:pointer;font:inherit;font-size:13px}
.dpcl .filters button.on{background:#0969da;color:#fff;border-color:#0969da}
.dpcl img.fig{max-width:100%;border:1px solid #e4e8ec;border-radius:4px;margin:4px 8px 8px 0}
.dpcl .bars{display:flex;align-items:flex-end;gap:2px;height:70px;margin:6px 0 2px}
.dpcl .bars div{background:#2166ac;width:16px}
""" + _SHADE_CSS


def esc(x: Any) -> str:
    """``x`` as text safe anywhere in HTML (element content or a quoted attribute)."""
    return _html.escape("" if x is None else str(x), quote=True)


def _num(v: Any, fmt: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        return format(v, fmt) if not isinstance(v, int) else str(v)
    return esc(v)


def fragment(body: str) -> str:
    """An HTML fragment with its own styles, for a notebook cell (``_repr_html_``)."""
    return f'<div class="dpcl"><style>{CSS}</style>{body}</div>'


class TokenView:
    """A rendered token view: a notebook displays it (``_repr_html_``), :meth:`save` writes it as a
    self-contained page, ``.html`` is the fragment."""

    def __init__(self, body: str, title: str = "dpc-lens token view") -> None:
        self.body, self.title = body, title

    @property
    def html(self) -> str:
        return fragment(self.body)

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str) -> str:
        """Write the view as one self-contained HTML page; returns the path."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page(self.title, self.body))
        return path

    def __repr__(self) -> str:
        return f"<TokenView: {len(self.body)} characters of HTML; display it in a notebook or .save(path)>"


def page(title: str, body: str, *, script: str = "") -> str:
    """A whole self-contained page: styles and script inline, and a Content-Security-Policy that
    allows nothing from the network and runs only this page's own script (by a fresh nonce), so
    even a string that escaped :func:`esc` could neither load nor run anything."""
    nonce = secrets.token_urlsafe(16)
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'")
    js = f'<script nonce="{nonce}">{script}</script>' if script else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>body{{margin:24px auto;max-width:1200px;"
            f"padding:0 16px;background:#fff}}{CSS}</style></head>"
            f'<body><div class="dpcl">{body}</div>{js}</body></html>\n')


# =============================================================================================
# Tokens shaded by a value
# =============================================================================================


def _shade(v: float, vmax: float) -> int:
    if not (vmax > 0) or not math.isfinite(v) or v <= 0:
        return 0
    return min(N_SHADES - 1, int(round((N_SHADES - 1) * min(v, vmax) / vmax)))


def _legend(vmax: float, label: str, extra: str = "") -> str:
    ramp = "".join(f'<span class="s{k}"></span>' for k in range(N_SHADES))
    return (f'<div class="legend"><span>{esc(label)}: 0</span><span class="ramp">{ramp}</span>'
            f"<span>{_num(vmax, '.3g')}</span>{extra}</div>")


def shade_tokens(
    tokens: Sequence[str],
    values: Sequence[float | None],
    *,
    vmax: float | None = None,
    split: int | None = None,
    threshold: float | None = None,
    marked: Sequence[int] = (),
    label: str = "flow",
    legend: bool = True,
    segments: Sequence[tuple[str, int, int]] = (),
) -> str:
    """Tokens as text on a background whose darkness is their value (``N_SHADES`` levels from 0
    to ``vmax``, default the largest value); the value (3 significant digits) is the token's
    tooltip. Each token is one ``<i>`` element, in order, so ``textContent`` is the text.

    ``split``: a red bar before token ``split`` (the trigger's r1 | r2 boundary); ``threshold``:
    tokens after the split whose value exceeds it are outlined red (the trigger's "affected"
    tokens, ``f_i > beta``); ``marked``: token indices outlined orange (e.g. located soft
    tokens); ``segments``: ``(name, start, end)`` labels shown before each segment's first token.
    """
    if len(tokens) != len(values):
        raise InputError(f"shade_tokens got {len(tokens)} tokens and {len(values)} values; give "
                         "one value per token.")
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    top = float(vmax) if vmax is not None else (max(finite) if finite else 0.0)
    marked = set(int(i) for i in marked)
    starts = {int(s): n for n, s, e in segments if e > s}
    parts = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        if i in starts:
            parts.append(f'<span class="seg">{esc(starts[i])}</span>')
        if split is not None and i == split:
            parts.append('<span class="split" title="split: r1 | r2"></span>')
        fv = float(v) if v is not None else float("nan")
        cls = f"s{_shade(fv, top)}"
        if threshold is not None and (split is None or i >= split) and fv > threshold:
            cls += " hi"
        if i in marked:
            cls += " mk"
        # compact markup (600 questions x 256 tokens must stay a few MB): <i class=s3 title=0.01>
        attr = cls if " " not in cls else f'"{cls}"'
        tip = f"{fv:.3g}" if math.isfinite(fv) else "n/a"
        parts.append(f'<i class={attr} title={tip}>{esc(t) if t != "" else "&#8203;"}</i>')
    out = f'<div class="toks">{"".join(parts)}</div>'
    if legend:
        extra = ""
        if split is not None:
            extra += '<span><span class="split"></span>split (r1 | r2)</span>'
        if threshold is not None:
            extra += f"<span>outlined: above the threshold {_num(threshold, '.4g')}</span>"
        out = _legend(top, label, extra) + out
    return out


# =============================================================================================
# A saliency result, one example
# =============================================================================================


def _np(t: Any) -> Any:
    import numpy as np

    return np.asarray(t.detach().cpu().double().numpy()) if hasattr(t, "detach") else np.asarray(t)


def _names(x: str | Sequence[str] | None, groups: Mapping[str, Sequence[str]] | None = None
           ) -> tuple[str, ...] | None:
    """Segment names of a source / target spec: a segment, a group of the result, a list of
    them, or names joined by ``+`` (groups expanded into their segments)."""
    if x is None:
        return None
    items = x.split("+") if isinstance(x, str) else [str(n) for n in x]
    out: list[str] = []
    for n in (i.strip() for i in items):
        for m in (groups or {}).get(n, (n,)):
            if m not in out:
                out.append(m)
    return tuple(out)


def _layer_indices(result: Any, layers: Any) -> list[int]:
    """Positions on the result's layer axis of the chosen model layers (``None``: all)."""
    have = [int(x) for x in result.layers]
    if layers is None:
        return list(range(len(have)))
    if isinstance(layers, int):
        wanted = [layers]
    elif isinstance(layers, str) or (isinstance(layers, Sequence) and len(layers) == 2
                                     and all(isinstance(v, float) for v in layers)):
        from ..layers import resolve_layers

        meta = getattr(result, "meta", None) or {}
        n_model = int(meta.get("n_layers", max(have) + 1))
        wanted = resolve_layers(layers, n_model)
    else:
        wanted = [int(v) for v in layers]
    n_model = max(have) + 1
    wanted = [w + n_model if w < 0 else w for w in wanted]
    missing = [w for w in wanted if w not in have]
    if missing or not wanted:
        raise InputError(f"layers {layers!r} asks for layers {missing or wanted} this result does not "
                         f"hold; it has layers {have}. Choose among them, or recompute with "
                         "SaliencyConfig(layers=...).")
    return [have.index(w) for w in wanted]


def _real_span(layout: Any) -> tuple[int, int]:
    spans = [v for v in layout.spans.values() if v[1] > v[0]]
    if not spans:
        return 0, 0
    return min(s for s, _ in spans), max(e for _, e in spans)


def _token_labels(result: Any, b: int, lo: int, hi: int, tokens: Sequence[str] | None) -> list[str]:
    lay = result.layouts[b]
    if tokens is None:
        for attr in ("tokens", "token_strs", "str_tokens"):
            got = getattr(result, attr, None)
            if got is None and isinstance(getattr(result, "meta", None), Mapping):
                got = result.meta.get(attr)
            if got is not None:
                tokens = got[b] if len(got) and not isinstance(got[0], str) else got
                break
    if tokens is not None:
        tokens = [str(t) for t in tokens]
        if len(tokens) == hi - lo:
            return tokens
        if len(tokens) == lay.length or len(tokens) >= hi:
            return tokens[lo:hi]
        raise InputError(f"tokens has {len(tokens)} entries; example {b} has {hi - lo} positions "
                         f"({lo}..{hi - 1} of the padded batch). Give one string per position.")
    labels = [""] * (hi - lo)
    for name, (s, e) in lay.spans.items():
        for i in range(s, e):
            labels[i - lo] = f"{name}{i - s} "
    return labels


def saliency_token_scores(
    result: Any,
    example: int = 0,
    *,
    source: str | Sequence[str] | None = None,
    target: str | Sequence[str] | None = None,
    layers: Any = None,
) -> dict[str, Any]:
    """Per-token flow of one example, averaged over the chosen layers (and summed over heads).

    * ``source`` (a segment or a group of segments): the flow *into* each token from the
      source's tokens, ``sum_{j in source} I_l[i, j]`` — read from the full map
      (``keep_full=True``) or, when the result was computed with ``row_sources`` equal to the
      source, from ``row_sums``;
    * ``target``: the flow *out of* each token into the target's tokens,
      ``sum_{i in target} I_l[i, j]`` — from the full map or from ``column_sums`` computed with
      ``column_targets`` equal to the target; an int ``target`` is one token (its index among
      the example's tokens, negative from the end): the flow into it, ``I_l[target, j]`` (full
      map only).

    Neither given: the result's own per-token scores (``row_sources`` first, then
    ``column_targets``), else, with a full map, the flow from the first segment.

    Returns ``{"values": [...], "lo": first padded position, "hi": end, "layers": [...],
    "label": a sentence for the legend}``.
    """
    import numpy as np

    b = int(example)
    n_batch = int(result.pair_counts.shape[0])
    if not 0 <= b < n_batch:
        raise InputError(f"example {example} is not in this result; it holds examples 0..{n_batch - 1}.")
    groups = getattr(result, "groups", None) or {}
    if isinstance(target, int) and not isinstance(target, bool):
        return _into_one_token(result, b, target, source, layers)
    src, tgt = _names(source, groups), _names(target, groups)
    if src is not None and tgt is not None:
        raise InputError("give source= or target=, not both: a token view shades each token by the "
                         "flow from a source into it, or from it into a target.")
    cfg = result.config
    lay = result.layouts[b]
    for n in (src or ()) + (tgt or ()):
        if n not in lay.spans:
            raise InputError(f"unknown segment {n!r}; example {b} has the segments {list(lay.spans)}.")
    li = _layer_indices(result, layers)
    full = getattr(result, "full", None)
    row_src = tuple(cfg.row_sources) if cfg.row_sources else None
    col_tgt = tuple(cfg.column_targets) if cfg.column_targets else None
    if src is None and tgt is None:
        if result.row_sums is not None:
            src = row_src
        elif result.column_sums is not None:
            tgt = col_tgt
        elif full is not None:
            src = (next(n for n, (s, e) in lay.spans.items() if e > s),)
        else:
            raise InputError("this result holds no per-token flows (only segment flows). Recompute with "
                             "SaliencyConfig(row_sources=(...,)), column_targets=(...,) or keep_full=True "
                             "to see tokens shaded.")

    def head_sum(x: Any) -> Any:  # [layer, (head), pos...] -> [layer, pos...]
        return x.sum(axis=1) if cfg.per_head else x

    lo, hi = _real_span(lay)
    if full is not None:
        m = head_sum(_np(full[:, b]))[li]  # [layer, q, k]
        if src is not None:
            cols = [i for n in src for i in range(*lay.spans[n])]
            per = m[:, :, cols].sum(axis=2)
        else:
            rows = [i for n in tgt for i in range(*lay.spans[n])]
            per = m[:, rows, :].sum(axis=1)
    elif src is not None:
        if result.row_sums is None or set(src) != set(row_src or ()):
            raise InputError(f"the flow from {list(src)} into each token needs the full map or row sums "
                             f"from exactly those sources; this result has row_sources={row_src} and "
                             "no full map. Recompute with SaliencyConfig(row_sources="
                             f"{tuple(src)!r}) or keep_full=True.")
        per = head_sum(_np(result.row_sums[:, b]))[li]
    else:
        if result.column_sums is None or set(tgt) != set(col_tgt or ()):
            raise InputError(f"the flow from each token into {list(tgt)} needs the full map or column "
                             f"sums over exactly those targets; this result has column_targets={col_tgt} "
                             "and no full map. Recompute with SaliencyConfig(column_targets="
                             f"{tuple(tgt)!r}) or keep_full=True.")
        per = head_sum(_np(result.column_sums[:, b]))[li]
    vals = np.asarray(per).mean(axis=0)[lo:hi]
    chosen = [int(result.layers[i]) for i in li]
    band = (f"layer {chosen[0]}" if len(chosen) == 1 else
            f"layers {chosen[0]}-{chosen[-1]}" if chosen == list(range(chosen[0], chosen[-1] + 1))
            else f"layers {chosen}")
    label = (f"flow from {'+'.join(src)} into each token" if src is not None
             else f"flow from each token into {'+'.join(tgt)}") + f", mean over {band}"
    return {"values": [float(v) for v in vals], "lo": lo, "hi": hi, "layers": chosen, "label": label}


def _into_one_token(result: Any, b: int, token: int, source: Any, layers: Any) -> dict[str, Any]:
    """The flow from each earlier token into token ``token`` (an index into the example's tokens,
    as shown): one row of the full map, averaged over the layers."""
    import numpy as np

    if source is not None:
        raise InputError("give source= or target=, not both.")
    full = getattr(result, "full", None)
    if full is None:
        raise InputError("the flow into one token needs the full map: recompute with "
                         "SaliencyConfig(keep_full=True).")
    lo, hi = _real_span(result.layouts[b])
    if not -(hi - lo) <= token < hi - lo:
        raise InputError(f"target token {token} is not in example {b}, which has {hi - lo} tokens "
                         f"(0..{hi - lo - 1}, or negative from the end).")
    q = lo + (token % (hi - lo))
    li = _layer_indices(result, layers)
    m = _np(full[:, b])
    if result.config.per_head:
        m = m.sum(axis=1)
    vals = np.asarray(m[li][:, q, lo:hi]).mean(axis=0)
    chosen = [int(result.layers[i]) for i in li]
    return {"values": [float(v) for v in vals], "lo": lo, "hi": hi, "layers": chosen,
            "label": f"flow from each token into token {q - lo}, mean over layers {chosen}"}


def _segment_table(result: Any, b: int, li: list[int]) -> str:
    """Mean flow between the example's segments (rows: target, columns: source) over ``li``."""
    names = list(result.segment_names)
    fs = _np(result.flow_sums[:, b])
    if result.config.per_head:
        fs = fs.sum(axis=1)
    fs = fs[li].mean(axis=0)
    pc = _np(result.pair_counts[b])
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for t, tn in enumerate(names):
        cells = []
        for s in range(len(names)):
            c = pc[t, s]
            cells.append(f'<td class="num">{_num(fs[t, s] / c, ".3g")}</td>' if c > 0
                         else '<td class="num muted">·</td>')
        rows.append(f"<tr><th>{esc(tn)}</th>{''.join(cells)}</tr>")
    return (f'<table class="small"><tr><th>target \\ source</th>{head}</tr>{"".join(rows)}</table>')


def saliency_view(
    result: Any,
    example: int = 0,
    *,
    source: str | Sequence[str] | None = None,
    target: str | Sequence[str] | None = None,
    layers: Any = None,
    tokens: Sequence[str] | None = None,
) -> str:
    """HTML of one example: its tokens shaded by :func:`saliency_token_scores` (when the result
    holds per-token flows), segment labels, and the segment flow table over the same layers."""
    b = int(example)
    li = _layer_indices(result, layers)
    lay = result.layouts[b] if 0 <= b < len(result.layouts) else None
    if lay is None:
        raise InputError(f"example {example} is not in this result; it holds examples "
                         f"0..{len(result.layouts) - 1}.")
    lo, hi = _real_span(lay)
    labels = _token_labels(result, b, lo, hi, tokens)
    segs = sorted(((n, s - lo, e - lo) for n, (s, e) in lay.spans.items()), key=lambda x: x[1])
    has_tokens = (source is not None or target is not None or result.row_sums is not None
                  or result.column_sums is not None or getattr(result, "full", None) is not None)
    if has_tokens:
        d = saliency_token_scores(result, b, source=source, target=target, layers=layers)
        toks = shade_tokens(labels, d["values"], segments=segs, label=d["label"])
    else:
        toks = ('<p class="muted small">segment flows only (recompute with row_sources, column_targets '
                "or keep_full=True to shade tokens)</p>"
                + shade_tokens(labels, [0.0] * len(labels), segments=segs, legend=False))
    chosen = [int(result.layers[i]) for i in li]
    return (f"<div><b>example {b}</b> <span class=\"muted small\">{len(labels)} tokens, layers "
            f"{esc(chosen)}</span>{toks}<div class=\"small muted\">mean flow between segments "
            f"(mean over pairs, then over the layers)</div>{_segment_table(result, b, li)}</div>")


# =============================================================================================
# DPC: one question
# =============================================================================================


def _mark(correct: Any) -> str:
    if correct is None:
        return '<span class="muted">—</span>'
    return '<span class="ok">✓ right</span>' if correct else '<span class="bad">✗ wrong</span>'


def _answer_box(title: str, a: Mapping[str, Any] | None, extra: str = "") -> str:
    if not a:
        return f'<div class="box"><b>{esc(title)}</b> <span class="muted">not run</span></div>'
    return (f'<div class="box"><b>{esc(title)}</b> answer <code>{esc(a.get("answer"))}</code> '
            f"{_mark(a.get('correct'))} <span class=\"muted small\">stop: {esc(a.get('stop_reason'))}"
            f"</span>{extra}<div class=\"text\">{esc(a.get('rationale') or '')}</div></div>")


def dpc_flags(r: Mapping[str, Any]) -> dict[str, str]:
    """The filterable outcome of one DPC record, as the report's ``data-*`` attributes."""
    if r.get("skipped"):
        return {"skipped": "1"}
    pt = bool((r.get("pt") or {}).get("correct"))
    dpc = bool((r.get("dpc") or {}).get("correct"))
    fired = bool((r.get("dpc") or {}).get("fired"))
    flip = "rw" if (pt and not dpc) else "wr" if (dpc and not pt) else "none"
    return {"pt": str(int(pt)), "dpc": str(int(dpc)), "fired": str(int(fired)), "flip": flip}


def dpc_question(r: Any, index: int | None = None, *, open_: bool = False) -> str:
    """One DPC question: the question, PT's and DPC's rationales side by side with their answers
    marked, the soft rows located and zeroed, the PT rationale's tokens shaded by their deep
    soft->rationale flow ``f_i`` with the trigger's split and threshold ``beta`` marked, and the
    shallow-layer soft-column scores with the located rows outlined."""
    r = r.to_dict() if hasattr(r, "to_dict") else dict(r)
    flags = dpc_flags(r)
    rid = esc(r.get("id"))
    attrs = " ".join(f'data-{k}="{v}"' for k, v in flags.items()) + f' data-qid="{rid}"'
    head = f"<b>{'#' + str(index) + ' ' if index is not None else ''}{rid}</b>"
    if r.get("skipped"):
        return (f'<details class="q" {attrs}><summary>{head} <span class="badge">skipped</span>'
                f'</summary><div><p class="text">{esc(r.get("question"))}</p><p class="muted">'
                f"{esc(r['skipped'])}</p></div></details>")
    pt, dpc = r.get("pt") or {}, r.get("dpc") or {}
    badges = (f" PT {_mark(pt.get('correct'))} · DPC {_mark(dpc.get('correct'))}"
              + (' <span class="badge fired">trigger fired</span>' if flags["fired"] == "1" else
                 ' <span class="badge">not fired</span>')
              + ({"rw": ' <span class="badge flip">flipped right → wrong</span>',
                  "wr": ' <span class="badge flip">flipped wrong → right</span>'}.get(flags["flip"], ""))
              + f' <span class="muted small">gold <code>{esc(r.get("gold"))}</code></span>')
    zeroed = dpc.get("corrupted_rows") or []
    located = r.get("located_rows") or []
    rows_txt = (f"soft rows zeroed: <b>{esc(', '.join(map(str, zeroed)))}</b>" if zeroed
                else "no soft row zeroed (PT's answer kept)")
    body = [f'<p class="text"><b>Q:</b> {esc(r.get("question"))}</p>',
            '<div class="cols">', _answer_box("PT", pt),
            _answer_box("DPC", dpc, f' <span class="small">· {rows_txt}</span>'), "</div>"]
    trig = r.get("trigger") or {}
    deep = trig.get("deep_flow") or {}
    f = deep.get("f")
    if trig:
        body.append(f'<p class="small"><b>trigger:</b> {esc(trig.get("reason"))}</p>')
    if f:
        toks = r.get("rationale_tokens")
        if not toks or len(toks) != len(f):
            toks = [f"·{i}" for i in range(len(f))]
        layers = deep.get("layers") or []
        body.append(f'<h3>PT rationale, tokens shaded by deep soft→rationale flow f<sub>i</sub> '
                    f'<span class="muted small">(layers {esc(layers)})</span></h3>')
        body.append(shade_tokens(toks, f, split=deep.get("n_first"), threshold=deep.get("beta"),
                                 label="f_i"))
    acc = trig.get("accumulation") or {}
    scores = acc.get("scores")
    if scores:
        body.append(f'<h3>Soft-prompt columns over the shallow layers <span class="muted small">'
                    f"(layers {esc(acc.get('layers'))}; located rows outlined: {esc(located)})</span></h3>")
        body.append(shade_tokens([f"s{j} " for j in range(len(scores))], scores, marked=located,
                                 label="column score"))
    if r.get("trigger_error"):
        body.append(f'<p class="bad small">trigger not computed: {esc(r["trigger_error"])}</p>')
    others = [(k, r[k]) for k in ("base", "always", "random") if r.get(k)]
    if others:
        cells = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(a.get('answer'))}</code></td>"
                        f"<td>{_mark(a.get('correct'))}</td><td class=\"small\">"
                        f"{esc(a.get('corrupted_rows', ''))}</td></tr>" for k, a in others)
        body.append(f'<table class="small"><tr><th>baseline</th><th>answer</th><th></th>'
                    f"<th>rows corrupted</th></tr>{cells}</table>")
    return (f'<details class="q" {attrs}{" open" if open_ else ""}><summary>{head}{badges}</summary>'
            f'<div>{"".join(body)}</div></details>')


# =============================================================================================
# IAP: one question (all its prompts), one pair
# =============================================================================================


def iap_flags(q: Mapping[str, Any]) -> dict[str, str]:
    ss = bool((q.get("iap_ss") or {}).get("correct"))
    mv = bool((q.get("iap_mv") or {}).get("correct"))
    return {"ss": str(int(ss)), "mv": str(int(mv)), "oracle": str(int(bool(q.get("oracle")))),
            "majority": str(int(bool((q.get("majority") or {}).get("correct"))))}


def iap_question(q: Mapping[str, Any], pairs: Sequence[Mapping[str, Any]], index: int | None = None) -> str:
    """One IAP question: every prompt's rationale, answer (right or wrong), flow score (IAP-ss and
    IAP-mv) and its flows; the prompt IAP-ss chose highlighted, IAP-mv's voters marked."""
    flags = iap_flags(q)
    attrs = " ".join(f'data-{k}="{v}"' for k, v in flags.items()) + f' data-qid="{esc(q.get("id"))}"'
    ss, mv = q.get("iap_ss") or {}, q.get("iap_mv") or {}
    by_p = {int(p.get("prompt_index", -1)): p for p in pairs}
    scores_ss, scores_mv = q.get("scores_ss") or [], q.get("scores_mv") or []
    considered = set(int(i) for i in (mv.get("considered") or []))
    rows = []
    n = max(len(q.get("answers") or []), len(by_p))
    for i in range(n):
        p = by_p.get(i, {})
        chosen = i == ss.get("index")
        tags = (" <b>← IAP-ss</b>" if chosen else "") + (" <span class=\"small\">(mv voter)</span>"
                                                          if i in considered else "")
        ans = (q.get("answers") or [None] * n)[i] if i < len(q.get("answers") or []) else p.get("answer")
        cor = (q.get("correct") or [None] * n)[i] if i < len(q.get("correct") or []) else p.get("correct")
        fm = p.get("flow_means") or {}
        fm_txt = "<br>".join(f"{esc(k)} {_num(v, '.3g')}" for k, v in fm.items())
        rows.append(
            f'<tr class="{"chosen" if chosen else ""}"><td class="num">{i}</td>'
            f"<td>{esc(p.get('prompt', ''))}<div class=\"muted small\">{esc(p.get('group', ''))}</div></td>"
            f'<td class="text small">{esc(p.get("rationale", ""))}</td><td><code>{esc(ans)}</code> '
            f"{_mark(cor)}{tags}</td>"
            f'<td class="num">{_num(scores_ss[i] if i < len(scores_ss) else None, ".3f")}</td>'
            f'<td class="num">{_num(scores_mv[i] if i < len(scores_mv) else None, ".3f")}</td>'
            f'<td class="small">{fm_txt}</td></tr>')
    question = next((p.get("question") for p in pairs if p.get("question")), "")
    badges = (f" IAP-ss {_mark(ss.get('correct'))} · IAP-mv {_mark(mv.get('correct'))}"
              f" · majority {_mark((q.get('majority') or {}).get('correct'))}"
              + ('' if q.get("oracle") else ' <span class="badge">no prompt right</span>')
              + f' <span class="muted small">gold <code>{esc(q.get("gold"))}</code></span>')
    head = f"<b>{'#' + str(index) + ' ' if index is not None else ''}{esc(q.get('id'))}</b>"
    votes = mv.get("votes") or {}
    vote_txt = ", ".join(f"{esc(k)}: {_num(v, '.3g')}" for k, v in votes.items())
    return (f'<details class="q" {attrs}><summary>{head}{badges}</summary><div>'
            f'<p class="text"><b>Q:</b> {esc(question)}</p>'
            f'<p class="small">IAP-ss chose prompt {esc(ss.get("index"))} after trying '
            f'{esc(ss.get("n_tried"))}{" (fallback)" if ss.get("fallback") else ""}, answer '
            f'<code>{esc(ss.get("answer"))}</code>; IAP-mv answered <code>{esc(mv.get("answer"))}</code>'
            f"{' (votes ' + vote_txt + ')' if vote_txt else ''}</p>"
            '<table class="small"><tr><th>#</th><th>prompt</th><th>rationale</th><th>answer</th>'
            "<th>score ss</th><th>score mv</th><th>flows (layer-set means)</th></tr>"
            f'{"".join(rows)}</table></div></details>')


def iap_pair(p: Any) -> str:
    """One IAP (question, prompt) pair: the prompt, its rationale, answer and flows."""
    d = p.to_dict() if hasattr(p, "to_dict") else dict(p)
    for k in ("id", "question", "gold", "answer", "correct"):
        if hasattr(p, k):
            d[k] = getattr(p, k)
    fm = d.get("flow_means") or {}
    rows = "".join(f"<tr><td>{esc(k)}</td><td class=\"num\">{_num(v, '.4g')}</td>"
                   f"<td class=\"small muted\">layers {esc((d.get('layer_sets') or {}).get(k))}</td></tr>"
                   for k, v in fm.items())
    return (f'<div class="box"><b>{esc(d.get("id") if d.get("id") is not None else d.get("question_index"))}'
            f"</b> · prompt {esc(d.get('prompt_index'))} <span class=\"muted\">({esc(d.get('group'))})</span>"
            f'<p class="text"><b>Q:</b> {esc(d.get("question") or "")}</p>'
            f'<p class="text"><b>prompt:</b> {esc(d.get("prompt"))}</p>'
            f'<p class="text"><b>rationale:</b> {esc(d.get("rationale"))}</p>'
            f"<p>answer <code>{esc(d.get('answer'))}</code> {_mark(d.get('correct'))} "
            f"<span class=\"muted small\">gold <code>{esc(d.get('gold'))}</code></span></p>"
            + (f'<table class="small"><tr><th>flow</th><th>mean</th><th></th></tr>{rows}</table>'
               if rows else '<p class="muted small">not scored (empty rationale)</p>') + "</div>")


def json_attr(obj: Any) -> str:
    """``obj`` as JSON, escaped for an attribute value."""
    return esc(json.dumps(obj, ensure_ascii=False))
