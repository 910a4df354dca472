"""The evidence table: does DPC beat vanilla prompt tuning on a test bed?

One prompt-tuned generation and one saliency pass per test question are shared by every row;
each DPC variant only re-runs the (cheap) detector on the cached tensors and generates the
corrupted prompts it needs (each distinct ``(question, corrupted rows)`` pair once).

Rows: base model (no soft prompt), vanilla PT, DPC with the calibrated config, DPC variants
(raw vs normalised statistics, k = 1, 2, 3), corruption on every instance (the located top-k),
random corruption of the same number of tokens (mean over seeded draws, with its spread, as
the demo reports it), and the oracle (best of base / PT per
question). Each row reports accuracy and the paired-bootstrap 95% interval of its difference
against vanilla PT (same resampled questions for both, 2000 resamples). Also: the ceiling
(right without the prompt, wrong with it), the accumulation x deep-flow-change contingency
(the paper's Fig. 5), and the deep soft->rationale flow in correct vs wrong PT answers.

Issue 19's rows and diagnostics, as options: ``--locators paper,sink_excluded,z`` adds, for each
locator besides the calibrated config's, DPC under the calibrated trigger and corruption of every
instance with that locator (``sink_excluded``: the argmax with the sinks detected from attention
received excluded; ``z``: the dev-relative z locator, its profile fitted on ``--profile-dev`` dev
questions and saved beside the output); the random baseline is reported twice, unrestricted and
drawn from the sink-excluded candidates (each the mean of ``--random-draws`` draws with its
spread); every locator's located-position histogram (distinct positions, modal share, entropy),
the detected sinks per layer band, and the calibrated trigger's AUC for "corruption helps vs
hurts" and "PT wrong and base right". ``--modal`` then corrupts each locator's modal position on
every question (a final pass, resumable in ``<out>.modal.jsonl``) for the paired test of
per-question locating against always zeroing the modal position. ``--dry-run`` prints what would
run and exits.

Usage: ``python benchmarks/evidence_table.py [--testbed reasoner|real] [--limit N]``: the
shipped reasoner test bed (``dpc_lens/data``, writes ``benchmarks/results/evidence_arith.json``)
or the real one, SmolLM2-135M-Instruct with its tuned adapter (``dpc_lens.testbed.real``, writes
``benchmarks/results/evidence_real.json``); prints a Markdown table. Questions are processed in
chunks whose per-question outcomes are appended to ``<out>.records.jsonl`` as they finish, so a
killed run continues where it stopped (``--fresh`` starts over); the JSON is rewritten after
every chunk with ``n`` the questions done so far.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from dpc_lens.dpc import (
    DPCConfig,
    LocatorProfile,
    analyse,
    dynamic_trigger,
    encode_questions,
    instance_adaptivity,
    locating_vs_modal,
    random_rows_for,
    resolve_layers,
    trigger_auc,
)
from dpc_lens.dpc.detector import sink_positions
from dpc_lens.dpc.diagnostics import adaptivity_warning
from dpc_lens.dpc.locate import candidate_positions
from dpc_lens.evaluation import grade, paired_bootstrap
from dpc_lens.generation import generate
from dpc_lens.model import as_adapter, load_model
from dpc_lens.patching import corrupt_soft_prompt
from dpc_lens.runs import read_records
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks import get_task, load_examples
from dpc_lens.testbed import shipped_artefacts
from dpc_lens.testbed.demo import DEMO_RANDOM_DRAWS


def _artefacts(testbed: str) -> dict[str, str]:
    if testbed == "real":
        from dpc_lens.testbed.real import artefacts

        art = artefacts()
        if art is None:
            raise SystemExit("the real test bed is not built: python -m dpc_lens.testbed.real build")
        return art
    art = shipped_artefacts()
    if art is None:
        raise SystemExit("the shipped reasoner / soft prompt / test set are missing from dpc_lens/data")
    return dict(art, task="arith")


#: issue 19's locators, as DetectorConfig fields over the calibrated config
LOCATORS = {
    "paper": {"locator": "argmax", "sink": "keep", "sink_source": "position0"},
    "sink_excluded": {"locator": "argmax", "sink": "exclude", "sink_source": "detected"},
    "z": {"locator": "z", "sink": "keep", "sink_source": "position0"},
}


def locator_configs(cfg, names, profile=None):
    """name -> the calibrated detector with that locator (``z`` needs the dev ``profile``)."""
    out = {}
    for name in names:
        if name not in LOCATORS:
            raise SystemExit(f"unknown locator {name!r}; choose from {sorted(LOCATORS)}")
        fields = dict(LOCATORS[name], sink_scale=None)
        if name == "z":
            if profile is None:
                raise SystemExit("the z locator needs a dev profile (--profile-dev N > 0)")
            fields["locator_profile"] = profile
        else:
            fields["locator_profile"] = None
        out[name] = replace(cfg.detector, **fields)
    return out


def fit_profile(adapter, soft, dev, cfg):
    """The z locator's dev profile: one PT generation and saliency pass per dev question."""
    an = analyse(adapter, soft, [e.question for e in dev], cfg)
    return LocatorProfile.fit([a.inputs for a in an], cfg.detector.statistic, cfg.detector.shallow_layers)


def _question_records(adapter, soft, task, exs, cfg, variants, draws, locators=None):
    """Every row's outcome for each question of ``exs`` (one chunk), as JSON-safe records."""
    prompts = encode_questions(adapter, [e.question for e in exs], cfg)
    pt_gen = generate(adapter, prompts, soft, cfg.generation, desc="PT")
    base_gen = generate(adapter, prompts, None, cfg.generation, desc="base")
    analyses = analyse(adapter, soft, [e.question for e in exs], cfg, generations=pt_gen)
    pt = [grade(task, g.text, e)[1] for g, e in zip(pt_gen, exs)]
    base = [grade(task, g.text, e)[1] for g, e in zip(base_gen, exs)]
    memo: dict[tuple[int, tuple[int, ...]], bool] = {}

    def corrupted_correct(rows_per_ex: list[list[int]]) -> list[bool]:
        need = [(i, tuple(r)) for i, r in enumerate(rows_per_ex) if r and (i, tuple(r)) not in memo]
        if need:
            gens = generate(adapter, [prompts[i] for i, _ in need],
                            [corrupt_soft_prompt(soft, list(r), cfg.corruption) for _, r in need],
                            cfg.generation, desc="corrupted")
            for (i, r), g in zip(need, gens):
                memo[(i, r)] = grade(task, g.text, exs[i])[1]
        return [memo[(i, tuple(r))] if r else pt[i] for i, r in enumerate(rows_per_ex)]

    recs = [{"id": e.id, "base": b, "pt": p, "rows": {}, "fired": {}, "source": e.meta.get("source")}
            for e, b, p in zip(exs, base, pt)]
    main_decs = None
    for name, det in variants.items():
        decs = [dynamic_trigger(a.inputs, det) if a.inputs is not None else None for a in analyses]
        rows = [list(d.corrupt_indices) if d is not None and d.fired else [] for d in decs]
        for rec, ok, d in zip(recs, corrupted_correct(rows), decs):
            rec["rows"][name] = ok
            rec["fired"][name] = bool(d is not None and d.fired)
        if main_decs is None:
            main_decs = decs
    k = cfg.detector.top_k
    located = [list(d.accumulation.top_indices) if d is not None else [] for d in main_decs]
    for rec, ok in zip(recs, corrupted_correct([r[:k] for r in located])):
        rec["always"] = ok
    per_draw = [corrupted_correct([random_rows_for(e.id, soft.n_tokens, k, cfg.seed + j) for e in exs])
                for j in range(draws)]
    # the sinks of each question (attention received, over the calibrated shallow layers) and the
    # random draws restricted to the positions a sink-excluding locator may choose
    shallow = resolve_layers(cfg.detector.shallow_layers, adapter.n_layers)
    sinks = [list(sink_positions(a.inputs, replace(cfg.detector, sink_source="detected"), shallow))
             if a.inputs is not None else [] for a in analyses]
    cands = [candidate_positions(soft.n_tokens, sk, "exclude") for sk in sinks]
    per_draw_cand = []
    for j in range(draws):
        rows = [random_rows_for(e.id, soft.n_tokens, k, cfg.seed + j, c if len(c) >= k else None)
                for e, c in zip(exs, cands)]
        per_draw_cand.append(corrupted_correct(rows))
    for name, det in (locators or {}).items():
        decs = [dynamic_trigger(a.inputs, det) if a.inputs is not None else None for a in analyses]
        loc = [list(d.accumulation.top_indices) if d is not None else [] for d in decs]
        fired_ok = corrupted_correct([r if d is not None and d.fired else [] for r, d in zip(loc, decs)])
        always_ok = corrupted_correct(loc)
        for rec, r, d, f_ok, a_ok in zip(recs, loc, decs, fired_ok, always_ok):
            rec.setdefault("locators", {})[name] = {"located": r, "fired": bool(d is not None and d.fired),
                                                    "dpc": f_ok, "always": a_ok}
    deep = resolve_layers(cfg.detector.deep_layers, adapter.n_layers)
    for i, (rec, d, a) in enumerate(zip(recs, main_decs, analyses)):
        rec["random"] = [v[i] for v in per_draw]
        rec["random_candidates"] = [v[i] for v in per_draw_cand]
        rec["sinks"] = sinks[i]
        rec["sink_bands"] = (None if d is None or d.sinks is None
                             else {b["band"]: b["sinks"] for b in d.sinks})
        rec["share"] = None if d is None else d.deep_flow.affected_share
        rec["located"] = located[i]
        rec["accumulation_present"] = None if d is None else bool(d.accumulation_present)
        rec["flow_triggered"] = None if d is None else bool(d.flow_triggered)
        rec["deep_soft_to_rationale"] = (statistics.fmean(a.flows["soft->rationale"][layer] for layer in deep)
                                         if a.flows else None)
    return recs, len(memo)


def _band_sinks(recs):
    """Per layer band, the soft positions detected as sinks on at least half the questions."""
    reports = [r["sink_bands"] for r in recs if r.get("sink_bands")]
    out = {}
    for band in (reports[0] if reports else {}):
        counts = {}
        for rep_ in reports:
            for j in rep_.get(band, []):
                counts[j] = counts.get(j, 0) + 1
        out[band] = sorted(j for j, c in counts.items() if c >= len(reports) / 2)
    return out


def _adaptivity(located, always, modal_correct, sinks, det=None):
    """Located-position statistics, the warning line, and (with the modal pass) the paired test
    of per-question locating vs always corrupting the modal position."""
    out = instance_adaptivity([r[0] if r else None for r in located])
    det = det or {}  # the locator's DetectorConfig fields (LOCATORS)
    out["warning"] = adaptivity_warning(
        out, sinks, locator=det.get("locator", "argmax"),
        sinks_excluded=det.get("sink") == "exclude" and det.get("sink_source") == "detected")
    if modal_correct is not None:
        out["locating_vs_modal"] = locating_vs_modal(always, modal_correct)
    return out


def _summarise(recs, cfg, variants, draws, n_layers, meta, locators=(), modal=None):
    pt = [r["pt"] for r in recs]
    base = [r["base"] for r in recs]
    n = len(recs)
    table = []

    def add(name, vec, note="", **extra):
        diff, lo, hi = paired_bootstrap(vec, pt)
        table.append({"method": name, "accuracy": sum(vec) / n, "diff_vs_pt": diff,
                      "ci95": [lo, hi], "note": note, **extra})

    add("base (no soft prompt)", base)
    add("vanilla PT", pt)
    for i, name in enumerate(variants):
        add(name, [r["rows"][name] for r in recs], "config from dpc_config.json" if i == 0 else "",
            trigger_rate=sum(r["fired"][name] for r in recs) / n)
    k = cfg.detector.top_k
    add(f"corrupt every instance (top-{k})", [r["always"] for r in recs])
    # the random row as `dpc-lens demo` reports it: seeded draws per question (random_rows_for,
    # seeds seed .. seed+draws-1), the mean accuracy over the draws with its spread
    per_draw = [sum(r["random"][j] for r in recs) / n for j in range(draws)]
    add(f"random corruption ({k} token, mean of {draws} draws)",
        [sum(r["random"]) / draws for r in recs],
        random_draws={"n": draws, "accuracy": per_draw,
                      "std": statistics.stdev(per_draw) if draws > 1 else None,
                      "min": min(per_draw), "max": max(per_draw)})
    if all("random_candidates" in r for r in recs):
        per_c = [sum(r["random_candidates"][j] for r in recs) / n for j in range(draws)]
        add(f"random corruption from the candidates (detected sinks excluded; {k} token, mean of "
            f"{draws} draws)", [sum(r["random_candidates"]) / draws for r in recs],
            random_draws={"n": draws, "accuracy": per_c,
                          "std": statistics.stdev(per_c) if draws > 1 else None,
                          "min": min(per_c), "max": max(per_c)})
    for name in locators:
        add(f"DPC, {name} locator, calibrated trigger", [r["locators"][name]["dpc"] for r in recs],
            trigger_rate=sum(r["locators"][name]["fired"] for r in recs) / n)
        add(f"corrupt every instance, {name} locator (top-{k})",
            [r["locators"][name]["always"] for r in recs])
    add("oracle (best of base / PT)", [a or b for a, b in zip(base, pt)])

    cont = {"accum_change": 0, "accum_no_change": 0, "no_accum_change": 0, "no_accum_no_change": 0}
    for r in recs:
        if r["accumulation_present"] is not None:
            key = ("accum" if r["accumulation_present"] else "no_accum") + (
                "_change" if r["flow_triggered"] else "_no_change")
            cont[key] += 1
    n_acc = cont["accum_change"] + cont["accum_no_change"]
    n_no = cont["no_accum_change"] + cont["no_accum_no_change"]
    cont.update(n=n_acc + n_no, p_change_given_accum=cont["accum_change"] / n_acc if n_acc else None,
                p_change_given_no_accum=cont["no_accum_change"] / n_no if n_no else None)
    tops = [r["located"][0] for r in recs if r["located"]]
    top_pos = max(set(tops), key=tops.count) if tops else None
    right = [r["deep_soft_to_rationale"] for r in recs if r["deep_soft_to_rationale"] is not None and r["pt"]]
    wrong = [r["deep_soft_to_rationale"] for r in recs
             if r["deep_soft_to_rationale"] is not None and not r["pt"]]
    by_source = {}
    for s in sorted({r.get("source") for r in recs if r.get("source")}):
        sub = [r for r in recs if r.get("source") == s]
        by_source[s] = {"n": len(sub), "base": sum(r["base"] for r in sub) / len(sub),
                        "pt": sum(r["pt"] for r in sub) / len(sub),
                        "dpc": sum(r["rows"][next(iter(variants))] for r in sub) / len(sub)}
    sinks_seen = sorted({j for v in _band_sinks(recs).values() for j in v})
    return {
        "n": n,
        "ceiling_right_without_prompt_wrong_with": sum(1 for a, b in zip(base, pt) if a and not b),
        "pt_only_right": sum(1 for a, b in zip(base, pt) if b and not a),
        "table": table,
        "located_token": {"most_common_position": top_pos,
                          "share_at_that_position": tops.count(top_pos) / len(tops) if tops else None,
                          **_adaptivity([r["located"] for r in recs], [r["always"] for r in recs],
                                        _modal_vec(recs, modal, "calibrated"), sinks_seen,
                                        {k: getattr(cfg.detector, k)
                                         for k in ("locator", "sink", "sink_source")}),
                          "sinks": _band_sinks(recs),
                          "by_locator": {name: _adaptivity(
                              [r["locators"][name]["located"] for r in recs],
                              [r["locators"][name]["always"] for r in recs],
                              _modal_vec(recs, modal, name), sinks_seen, LOCATORS[name])
                              for name in locators}},
        "trigger_auc": _trigger_aucs(recs),
        "contingency_fig5": cont,
        "deep_soft_to_rationale_flow": {
            "layers": resolve_layers(cfg.detector.deep_layers, n_layers),
            "pt_correct": {"n": len(right), "mean": statistics.fmean(right) if right else None,
                           "median": statistics.median(right) if right else None},
            "pt_wrong": {"n": len(wrong), "mean": statistics.fmean(wrong) if wrong else None,
                         "median": statistics.median(wrong) if wrong else None},
        },
        **({"by_source": by_source} if by_source else {}),
        "config": cfg.to_dict(),
        **meta,
    }


def _modal_vec(recs, modal, name):
    if not modal or name not in modal or any(r["id"] not in modal[name] for r in recs):
        return None
    return [modal[name][r["id"]] for r in recs]


def _trigger_aucs(recs):
    scored = [r for r in recs if r.get("share") is not None]
    share = [r["share"] for r in scored]
    return {"statistic": "deep_flow.affected_share of the calibrated trigger",
            "corruption_helps_vs_hurts": trigger_auc(
                share, [None if r["pt"] == r["always"] else bool(r["always"]) for r in scored]),
            "pt_wrong_base_right": trigger_auc(share, [bool(r["base"]) and not r["pt"] for r in scored])}


def modal_rows(recs, key):
    """The modal located row set of one locator (``key(rec)`` -> located rows); ties -> lowest."""
    sets = [tuple(key(r)) for r in recs if key(r)]
    return min(set(sets), key=lambda s: (-sets.count(s), s)) if sets else None


def modal_pass(adapter, soft, task, exs, cfg, recs, locators, path, chunk):
    """Each locator's modal rows corrupted on every question (resumable in ``path``); returns
    name -> {id: correct}."""
    done = ({(r["qid"], tuple(r["rows"])): r["correct"] for r in read_records(path)}
            if os.path.exists(path) else {})
    keys = {"calibrated": lambda r: r["located"]}
    keys.update({name: (lambda r, n=name: r["locators"][n]["located"]) for name in locators})
    by_id = {e.id: e for e in exs}
    out = {}
    for name, key in keys.items():
        rows = modal_rows(recs, key)
        if rows is None:
            continue
        todo = [r for r in recs if (r["id"], rows) not in done and tuple(key(r)) != rows]
        for s in range(0, len(todo), chunk):
            part = [by_id[r["id"]] for r in todo[s:s + chunk]]
            prompts = encode_questions(adapter, [e.question for e in part], cfg)
            zeroed = corrupt_soft_prompt(soft, list(rows), cfg.corruption)
            gens = generate(adapter, prompts, [zeroed] * len(part), cfg.generation, desc=f"modal {name}")
            with open(path, "a") as fh:
                for e, g in zip(part, gens):
                    ok = grade(task, g.text, e)[1]
                    done[(e.id, rows)] = ok
                    fh.write(json.dumps({"id": f"{e.id}|{name}", "qid": e.id, "rows": list(rows),
                                         "correct": ok}) + "\n")
        # where the locator already chose the modal rows, its own always-corrupt answer is it
        out[name] = {r["id"]: (done[(r["id"], rows)] if tuple(key(r)) != rows else
                               (r["always"] if name == "calibrated" else r["locators"][name]["always"]))
                     for r in recs}
    return out


def sink_survey(root: str | None = None) -> dict:
    """The per-prompt sink survey (``benchmarks/sink_survey.py``: dev split, one soft prompt per
    variant), as committed in ``results/sink_survey/<variant>/survey_dev.json``: per prompt its
    training setting, regime, where the sinks form and where DPC locates."""
    root = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sink_survey")
    out = {}
    for variant in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, variant, "survey_dev.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            survey = json.load(fh)
        train = os.path.join(root, variant, "training.json")
        if os.path.exists(train):
            with open(train) as fh:
                t = json.load(fh)
            survey["training"] = {k: t.get(k) for k in ("model", "settings", "best_step", "steps_done",
                                                         "wall_s")}
        out[variant] = survey
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--testbed", choices=("reasoner", "real"), default="reasoner",
                    help="reasoner: the shipped 0.62M model; real: SmolLM2 + its tuned adapter")
    ap.add_argument("--limit", type=int, default=None, help="first N test questions (default: all)")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/evidence_arith.json (reasoner) or evidence_real.json")
    ap.add_argument("--random-draws", type=int, default=DEMO_RANDOM_DRAWS)
    ap.add_argument("--no-variants", action="store_true",
                    help="only the calibrated trigger (skip the raw/normalised x k=1,2,3 rows)")
    ap.add_argument("--chunk", type=int, default=50, help="questions per chunk (default 50)")
    ap.add_argument("--fresh", action="store_true", help="discard the records of an earlier run")
    ap.add_argument("--locators", default="",
                    help=f"comma-separated extra locators from {sorted(LOCATORS)} (issue 19), each under "
                         "the calibrated trigger and corrupting every instance")
    ap.add_argument("--profile-dev", type=int, default=100,
                    help="dev questions the z locator's profile is fitted on (default 100)")
    ap.add_argument("--modal", action="store_true",
                    help="final pass: corrupt each locator's modal position on every question, for the "
                         "paired test of per-question locating vs always zeroing the modal position")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    args = ap.parse_args(argv)
    loc_names = [x for x in args.locators.split(",") if x]
    name = "evidence_arith.json" if args.testbed == "reasoner" else "evidence_real.json"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", name)
    art = _artefacts(args.testbed)
    t0 = time.perf_counter()
    model = load_model(art["model"])
    adapter = as_adapter(model)
    soft = SoftPrompt.from_peft(art["soft_prompt"])
    task = get_task(art["task"])
    exs = load_examples(art["test"], task)[: args.limit]
    cfg = DPCConfig.load(art["config"]) if os.path.exists(art["config"]) else DPCConfig()
    variants = {"DPC, calibrated trigger": cfg.detector}
    if not args.no_variants:
        for stat in ("normalized", "raw"):
            for k in (1, 2, 3):
                det = replace(cfg.detector, statistic=stat, top_k=k)
                if det != cfg.detector:
                    variants[f"DPC {stat}, k={k}"] = det
    settings = {"testbed": args.testbed, "config": cfg.to_dict(), "variants": list(variants),
                "random_draws": args.random_draws, "soft_prompt": os.path.abspath(art["soft_prompt"]),
                "test": os.path.abspath(art["test"])}
    if loc_names:  # only when asked, so runs made before the option resume as they were
        settings.update(locators=loc_names, profile_dev=args.profile_dev if "z" in loc_names else None)
    rec_path, set_path = out + ".records.jsonl", out + ".run.json"
    profile_path = out + ".locator_profile.json"
    for name in loc_names:
        if name not in LOCATORS:
            raise SystemExit(f"unknown locator {name!r}; choose from {sorted(LOCATORS)}")
    if args.dry_run:
        print(f"would run {len(exs)} test questions of the {args.testbed} test bed; rows: "
              f"{list(variants)}; locators: {loc_names or 'none'}; random draws: {args.random_draws} "
              f"unrestricted + {args.random_draws} from the sink-excluded candidates; "
              f"z profile: {args.profile_dev if 'z' in loc_names else 0} dev questions -> {profile_path}; "
              f"modal pass: {args.modal}; records: {rec_path}")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if args.fresh:
        for p in (rec_path, set_path, profile_path, out + ".modal.jsonl"):
            if os.path.exists(p):
                os.remove(p)
    if os.path.exists(set_path):
        with open(set_path) as fh:
            if json.load(fh) != settings:
                raise SystemExit(f"{rec_path} holds a run with other settings; pass --fresh to start over")
    with open(set_path, "w") as fh:
        json.dump(settings, fh, indent=2)
    profile = None
    if "z" in loc_names:
        if os.path.exists(profile_path) and not args.fresh:
            profile = LocatorProfile.load(profile_path)
        else:
            dev = load_examples(art["dev"], task)[: args.profile_dev]
            profile = fit_profile(adapter, soft, dev, cfg)
            profile.save(profile_path)
    locators = locator_configs(cfg, loc_names, profile)
    done = {r["id"]: r for r in read_records(rec_path)}  # a torn last line is redone
    n_corrupted = 0
    todo = [e for e in exs if e.id not in done]
    result = None
    for s in range(0, max(len(todo), 1), args.chunk):
        part = todo[s:s + args.chunk]
        if part:
            recs, nc = _question_records(adapter, soft, task, part, cfg, variants, args.random_draws,
                                         locators)
            n_corrupted += nc
            with open(rec_path, "a") as fh:
                for r in recs:
                    fh.write(json.dumps(r) + "\n")
                    done[r["id"]] = r
        ordered = [done[e.id] for e in exs if e.id in done]
        modal = None
        if args.modal and len(ordered) == len(exs):
            modal = modal_pass(adapter, soft, task, exs, cfg, ordered, loc_names, out + ".modal.jsonl",
                               args.chunk)
        result = _summarise(ordered, cfg, variants, args.random_draws, adapter.n_layers, {
            "testbed": args.testbed, "model": art["model"], "soft_prompt": art["soft_prompt"],
            "n_requested": len(exs), "corrupted_generations_this_process": n_corrupted,
            "wall_time_s_this_process": time.perf_counter() - t0, "device": str(adapter.device),
            "torch_threads": torch.get_num_threads()}, loc_names, modal)
        if args.testbed == "real":
            result["sink_survey"] = sink_survey()
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"{len(ordered)}/{len(exs)} questions done, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"n = {result['n']}; ceiling = {result['ceiling_right_without_prompt_wrong_with']}; "
          f"PT-only = {result['pt_only_right']}")
    print("| method | accuracy | Δ vs PT | 95% CI |\n|---|---|---|---|")
    for r in result["table"]:
        print(f"| {r['method']} | {100 * r['accuracy']:.1f} | {100 * r['diff_vs_pt']:+.1f} | "
              f"[{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] |")
    print(json.dumps({k: result[k] for k in ("contingency_fig5", "deep_soft_to_rationale_flow",
                                             "located_token", "trigger_auc")}, indent=1))
    for line in [result["located_token"].get("warning")] + [
            v.get("warning") for v in result["located_token"]["by_locator"].values()]:
        if line:
            print(line)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
