"""A run's report: one self-contained ``report.html`` built from the run's directory alone.

``dpc-lens report RUN_DIR`` calls :func:`write_report`, and so do ``dpc``, ``iap``, ``calibrate``
and ``demo`` at the end of a run (``--no-report`` skips it). The page reads only the files the
run wrote, and never runs a model:

* **DPC** (``records.jsonl``, ``summary.json``, ``config.json``): the accuracy table with each
  method's paired-bootstrap interval against PT, the trigger and detector diagnostics (trigger
  rate, flips, sinks, where the located soft token sits), every other number of
  ``summary.json``, the config and provenance, a per-question browser with outcome filters (the
  tokens of each PT rationale shaded by their deep soft->rationale flow, split and threshold
  marked) and the standard flow figures.
* **IAP** (``questions.jsonl``, ``pairs.jsonl``, ``summary.json``): the accuracy table, every
  number of ``summary.json`` (score diagnostics and paired differences included, whatever their
  nesting), and per question each prompt's rationale, answer, flow score and which prompt was
  chosen; the IAP flow curves.
* **calibrate** (``calibration.json``, ``dpc_config.json``): the chosen point and the grid.

Every number taken from ``summary.json`` is shown in an element carrying ``data-key`` (its JSON
path) and ``data-value`` (the exact value), so a test can hold the page against the file. Figures
are PNGs inlined as ``data:`` URIs; the page carries a Content-Security-Policy that forbids every
request (:func:`dpc_lens.plotting.html.page`). Every string from data or model output is escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import DataError, DpcLensError
from .html import dpc_flags, dpc_question, esc, iap_flags, iap_question, json_attr, page

__all__ = ["write_report", "report_html", "run_kind", "provenance", "REPORT_NAME"]

REPORT_NAME = "report.html"

#: the most rows of a list of records (e.g. calibration grid points) drawn as a table
_MAX_TABLE_ROWS = 2000


def run_kind(run_dir: str | os.PathLike) -> str:
    """``"dpc"``, ``"iap"`` or ``"calibrate"``: which command wrote ``run_dir`` (by its files)."""
    d = os.fspath(run_dir)
    if not os.path.isdir(d):
        raise DataError(f"{d!r} is not a directory. Give the --out directory of a dpc, iap, calibrate "
                        "or demo run.")
    has = lambda f: os.path.exists(os.path.join(d, f))  # noqa: E731
    if has("records.jsonl"):
        return "dpc"
    if has("questions.jsonl") or has("pairs.jsonl"):
        return "iap"
    if has("calibration.json"):
        return "calibrate"
    raise DataError(f"{d!r} holds no run: expected records.jsonl (dpc, demo), questions.jsonl and "
                    "pairs.jsonl (iap) or calibration.json (calibrate). Give the --out directory of a "
                    "finished or resumable run.")


def _read_json(path: str, required: bool = False) -> Any:
    from ..runs import read_json

    if not os.path.exists(path):
        if required:
            raise DataError(f"{path} does not exist; the run has not finished (its summary is written at "
                            "the end). Finish it with --resume, then make the report.")
        return None
    return read_json(path, os.path.basename(path))


def provenance(**fields: Any) -> dict[str, Any]:
    """What made a run: the given fields (model, soft prompt, data, task, command) plus the
    versions of Python, dpc_lens, torch, transformer_lens and transformers, and the time."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("dpc_lens", "torch", "transformer_lens", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
    return {**{k: v for k, v in fields.items() if v is not None}, "versions": versions,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# =============================================================================================
# Numbers and trees
# =============================================================================================


def _fmt(v: float | int, pct: bool = False) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, int):
        return str(v)
    return format(v, ".4g") if v != 0 else "0"  # no "-0"


def _number(v: Any, path: Sequence[Any] | None, *, pct: bool = False) -> str:
    """A number, with its JSON path and exact value when it comes from summary.json."""
    if isinstance(v, bool) or v is None or not isinstance(v, (int, float)):
        return esc(_fmt(v) if isinstance(v, bool) else ("—" if v is None else v))
    if path is None:
        return esc(_fmt(v, pct))
    scale = ' data-scale="100"' if pct else ""
    return (f'<span class="v" data-key="{json_attr(list(path))}" data-value="{esc(repr(v))}"{scale}>'
            f"{esc(_fmt(v, pct))}</span>")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool)) or (
        isinstance(v, list) and len(v) <= 40 and all(isinstance(x, (int, float)) for x in v))


def _is_matrix(obj: Any) -> bool:
    """Two or more rows, each a dict of scalars (or short number lists such as an interval)."""
    if not isinstance(obj, Mapping):
        return False
    rows = list(obj.values())
    return (len(rows) >= 2 and all(isinstance(v, Mapping) and v for v in rows)
            and all(_scalar(x) for v in rows for x in v.values())
            and len({c for v in rows for c in v}) <= 12)


def _matrix_rows(obj: Mapping[str, Any]) -> list[tuple[tuple[Any, ...], Mapping[str, Any]]] | None:
    """The rows of a dict that reads as a table: ``{row: {col: scalar}}``, or
    ``{group: {row: {col: scalar}}}`` (rows keyed by both); ``None`` for any other dict."""
    if _is_matrix(obj):
        return [((k,), v) for k, v in obj.items()]
    if not obj or not all(isinstance(v, Mapping) and v for v in obj.values()):
        return None
    rows = [((k, r), cells) for k, v in obj.items() for r, cells in v.items()]
    if _is_matrix({i: cells for i, (_, cells) in enumerate(rows)}):
        return rows
    return None


def _tree(obj: Any, path: list[Any], *, tracked: bool = True) -> str:
    """Any JSON value as HTML: dicts as key/value tables (nested), lists of numbers inline, lists
    of dicts as one table, numbers tagged with their path (``tracked``)."""
    p = path if tracked else None
    if isinstance(obj, Mapping):
        if not obj:
            return '<span class="muted">{}</span>'
        subs = {k: v for k, v in obj.items() if isinstance(v, Mapping)}
        if len(subs) < len(obj) and len(subs) >= 2 and _matrix_rows(subs) is not None \
                and all(_scalar(v) for k, v in obj.items() if k not in subs):
            # a few scalars and a table: the scalars as rows, then the table in one row
            rows_html = "".join(f"<tr><th>{esc(k)}</th><td>{_tree(v, path + [k], tracked=tracked)}</td></tr>"
                                for k, v in obj.items() if k not in subs)
            return (f"<table>{rows_html}<tr><td colspan=\"2\">{_tree(subs, path, tracked=tracked)}"
                    "</td></tr></table>")
        if all(_scalar(v) and not isinstance(v, (list, str)) for v in obj.values()) and len(obj) <= 40 \
                and all(str(k).lstrip("-").isdigit() for k in obj):
            # {position: count}: inline
            return ", ".join(f"{esc(k)}: {_tree(v, path + [k], tracked=tracked)}" for k, v in obj.items())
        rows = _matrix_rows(obj)
        if rows is not None:  # {row: {col: scalar}} (or one level deeper): one table
            cols: list[str] = []
            for _, v in rows:
                cols += [c for c in v if c not in cols]
            depth = len(rows[0][0])
            head = "<th></th>" * depth + "".join(f"<th>{esc(c)}</th>" for c in cols)
            body = "".join(
                "<tr>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "".join(
                    f"<td>{_tree(v[c], path + list(keys) + [c], tracked=tracked) if c in v else ''}</td>"
                    for c in cols) + "</tr>" for keys, v in rows)
            return f'<table class="small"><tr>{head}</tr>{body}</table>'
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{_tree(v, path + [k], tracked=tracked)}</td></tr>"
                       for k, v in obj.items())
        return f"<table>{rows}</table>"
    if isinstance(obj, list):
        if not obj:
            return '<span class="muted">[]</span>'
        if all(isinstance(x, Mapping) for x in obj):
            cols: list[str] = []
            for x in obj:
                cols += [k for k in x if k not in cols]
            body = []
            for i, x in enumerate(obj[:_MAX_TABLE_ROWS]):
                cells = "".join(f"<td>{_tree(x[c], path + [i, c], tracked=tracked) if c in x else ''}</td>"
                                for c in cols)
                body.append(f"<tr>{cells}</tr>")
            more = (f'<p class="muted small">{len(obj) - _MAX_TABLE_ROWS} more rows in the file</p>'
                    if len(obj) > _MAX_TABLE_ROWS else "")
            head = "".join(f"<th>{esc(c)}</th>" for c in cols)
            return f'<table class="small"><tr>{head}</tr>{"".join(body)}</table>{more}'
        if all(isinstance(x, str) for x in obj) and any(len(x) > 40 for x in obj):
            return '<ul class="small">' + "".join(f"<li>{esc(x)}</li>" for x in obj) + "</ul>"
        return "[" + ", ".join(_tree(x, path + [i], tracked=tracked) for i, x in enumerate(obj)) + "]"
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return _number(obj, p)
    if obj is None:
        return '<span class="muted">null</span>'
    return esc(_fmt(obj) if isinstance(obj, bool) else obj)


# =============================================================================================
# Figures
# =============================================================================================


def _png(fig: Any) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(jobs: Sequence[tuple[str, Any]]) -> str:
    out = []
    for title, build in jobs:
        try:
            b64 = _png(build())
        except (DpcLensError, ValueError, KeyError, IndexError) as exc:
            out.append(f'<p class="muted small">{esc(title)}: not drawn ({esc(exc)})</p>')
            continue
        out.append(f'<figure style="display:inline-block;margin:0"><img class="fig" alt="{esc(title)}" '
                   f'src="data:image/png;base64,{b64}"><figcaption class="small muted">{esc(title)}'
                   "</figcaption></figure>")
    return "".join(out)


# =============================================================================================
# Page parts
# =============================================================================================


_SCRIPT = """
(function(){
const qs=Array.from(document.querySelectorAll('details.q'));
const F=JSON.parse(document.getElementById('filters').dataset.filters);
const shown=document.getElementById('shown');
const buttons=Array.from(document.querySelectorAll('.filters button'));
function match(d,cond){for(const k in cond){if(d[k]!==cond[k])return false}return true}
function apply(name){
  if(!(name in F))name='all';
  let k=0;
  for(const q of qs){const ok=match(q.dataset,F[name]);q.hidden=!ok;if(ok)k++}
  shown.textContent=String(k);
  for(const b of buttons)b.classList.toggle('on',b.dataset.f===name);
  document.body.dataset.filter=name;
  try{history.replaceState(null,'','#filter='+name)}catch(e){}
}
for(const b of buttons)b.addEventListener('click',function(){apply(b.dataset.f)});
document.getElementById('expand').addEventListener('click',function(){
  const open=!qs.some(q=>!q.hidden&&q.open);for(const q of qs)if(!q.hidden)q.open=open});
const H=location.hash;
const m=/filter=([a-z_]+)/.exec(H);apply(m?m[1]:'all');
const q=/[#&]q=([^&]+)/.exec(H);
if(q){const id=decodeURIComponent(q[1]);const el=qs.find(e=>e.dataset.qid===id);
  if(el){el.hidden=false;el.open=true;el.scrollIntoView()}}
})();
"""


def _browser(cards: Sequence[str], flags: Sequence[Mapping[str, str]],
             filters: Sequence[tuple[str, str, Mapping[str, str]]]) -> str:
    spec = {key: dict(cond) for key, _, cond in filters}
    buttons = []
    for key, label, cond in filters:
        n = sum(1 for f in flags if all(f.get(k) == v for k, v in cond.items()))
        buttons.append(f'<button type="button" data-f="{esc(key)}" data-count="{n}">{esc(label)} ({n})'
                       "</button>")
    return (f'<div class="filters" id="filters" data-filters="{json_attr(spec)}">{"".join(buttons)}'
            f'<button type="button" id="expand">open / close all shown</button></div>'
            f'<p class="small muted">showing <b id="shown">{len(cards)}</b> of {len(cards)} questions '
            "(click one to open it)</p>" + "".join(cards))


def _versions_note() -> str:
    from .. import __version__

    return (f"report written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by "
            f"dpc_lens {esc(__version__)} (Python {esc(platform.python_version())})")


def _config_section(run_dir: str, names: Sequence[str]) -> str:
    parts = []
    prov = _read_json(os.path.join(run_dir, "provenance.json"))
    if prov is not None:
        parts.append("<h3>Provenance (provenance.json)</h3>" + _tree(prov, [], tracked=False))
    else:
        parts.append('<p class="muted small">no provenance.json in this run (written by the dpc-lens '
                     "commands); the model, soft prompt and data are not recorded.</p>")
    for name in names:
        cfg = _read_json(os.path.join(run_dir, name))
        if cfg is not None:
            parts.append(f"<h3>{esc(name)}</h3>" + _tree(cfg, [], tracked=False))
    return '<h2 id="config">Config and provenance</h2><div id="config-body">' + "".join(parts) + "</div>"


def _header(kind: str, run_dir: str, n_text: str, warning: str | None = None) -> str:
    title = {"dpc": "DPC run", "iap": "IAP run", "calibrate": "DPC calibration"}[kind]
    warn = (f'<p class="box bad" id="degenerate">{esc(warning)}</p>' if warning else "")
    return (f"<h1>dpc-lens report: {title}</h1><p class=\"muted\">{esc(os.path.abspath(run_dir))} · "
            f"{esc(n_text)} · {_versions_note()}</p>{warn}"
            '<p class="small"><a href="#summary">summary</a> · <a href="#questions">questions</a> · '
            '<a href="#figures">figures</a> · <a href="#config">config</a></p>')


# =============================================================================================
# DPC
# =============================================================================================

_DPC_METHODS = ("base", "pt", "dpc", "always", "random", "oracle")
_DPC_ROW = {
    "base": "the model alone, no soft prompt", "pt": "vanilla prompt tuning",
    "dpc": "PT, regenerated with the located soft rows zeroed where the trigger fired",
    "always": "the located rows zeroed on every question",
    "random": "random soft rows zeroed (mean of draws)",
    "oracle": "best of base / PT per question",
}


def _per_question(r: Mapping[str, Any], method: str) -> float | None:
    if method == "random" and r.get("random_draws"):
        d = r["random_draws"]
        return sum(bool(a.get("correct")) for a in d) / len(d)
    a = r.get(method)
    return float(bool(a.get("correct"))) if isinstance(a, Mapping) else None


def _regime(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    """The regime DPC needs, in sentences: the soft prompt helps (PT beats base), some questions
    are right without it and wrong with it (the ceiling a trigger could recover), the trigger
    fires on some questions but not all."""
    from ..evaluation import paired_bootstrap

    acc = summary.get("accuracy") or {}
    run = [r for r in records if not r.get("skipped")]
    out = []
    if "base" in acc and run and all(isinstance(r.get("base"), Mapping) for r in run):
        d, lo, hi = paired_bootstrap([_per_question(r, "pt") for r in run],
                                     [_per_question(r, "base") for r in run])
        verdict = ("the soft prompt helps" if lo > 0 else "the soft prompt hurts" if hi < 0
                   else "no evidence that the soft prompt helps")
        out.append(f"PT − base {_fmt(d, True)} [{_fmt(lo, True)}, {_fmt(hi, True)}]: {verdict}.")
    if "ceiling" in summary:
        out.append(f"{summary['ceiling']} question(s) right without the soft prompt and wrong with it: "
                   f"the most any trigger could recover ({summary.get('pt_only', '?')} the other way).")
    rate = summary.get("trigger_rate")
    if isinstance(rate, (int, float)):
        how = ("never fires: DPC is PT here" if rate == 0 else "fires on every question: DPC is "
               "always-corrupt here" if rate == 1 else "fires on some questions, not all")
        out.append(f"The trigger {how} ({_fmt(rate, True)}).")
    if not out:
        return ""
    return "<h3>Regime checks</h3><ul>" + "".join(f"<li>{esc(x)}</li>" for x in out) + "</ul>"


def _dpc_accuracy(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    from ..evaluation import paired_bootstrap

    acc = summary.get("accuracy") or {}
    run = [r for r in records if not r.get("skipped")]
    pt = [_per_question(r, "pt") for r in run]
    rows = []
    for m in [m for m in _DPC_METHODS if m in acc] + [m for m in acc if m not in _DPC_METHODS]:
        diff = ""
        if m == "dpc" and isinstance(summary.get("dpc_minus_pt"), Mapping):
            d = summary["dpc_minus_pt"]
            ci = d.get("ci95") or [None, None]
            diff = (f"{_number(d.get('diff'), ['dpc_minus_pt', 'diff'], pct=True)} "
                    f"[{_number(ci[0], ['dpc_minus_pt', 'ci95', 0], pct=True)}, "
                    f"{_number(ci[1], ['dpc_minus_pt', 'ci95', 1], pct=True)}]")
        elif m not in ("pt", "oracle") and run:
            mine = [_per_question(r, m) for r in run]
            if all(v is not None for v in mine) and all(v is not None for v in pt):
                d, lo, hi = paired_bootstrap(mine, pt)
                diff = (f'<span class="muted" title="computed by the report from records.jsonl '
                        f'(paired bootstrap, 2000 resamples, seed 0)">{_fmt(d, True)} [{_fmt(lo, True)}, '
                        f"{_fmt(hi, True)}]*</span>")
        rows.append(f"<tr><td><b>{esc(m)}</b></td><td class=\"num\">"
                    f"{_number(acc[m], ['accuracy', m], pct=True)}</td><td class=\"num\">{diff}</td>"
                    f"<td class=\"small muted\">{esc(_DPC_ROW.get(m, ''))}</td></tr>")
    return ('<table id="accuracy"><tr><th>method</th><th>accuracy</th><th>minus PT, 95% paired-bootstrap '
            f'interval</th><th></th></tr>{"".join(rows)}</table><p class="small muted">n = '
            f"{_number(summary.get('n'), ['n'])} questions; * interval computed by this report from the "
            "records (the DPC row's is summary.json's).</p>")


def _located_histogram(records: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[int, int] = {}
    n_soft = 0
    for r in records:
        rows = r.get("located_rows") or []
        if rows:
            counts[int(rows[0])] = counts.get(int(rows[0]), 0) + 1
        sc = ((r.get("trigger") or {}).get("accumulation") or {}).get("scores")
        n_soft = max(n_soft, len(sc) if sc else 0, (max(rows) + 1) if rows else 0)
    if not counts:
        return ""
    top = max(counts.values())
    bars = "".join(f'<div title="soft position {j}: {counts.get(j, 0)} questions" '
                   f'style="height:{max(1, round(64 * counts.get(j, 0) / top))}px"></div>'
                   for j in range(n_soft))
    ticks = "".join(f'<span style="display:inline-block;width:18px;text-align:center">{j}</span>'
                    for j in range(n_soft))
    return ('<h3>Where the located soft token sits (top-1 per question)</h3>'
            f'<div class="bars" id="located-hist">{bars}</div><div class="small muted">{ticks}</div>')


def _dpc_report(run_dir: str, figures: bool) -> str:
    from ..runs import read_records

    records = read_records(os.path.join(run_dir, "records.jsonl"))
    if not records:
        raise DataError(f"{run_dir}/records.jsonl holds no records; run DPC into it first.")
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if summary is None:
        from ..dpc import summarize

        summary = summarize(records)
        note = ('<p class="bad small">summary.json is missing (the run did not finish); these numbers '
                "are summarised from the records on disk.</p>")
    else:
        note = ""
    rest = {k: v for k, v in summary.items() if k not in ("accuracy", "dpc_minus_pt")}
    trig_keys = ("trigger_rate", "flips", "trigger_auc", "sink_rate", "located_token", "trigger_errors",
                 "ceiling", "pt_only")
    trig = {k: rest.pop(k) for k in trig_keys if k in rest}
    warning = (trig.get("located_token") or {}).get("warning") if isinstance(trig.get("located_token"),
                                                                            Mapping) else None
    summary_html = (note + "<h3>Accuracy</h3>" + _dpc_accuracy(summary, records)
                    + _regime(summary, records)
                    + "<h3>Trigger and detector</h3>"
                    + (f'<p class="box bad small">{esc(warning)}</p>' if warning else "")
                    + (_tree(trig, []) if trig else '<p class="muted">none</p>')
                    + _located_histogram(records)
                    + ("<h3>Everything else in summary.json</h3>" + _tree(rest, []) if rest else ""))
    flags = [dpc_flags(r) for r in records]
    cards = [dpc_question(r, i) for i, r in enumerate(records)]
    filters = [("all", "all", {}), ("rw", "flipped right → wrong", {"flip": "rw"}),
               ("wr", "flipped wrong → right", {"flip": "wr"}), ("fired", "trigger fired", {"fired": "1"}),
               ("not_fired", "not fired", {"fired": "0"}), ("dpc_right", "DPC right", {"dpc": "1"}),
               ("dpc_wrong", "DPC wrong", {"dpc": "0"}), ("pt_right", "PT right", {"pt": "1"}),
               ("pt_wrong", "PT wrong", {"pt": "0"})]
    if any(f.get("skipped") for f in flags):
        filters.append(("skipped", "skipped", {"skipped": "1"}))
    fig_html = '<p class="muted">figures skipped (--no-figures)</p>'
    if figures:
        from ..dpc import DPCRecord
        from .dpc import plot_before_after, plot_contingency, plot_correct_vs_wrong
        from .saliency import plot_flow_curves

        typed = [DPCRecord.from_dict(r) for r in records if not r.get("skipped")]
        jobs = []
        if any(r.flows for r in typed):
            jobs += [("flow curves (proportions of the DPC flows per layer)",
                      lambda: plot_flow_curves(typed, proportions=True)),
                     ("deep flows, PT right vs wrong", lambda: plot_correct_vs_wrong(typed))]
        if any(r.trigger for r in typed):
            jobs.append(("Fig. 5 contingency", lambda: plot_contingency(typed)))
        jobs.append(("before / after", lambda: plot_before_after(typed)))
        fig_html = _figures(jobs)
    n_text = f"{len(records)} questions"
    return (_header("dpc", run_dir, n_text) + f'<h2 id="summary">Summary</h2><div id="summary-body">'
            f"{summary_html}</div>" + '<h2 id="questions">Questions</h2>' + _browser(cards, flags, filters)
            + f'<h2 id="figures">Figures</h2>{fig_html}' + _config_section(run_dir, ["config.json"]))


# =============================================================================================
# IAP
# =============================================================================================


def _iap_accuracy(summary: Mapping[str, Any]) -> str:
    acc = summary.get("accuracy") or {}
    rows = []
    for name in ("iap_ss", "iap_mv", "majority", "oracle"):
        if name in acc and isinstance(acc[name], (int, float)):
            rows.append(f"<tr><td><b>{esc(name)}</b></td><td class=\"num\">"
                        f"{_number(acc[name], ['accuracy', name], pct=True)}</td></tr>")
    for prompt, v in (acc.get("single") or {}).items():
        rows.append(f"<tr><td>single: {esc(prompt)}</td><td class=\"num\">"
                    f"{_number(v, ['accuracy', 'single', prompt], pct=True)}</td></tr>")
    best = acc.get("best_single")
    if isinstance(best, Mapping):
        rows.append(f"<tr><td>best single on these questions (in-sample): {esc(best.get('prompt'))}</td>"
                    "<td class=\"num\">"
                    f"{_number(best.get('accuracy'), ['accuracy', 'best_single', 'accuracy'], pct=True)}"
                    "</td></tr>")
    extra = {k: v for k, v in acc.items() if k not in ("iap_ss", "iap_mv", "majority", "oracle", "single",
                                                       "best_single")}
    more = _tree(extra, ["accuracy"]) if extra else ""
    return f'<table id="accuracy"><tr><th>method</th><th>accuracy</th></tr>{"".join(rows)}</table>{more}'


def _iap_report(run_dir: str, figures: bool) -> str:
    from ..runs import read_records

    qpath, ppath = os.path.join(run_dir, "questions.jsonl"), os.path.join(run_dir, "pairs.jsonl")
    questions = read_records(qpath) if os.path.exists(qpath) else []
    pairs = (read_records(ppath, key=lambda r: (r.get("id"), r.get("prompt_index")))
             if os.path.exists(ppath) else [])
    if not questions:
        raise DataError(f"{qpath} holds no decisions (the IAP run has not finished); finish it with "
                        "--resume, then make the report.")
    summary = _read_json(os.path.join(run_dir, "summary.json"), required=True)
    by_q: dict[Any, list[Mapping[str, Any]]] = {}
    for p in pairs:
        by_q.setdefault(p.get("id"), []).append(p)
    lead = ("score_diagnostics", "paired_differences", "reference_prompts", "warnings")
    titles = {"score_diagnostics": "Does the flow score tell right from wrong answers? (AUC, 95% interval)",
              "paired_differences": "Paired differences against reference prompts (95% intervals)",
              "reference_prompts": "Reference prompts", "warnings": "Warnings"}
    rest = {k: v for k, v in summary.items() if k not in ("accuracy", "degenerate") + lead}
    degenerate = summary.get("degenerate")
    summary_html = ("<h3>Accuracy</h3>" + _iap_accuracy(summary)
                    + (f"<h3>Degenerate calibration</h3><p>{_tree(degenerate, ['degenerate'])}</p>"
                       if "degenerate" in summary else "")
                    + "".join(f"<h3>{esc(titles[k])}</h3>{_tree(summary[k], [k])}"
                              for k in lead if k in summary)
                    + "<details><summary><b>Everything else in summary.json</b> (cost, pool, standardiser, "
                    f"config, ...)</summary>{_tree(rest, [])}</details>")
    flags = [iap_flags(q) for q in questions]
    cards = [iap_question(q, by_q.get(q.get("id"), []), i) for i, q in enumerate(questions)]
    filters = [("all", "all", {}), ("ss_right", "IAP-ss right", {"ss": "1"}),
               ("ss_wrong", "IAP-ss wrong", {"ss": "0"}), ("mv_right", "IAP-mv right", {"mv": "1"}),
               ("mv_wrong", "IAP-mv wrong", {"mv": "0"}),
               ("missed", "a prompt was right, IAP-ss wrong", {"oracle": "1", "ss": "0"}),
               ("none_right", "no prompt right", {"oracle": "0"})]
    fig_html = '<p class="muted">figures skipped (--no-figures)</p>'
    if figures:
        from .saliency import IAP_FLOWS, plot_flow_curves

        flows = [p["flows"] for p in pairs if p.get("flows")]
        right = [p["flows"] for p in pairs if p.get("flows") and p.get("correct")]
        wrong = [p["flows"] for p in pairs if p.get("flows") and p.get("correct") is False]
        jobs = [("IAP flow curves, every (question, prompt) pair",
                 lambda: plot_flow_curves(flows, IAP_FLOWS, proportions=True))]
        if right and wrong:
            jobs += [("pairs whose answer is right", lambda: plot_flow_curves(
                        right, IAP_FLOWS, proportions=False, title="raw flows, right answers")),
                     ("pairs whose answer is wrong", lambda: plot_flow_curves(
                        wrong, IAP_FLOWS, proportions=False, title="raw flows, wrong answers"))]
        if "score_diagnostics" in summary or "paired_differences" in summary:
            from .iap import plot_paired_differences, plot_score_auc

            if "score_diagnostics" in summary:
                jobs.append(("does the score rank prompts? (AUC, 0.5 = chance)",
                             lambda: plot_score_auc(summary)))
            if "paired_differences" in summary:
                jobs.append(("paired differences with 95% intervals",
                             lambda: plot_paired_differences(summary)))
        fig_html = _figures(jobs) if flows else '<p class="muted">no scored pair</p>'
    n_text = f"{len(questions)} questions × {summary.get('n_prompts', '?')} prompts"
    warn = f"degenerate: {degenerate}" if isinstance(degenerate, str) and degenerate else None
    return (_header("iap", run_dir, n_text, warn) + f'<h2 id="summary">Summary</h2><div id="summary-body">'
            f"{summary_html}</div>" + '<h2 id="questions">Questions</h2>' + _browser(cards, flags, filters)
            + f'<h2 id="figures">Figures</h2>{fig_html}'
            + _config_section(run_dir, ["config.json", "pair_settings.json", "standardizer.json"]))


# =============================================================================================
# calibrate
# =============================================================================================


def _calibrate_report(run_dir: str) -> str:
    cal = _read_json(os.path.join(run_dir, "calibration.json"), required=True)
    accs = [k for k in ("pt_accuracy", "best_accuracy", "always_accuracy", "corruption_oracle_accuracy")
            if isinstance(cal.get(k), (int, float))]
    rows = "".join(f"<tr><td>{esc(k.replace('_accuracy', '').replace('_', ' '))}</td><td class=\"num\">"
                   f"{_number(cal[k], [k], pct=True)}</td></tr>" for k in accs)
    lead = ("best_point", "best_trigger_rate", "trigger_auc", "n_examples", "n_generations", "remarks",
            "notes")
    head = {k: cal[k] for k in lead if k in cal}
    rest = {k: v for k, v in cal.items() if k not in lead and k not in accs}
    body = ('<h2 id="summary">Summary</h2><div id="summary-body"><h3>Dev accuracy (the chosen point vs '
            f'PT)</h3><table id="accuracy"><tr><th>on dev</th><th>accuracy</th></tr>{rows}</table>'
            + _tree(head, [])
            + "<details><summary><b>Everything else in calibration.json</b> (every grid point, "
            f"sensitivity, config, timings)</summary>{_tree(rest, [])}</details></div>"
            '<h2 id="questions">Questions</h2><p class="muted">a calibration keeps no per-question '
            'records; run dpc with the chosen config to browse questions.</p>'
            '<h2 id="figures">Figures</h2><p class="muted">none for a calibration</p>')
    gens = cal.get("n_generations", "?")
    gens = gens.get("total", "?") if isinstance(gens, Mapping) else gens
    n_text = (f"{cal.get('n_examples', '?')} dev questions, {cal.get('n_points', '?')} grid points, "
              f"{gens} generations")
    return _header("calibrate", run_dir, n_text) + body + _config_section(run_dir, ["dpc_config.json"])


# =============================================================================================
# Entry points
# =============================================================================================


def report_html(run_dir: str | os.PathLike, *, figures: bool = True) -> str:
    """The report page of the run in ``run_dir`` (see the module docstring)."""
    d = os.fspath(run_dir)
    kind = run_kind(d)
    if kind == "dpc":
        body = _dpc_report(d, figures)
    elif kind == "iap":
        body = _iap_report(d, figures)
    else:
        body = _calibrate_report(d)
    script = _SCRIPT if kind != "calibrate" else ""
    return page(f"dpc-lens report: {os.path.basename(os.path.abspath(d))}", body, script=script)


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 figures: bool = True) -> str:
    """Write ``run_dir/report.html`` (or ``out``) atomically and return its path."""
    d = os.fspath(run_dir)
    text = report_html(d, figures=figures)
    path = os.fspath(out) if out is not None else os.path.join(d, REPORT_NAME)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f"cannot write the report to {path!r}: {parent!r} is not a directory.")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path
