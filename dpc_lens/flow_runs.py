"""``dpc-lens flows``: saliency flows of the user's own segmented prompts, without writing code.

Input: a JSONL file whose every line is one prompt as a list of ``[name, text]`` pieces, e.g.
``[["question", "Ann has 3 pens."], ["rationale", " 3 + 2 = 5."]]`` (each piece is tokenised on
its own, :func:`dpc_lens.segments.encode_pieces`), and optionally a PEFT soft prompt (put first,
as the segment ``soft``). One teacher-forced forward + backward per batch
(:func:`dpc_lens.saliency.compute_saliency`), the loss over ``loss_segments``.

Output in ``out_dir`` (:func:`run_flows`):

* ``flows.parquet`` and ``flows.csv``: the tidy table, one row per (layer, example, [head,]
  source, target) with ``sum`` (of ``I_l`` over the segment pair), ``count`` (pairs, ``j < i``,
  diagonal excluded) and ``mean = sum / count`` (:meth:`SaliencyResult.to_dataframe`);
* ``flow_curves.png``: the per-layer flow curves over the examples;
* ``tokens.html``: every example's tokens shaded by the flow they send into the loss segments,
  with the segment flow table (:mod:`dpc_lens.plotting.html`);
* ``flows.jsonl`` (one record per example, appended as soon as its batch is done, so
  ``resume=True`` continues a killed run) and ``flows_settings.json`` (what the records depend
  on; a resume with other settings is refused). The directory is locked while the run writes.

Every input is checked before the model runs: malformed lines, a segment named twice, loss
segments no prompt has, and a soft prompt of another width raise a dpc_lens error and leave the
output directory as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from .errors import DataError, InputError

__all__ = ["read_segmented_prompts", "run_flows", "parse_layers", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("layer", "example", "source", "target", "sum", "count", "mean")
DEFAULT_LOSS = ("rationale", "answer")


def parse_layers(text: str | None) -> Any:
    """The command line's ``--layers``: ``all`` (None), ``shallow`` / ``deep``, a comma list of
    indices (``0,1,-1``) or a fraction band ``a:b`` (``0.5:1``), checked by the one layer grammar
    (:mod:`dpc_lens.layers`)."""
    from .layers import normalize_layer_spec

    if text is None or text.strip().lower() in ("", "all"):
        return None
    t = text.strip()
    if t in ("shallow", "deep"):
        spec: Any = t
    elif ":" in t:
        try:
            a, b = (float(x) for x in t.split(":"))
        except ValueError:
            raise InputError(f"--layers {text!r}: a band is two fractions a:b, e.g. 0.5:1.") from None
        spec = (a, b)
    else:
        try:
            spec = [int(x) for x in t.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--layers {text!r}: expected all, shallow, deep, a comma list of layer "
                             "indices (0,1,-1) or a fraction band a:b (0.5:1).") from None
    return normalize_layer_spec(spec, "--layers")


def read_segmented_prompts(path: str | os.PathLike) -> list[list[tuple[str, str]]]:
    """The prompts of a JSONL file, one list of ``[name, text]`` pieces per non-empty line.

    Raises:
        DataError: the file is missing or empty, a line is not JSON, not a list of
            ``[name, text]`` pairs, or names a segment twice (the message gives the line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"--prompts {path!r} does not exist. Give a JSONL file with one prompt per line, "
                        'each a list of [name, text] pieces: [["question", "..."], ["rationale", "..."]].')
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not JSON ({exc.msg}). Each line is one prompt: a list of "
                                '[name, text] pieces, e.g. [["question", "2+2?"], ["answer", " 4"]].'
                                ) from None
            if not isinstance(obj, list) or not obj:
                raise DataError(f"{where} is a {type(obj).__name__}, not a non-empty list of [name, text] "
                                'pieces, e.g. [["question", "2+2?"], ["answer", " 4"]].')
            pieces, seen = [], set()
            for k, piece in enumerate(obj):
                if (not isinstance(piece, list) or len(piece) != 2 or not isinstance(piece[0], str)
                        or not isinstance(piece[1], str) or not piece[0]):
                    raise DataError(f"{where}, piece {k} is {json.dumps(piece)[:80]}; expected [name, text] "
                                    "with two strings, a non-empty name.")
                if piece[0] in seen:
                    raise DataError(f"{where} names the segment {piece[0]!r} twice; segment names are "
                                    "unique within a prompt (use two names, e.g. label0 and label1).")
                seen.add(piece[0])
                pieces.append((piece[0], piece[1]))
            out.append(pieces)
    if not out:
        raise DataError(f"--prompts {path!r} holds no prompt (every line is empty).")
    return out


def _check_prompt_loss_segments(prompts: Sequence[Sequence[tuple[str, str]]],
                                loss: Sequence[str]) -> None:
    names: list[str] = []
    for p in prompts:
        names += [n for n, _ in p if n not in names]
    unknown = [s for s in loss if s not in names]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"--loss-segments names {unknown}{hint}, which no prompt has; the prompts' "
                         f"segments are {names}. Pass --loss-segments with some of them.")
    lacking = [i for i, p in enumerate(prompts) if not any(n in loss for n, _ in p)]
    if lacking:
        raise InputError(f"prompts {lacking[:5]} (0-based lines) have none of the loss segments "
                         f"{list(loss)}; every prompt needs a target for the saliency loss. Give them "
                         "such a piece, or choose --loss-segments they all have.")


def _settings(model: str, soft: str | None, layers: Any, per_head: bool, loss: Sequence[str],
              bos: bool, prompts: Sequence[Any]) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"model": model, "soft_prompt": soft,
            "layers": layers if not isinstance(layers, tuple) else list(layers),
            "per_head": per_head, "loss_segments": list(loss), "bos": bos, "prompts_sha256": digest,
            "n_prompts": len(prompts)}


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with Python numbers (exact in JSON: ``repr`` of a float round-trips, where
    ``DataFrame.to_json`` keeps 10 decimal places and loses small flows)."""
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows]


def _records_of(res: Any, ids: Sequence[int], pieces: Sequence[Sequence[tuple[str, str]]],
                tokenizer: Any) -> list[dict[str, Any]]:
    """One JSON record per example of a saliency result: its tidy rows, tokens and per-token
    flow into the loss segments (mean over layers, heads summed)."""
    from .generation import token_texts
    from .plotting.html import saliency_token_scores

    df = res.to_dataframe()
    out = []
    for b, ex in enumerate(ids):
        rows = df[df["example"] == b].drop(columns=["flow"]).assign(example=ex)
        lay = res.layouts[b]
        lo = min(s for s, e in lay.spans.values() if e > s)
        hi = max(e for _, e in lay.spans.values())
        have = getattr(res, "tokens", None)  # the result's own labels (soft rows, fallback)
        tokens = [str(t) for t in have[b][lo:hi]] if have else [""] * (hi - lo)
        for name, (s, e) in lay.spans.items():
            text = dict(pieces[b]).get(name)
            if isinstance(text, str) and text:  # the text each token adds, spaces included
                ids_ = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids_) == e - s:
                    tokens[s - lo:e - lo] = token_texts(tokenizer, ids_)
                    continue
            if not have:
                tokens[s - lo:e - lo] = [f"<{name} {i}>" for i in range(e - s)]
        scores = saliency_token_scores(res, b)
        flows = {f"{s}->{t}": [float(v) for v in res.flow(s, t)[:, b].tolist()]
                 for t in res.segment_names for s in res.segment_names
                 if float(res.pair_counts[b, res.segment_names.index(t), res.segment_names.index(s)]) > 0
                 and not res.config.per_head}
        out.append({"id": ex, "rows": _plain(rows.to_dict("records")), "tokens": tokens,
                    "token_flow": scores["values"], "token_flow_label": scores["label"],
                    "segments": {n: [s - lo, e - lo] for n, (s, e) in lay.spans.items()},
                    "layers": list(res.layers), "flows": flows, "loss": float(res.loss[b])})
    return out


def run_flows(
    model: Any,
    prompts: Sequence[Sequence[tuple[str, str]]],
    out_dir: str | os.PathLike,
    *,
    soft_prompt: Any = None,
    layers: Any = None,
    per_head: bool = False,
    loss_segments: Sequence[str] | None = None,
    bos: bool = True,
    batch_size: int = 8,
    resume: bool = False,
    progress: bool | None = None,
    settings_extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Compute and write the flows of ``prompts`` (see the module docstring); returns the paths
    written (``table``, ``csv``, ``figure``, ``tokens``, ``records``).

    ``loss_segments``: the segments the loss is taken over; each must be in some prompt, and every
    prompt must have one of them. ``None``: those of ``rationale`` and ``answer`` the prompts have.
    """
    from .model import as_adapter
    from .progress import bar
    from .runs import RunLock, append_jsonl, check_out_dir, resume_run, rewrite_jsonl
    from .saliency import SaliencyConfig, compute_saliency
    from .segments import PromptBatch

    out_dir = check_out_dir(out_dir)
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise DataError("no prompts to measure.")
    if loss_segments is None:
        present = {n for p in prompts for n, _ in p}
        loss = tuple(n for n in DEFAULT_LOSS if n in present) or DEFAULT_LOSS
    else:
        loss = tuple(loss_segments)
    _check_prompt_loss_segments(prompts, loss)
    adapter = as_adapter(model)
    tok = adapter.tokenizer
    if soft_prompt is not None:
        soft_prompt.for_model(adapter)  # width check before any work or file
    cfg = SaliencyConfig(layers=layers, per_head=per_head, loss_segments=loss,
                         column_targets=loss)  # per-token flow into the loss segments
    cfg.resolved_layers(adapter.n_layers)  # a layer spec this model cannot resolve: refused now
    add_bos = bos and tok is not None and getattr(tok, "bos_token_id", None) is not None
    examples = [([("bos", [tok.bos_token_id])] if add_bos else []) + p for p in prompts]
    settings = {**_settings(getattr(adapter.cfg, "model_name", "?"), None, layers, per_head, loss,
                            add_bos, prompts), **(settings_extra or {})}
    rec_path = os.path.join(out_dir, "flows.jsonl")
    with RunLock(out_dir, "flows"):
        done = resume_run(
            rec_path, resume=resume, settings_path=os.path.join(out_dir, "flows_settings.json"),
            settings=settings,
            exists_message=(f"{rec_path} already exists. Pass --resume to continue that run, or choose "
                            "another --out."),
            mismatch_message=lambda old, new: (
                f"Cannot resume {out_dir}: its flows were made with other settings (differs in "
                f"{sorted(k for k in new if old.get(k) != new.get(k))}). Resume with the same settings "
                "or start a new --out."),
            redone="their prompts are redone")
        have = {r["id"] for r in done}
        todo = [i for i in range(len(prompts)) if i not in have]
        records = list(done)
        pbar = bar(total=len(todo), progress=progress, desc="flows")
        try:
            for s in range(0, len(todo), batch_size):
                ids = todo[s:s + batch_size]
                batch = PromptBatch.from_pieces(adapter, [examples[i] for i in ids], soft_prompt)
                res = compute_saliency(adapter, batch, cfg)
                new = _records_of(res, ids, [prompts[i] for i in ids], tok)
                append_jsonl(rec_path, new)
                records += new
                pbar.update(len(ids))
        finally:
            pbar.close()
        records.sort(key=lambda r: r["id"])
        rewrite_jsonl(rec_path, records)
        return _write_outputs(out_dir, records, per_head)


def _write_outputs(out_dir: str, records: Sequence[dict[str, Any]], per_head: bool) -> dict[str, str]:
    import pandas as pd

    from .plotting import plot_flow_curves, save
    from .plotting.html import esc, page, shade_tokens

    cols = list(TABLE_COLUMNS[:2]) + (["head"] if per_head else []) + list(TABLE_COLUMNS[2:])
    df = pd.DataFrame([row for r in records for row in r["rows"]])[cols]
    paths = {"table": os.path.join(out_dir, "flows.parquet"), "csv": os.path.join(out_dir, "flows.csv"),
             "figure": os.path.join(out_dir, "flow_curves.png"),
             "tokens": os.path.join(out_dir, "tokens.html"),
             "records": os.path.join(out_dir, "flows.jsonl")}
    df.to_parquet(paths["table"], index=False)
    df.to_csv(paths["csv"], index=False)
    flows = [r["flows"] for r in records if r["flows"]]
    # the flows every prompt has, between different segments
    names = sorted(n for n in set.intersection(*(set(f) for f in flows))
                   if n.split("->")[0] != n.split("->")[1]) if flows else []
    if names:
        save(plot_flow_curves(flows, names, proportions=False,
                              title="Per-layer mean flow between segments (mean ± std over prompts)"),
             paths["figure"])
    else:
        paths.pop("figure")
    parts = []
    for r in records:
        segs = sorted(((n, s, e) for n, (s, e) in r["segments"].items()), key=lambda x: x[1])
        parts.append(f"<h3>prompt {esc(r['id'])} <span class=\"muted small\">loss {r['loss']:.4g}</span></h3>"
                     + shade_tokens(r["tokens"], r["token_flow"], segments=segs, label=r["token_flow_label"]))
    body = ("<h1>dpc-lens flows: token view</h1><p class=\"muted\">each token shaded by the flow it sends "
            "into the loss segments (tooltip: the value); the tidy table is flows.parquet / flows.csv</p>"
            + "".join(parts))
    with open(paths["tokens"], "w", encoding="utf-8") as fh:
        fh.write(page("dpc-lens flows", body))
    return paths
