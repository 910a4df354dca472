"""The model-free half of a DPC run: :func:`summarize` turns the per-question records into the
accuracy table with its intervals and diagnostics, :func:`print_summary` prints it (split from
:mod:`dpc_lens.dpc.pipeline`, which re-exports both)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ..evaluation import base_or_pt_oracle, paired_bootstrap
from ..runs import unique_by_id
from .diagnostics import adaptivity_warning, instance_adaptivity, locating_vs_modal, trigger_auc

#: the baselines a DPC run can add beside PT and DPC (``DPCConfig.baselines``)
BASELINES = ("base", "always", "random")

def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of every method, trigger rate, flips against vanilla PT, the ceiling and oracle.

    * ``ceiling``: instances right without the soft prompt and wrong with it (what any trigger
      could at most recover); ``pt_only``: the other way round.
    * ``oracle``: accuracy of the best of the base and PT answers per instance.
    * ``random``: with several draws per question, the mean accuracy over the draws;
      ``random_draws`` holds each draw's accuracy, their standard deviation, min and max.
    * ``random_candidates``: the random baseline drawn only from the positions the locator may
      choose (sinks excluded under ``sink="exclude"``), same draws and spread as ``random``; equal
      to it when every soft position is a candidate.
    * ``located_token``: the top located position over the questions
      (:func:`~dpc_lens.dpc.diagnostics.instance_adaptivity`: histogram, distinct positions, modal
      position and share, entropy), the sinks detected per layer band on at least half the
      questions, and ``warning``: one line when a single position takes > 80% of the questions.
    * ``trigger_auc``: how well the trigger's statistic (the affected share of the deep flow)
      separates "corrupting helps" from "corrupting hurts" (PT wrong and the always-corrupted answer
      right vs the other way round; needs the ``always`` baseline) and "PT wrong and base right"
      from the rest (needs ``base``): AUC with a bootstrap 95% interval
      (:func:`~dpc_lens.dpc.diagnostics.trigger_auc`; 0.5 is chance).
    * ``skipped``: questions not run (too long for the model), left out of every accuracy;
      ``trigger_errors``: questions whose trigger could not be computed (DPC answered with PT).
    * A record whose id appears twice is counted once (``duplicates_dropped``).
    """
    records, dups = unique_by_id(records)
    skipped = [r for r in records if r.get("skipped")]
    records = [r for r in records if not r.get("skipped")]
    n = len(records)
    extra: dict[str, Any] = {}
    if skipped:
        extra["skipped"] = {"n": len(skipped), "ids": [r["id"] for r in skipped],
                            "reason": skipped[0]["skipped"]}
    if dups:
        extra["duplicates_dropped"] = dups
    if n == 0:
        return {"n": 0, **extra}
    acc = lambda key: sum(bool(r[key]["correct"]) for r in records if key in r) / n  # noqa: E731
    out: dict[str, Any] = {"n": n, "accuracy": {"pt": acc("pt"), "dpc": acc("dpc")}}
    for b in BASELINES:
        if all(b in r for r in records):
            out["accuracy"][b] = acc(b)
    if all("random_draws" in r for r in records):
        n_draws = min(len(r["random_draws"]) for r in records)
        per = [sum(bool(r["random_draws"][j]["correct"]) for r in records) / n for j in range(n_draws)]
        mean = sum(per) / n_draws
        std = (sum((x - mean) ** 2 for x in per) / (n_draws - 1)) ** 0.5 if n_draws > 1 else 0.0
        out["accuracy"]["random"] = mean
        out["random_draws"] = {"n": n_draws, "accuracy": per, "std": std, "min": min(per), "max": max(per)}
    if all("random" in r for r in records):
        out.update(_random_candidates(records))
    fired = [r for r in records if r["dpc"]["fired"]]
    out["trigger_rate"] = len(fired) / n
    out["flips"] = {
        "wrong_to_right": sum(1 for r in fired if not r["pt"]["correct"] and r["dpc"]["correct"]),
        "right_to_wrong": sum(1 for r in fired if r["pt"]["correct"] and not r["dpc"]["correct"]),
    }
    # how sure the run is: DPC - PT, paired over the same questions (seeded, so a resumed or
    # merged run reports the same interval)
    d, lo, hi = paired_bootstrap([r["dpc"]["correct"] for r in records],
                                 [r["pt"]["correct"] for r in records])
    out["dpc_minus_pt"] = {"diff": d, "ci95": [lo, hi], "method": "paired bootstrap, 2000 resamples"}
    located = [r for r in records if r.get("located_rows")]
    n_sink = sum(1 for r in located if r["located_rows"][0] == 0)
    out["sink_rate"] = (n_sink / len(located)) if located else None
    if all("base" in r for r in records):
        out["ceiling"] = sum(1 for r in records if r["base"]["correct"] and not r["pt"]["correct"])
        out["pt_only"] = sum(1 for r in records if r["pt"]["correct"] and not r["base"]["correct"])
        out["accuracy"]["oracle"] = base_or_pt_oracle(records)
    out["located_token"] = _located_token(records)
    out["trigger_auc"] = _trigger_aucs(records)
    errors = [r for r in records if r.get("trigger_error")]
    if errors:
        out["trigger_errors"] = {"n": len(errors), "ids": [r["id"] for r in errors][:20],
                                 "first": errors[0]["trigger_error"]}
    out.update(extra)
    return out


def _draws(r: dict[str, Any], key: str) -> list[bool]:
    if key == "random_candidates" and r.get("random_candidates") is not None:
        return [bool(a["correct"]) for a in r["random_candidates"]]
    if r.get("random_draws") is not None:
        return [bool(a["correct"]) for a in r["random_draws"]]
    return [bool(r["random"]["correct"])]


def _random_candidates(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    n_draws = min(len(_draws(r, "random_candidates")) for r in records)
    per = [sum(_draws(r, "random_candidates")[j] for r in records) / n for j in range(n_draws)]
    mean = sum(per) / n_draws
    std = (sum((x - mean) ** 2 for x in per) / (n_draws - 1)) ** 0.5 if n_draws > 1 else 0.0
    restricted = sum(1 for r in records if r.get("random_candidates") is not None)
    return {"random_candidates": {"accuracy": mean, "n": n_draws, "per_draw": per, "std": std,
                                  "min": min(per), "max": max(per), "questions_restricted": restricted}}


def _located_token(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    located = [r["located_rows"][0] if r.get("located_rows") else None for r in records]
    out = instance_adaptivity(located)
    measured = [r for r in records if r.get("located_rows")]
    if (measured and all(r.get("modal") and r.get("always") for r in measured)
            # one modal row set for the whole run (merged shards may each have had their own)
            and len({tuple(r["modal"]["corrupted_rows"]) for r in measured}) == 1):
        # per-question locating vs always zeroing the run's modal rows, same questions
        out["locating_vs_modal"] = {
            "modal_rows": list(measured[0]["modal"]["corrupted_rows"]),
            **locating_vs_modal([r["always"]["correct"] for r in measured],
                                [r["modal"]["correct"] for r in measured])}
    bands: dict[str, dict[str, Any]] = {}
    with_sinks = [r["trigger"]["sinks"] for r in records if r.get("trigger") and r["trigger"].get("sinks")]
    for report in with_sinks:
        for band in report:
            b = bands.setdefault(band["band"], {"layers": band["layers"], "counts": {}})
            for j in band["sinks"]:
                b["counts"][j] = b["counts"].get(j, 0) + 1
    sinks = {name: {"layers": b["layers"], "sinks": sorted(j for j, c in b["counts"].items()
                                                         if c >= len(with_sinks) / 2)}
             for name, b in bands.items()}
    out["sinks"] = sinks if with_sinks else None
    detected = sorted({j for b in sinks.values() for j in b["sinks"]}) if with_sinks else None
    # the detector's own sink policy and locator, from the records (fields at their defaults are
    # left out of a stored config: argmax, position-0 sinks)
    det = next((r["trigger"].get("config") or {} for r in records if r.get("trigger")), {})
    out["warning"] = adaptivity_warning(
        out, detected, locator=det.get("locator", "argmax"),
        sinks_excluded=det.get("sink") == "exclude" and det.get("sink_source") == "detected")
    return out


def _trigger_aucs(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in records if r.get("trigger")]
    share = [float(r["trigger"]["deep_flow"]["affected_share"]) for r in scored]
    out: dict[str, Any] = {"statistic": "deep_flow.affected_share"}
    if scored and all("always" in r for r in scored):
        labels = [None if bool(r["pt"]["correct"]) == bool(r["always"]["correct"])
                  else bool(r["always"]["correct"]) for r in scored]
        out["corruption_helps_vs_hurts"] = trigger_auc(share, labels)
    if scored and all("base" in r for r in scored):
        labels = [bool(r["base"]["correct"]) and not bool(r["pt"]["correct"]) for r in scored]
        out["pt_wrong_base_right"] = trigger_auc(share, labels)
    return out


def print_summary(summary: dict, file=None) -> None:
    """The accuracy table: methods, trigger rate, flips, ceiling and oracle."""
    file = file or sys.stdout
    acc = summary.get("accuracy", {})
    print(f"n = {summary.get('n', 0)}", file=file)
    print(f"{'method':<10} {'accuracy':>9}", file=file)
    rd = summary.get("random_draws")
    for name in ("base", "pt", "dpc", "always", "random", "oracle"):
        if name in acc:
            extra = ""
            if name == "random" and rd:
                extra = (f"  mean of {rd['n']} draws, sd {100 * rd['std']:.1f}, "
                         f"range {100 * rd['min']:.1f}-{100 * rd['max']:.1f}")
            print(f"{name:<10} {100 * acc[name]:>8.1f}%{extra}", file=file)
    rc = summary.get("random_candidates")
    if rc and rc.get("questions_restricted"):
        print(f"{'random*':<10} {100 * rc['accuracy']:>8.1f}%  drawn from the locator's candidates "
              f"(sinks excluded), mean of {rc['n']} draws, sd {100 * rc['std']:.1f}", file=file)
    if "trigger_rate" in summary:
        f = summary.get("flips", {})
        print(f"trigger rate {100 * summary['trigger_rate']:.1f}%  flips wrong->right "
              f"{f.get('wrong_to_right', 0)}  right->wrong {f.get('right_to_wrong', 0)}", file=file)
    if "ceiling" in summary:
        print(f"right without prompt & wrong with it (ceiling): {summary['ceiling']}   "
              f"the other way: {summary['pt_only']}", file=file)
    lt = summary.get("located_token") or {}
    if lt.get("n"):
        print(f"located token: {lt['distinct_positions']} distinct position(s), modal {lt['modal_position']} "
              f"on {100 * lt['modal_share']:.0f}% of questions, entropy {lt['entropy']:.2f} nats", file=file)
    for name, a in (summary.get("trigger_auc") or {}).items():
        if isinstance(a, dict) and a.get("auc") is not None:
            ci = a["ci95"]
            ci_txt = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            print(f"trigger AUC, {name.replace('_', ' ')}: {a['auc']:.2f}{ci_txt} "
                  f"({a['n_pos']} vs {a['n_neg']} questions)", file=file)
    lm = lt.get("locating_vs_modal")
    if lm:
        print(f"locating per question vs always zeroing soft rows {lm['modal_rows']} (same questions, "
              f"no trigger): {100 * lm['located']:.1f}% vs {100 * lm['modal']:.1f}%, "
              f"{100 * lm['diff']:+.1f} [{100 * lm['ci95'][0]:+.1f}, {100 * lm['ci95'][1]:+.1f}]", file=file)
    if lt.get("warning"):
        print(lt["warning"], file=file)
    if summary.get("skipped"):
        s = summary["skipped"]
        print(f"skipped {s['n']} question(s), left out of every accuracy: {s['reason']} "
              f"(ids {', '.join(map(str, s['ids'][:5]))}{', ...' if s['n'] > 5 else ''})", file=file)
    if summary.get("trigger_errors"):
        t = summary["trigger_errors"]
        print(f"warning: the trigger could not be computed on {t['n']} question(s) (DPC kept the PT "
              f"answer there): {t['first']}", file=file)
    if summary.get("duplicates_dropped"):
        print(f"warning: {summary['duplicates_dropped']} duplicated record(s) counted once", file=file)
