"""IAP on cached pair records, model-free: the standardiser fit, each question's z-scores
(:class:`QuestionRecord`), every strategy's per-question decision and the run summary
(:func:`evaluate`), whether the score can choose (:func:`choice_diagnostics`, from
:mod:`dpc_lens.iap.diagnostics`), and the summary as text (:func:`format_summary`).

:mod:`dpc_lens.iap.pipeline` computes the pair records (one generation and one saliency pass
each) and calls these; nothing here runs a model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from dpc_lens.errors import InputError

from .calibration import CalibrationResult, QuestionRecord
from .pool import FLOW_PR, FLOW_QP, FLOW_QR, IAP_FLOWS, PromptPool
from .score import FlowStandardizer
from .select import Answer, iap_mv, iap_ss, majority_vote

__all__ = ["fit_standardizer", "question_records", "evaluate", "choice_diagnostics", "format_summary"]


def fit_standardizer(pairs: Sequence[Mapping[str, Any]]) -> FlowStandardizer:
    """:meth:`FlowStandardizer.fit` on the layer-set means of the scored pairs (one value per
    (question, prompt) pair and flow); unscored pairs (empty rationale) are left out."""
    vals: dict[str, list[float]] = {n: [] for n in IAP_FLOWS}
    for r in pairs:
        means = r.get("flow_means") or {}
        if all(n in means and means[n] is not None and math.isfinite(means[n]) for n in IAP_FLOWS):
            for n in IAP_FLOWS:
                vals[n].append(float(means[n]))
    return FlowStandardizer.fit(vals)


def _question_groups(pairs: Sequence[Mapping[str, Any]], n_prompts: int) -> list[list[Mapping[str, Any]]]:
    return [list(pairs[i:i + n_prompts]) for i in range(0, len(pairs), n_prompts)]


def question_records(
    pairs: Sequence[Mapping[str, Any]], n_prompts: int, standardizer: FlowStandardizer
) -> list[QuestionRecord]:
    """One :class:`QuestionRecord` (z-scores and answers in pool order) per question.

    An unscored pair (empty rationale, no flows) gets z-scores one below the lowest of its
    question's scored pairs on every flow (-1 when none is scored), so it scores last for every
    lam and mu >= 0: IAP-ss would only stop on it past every other prompt and IAP-mv ranks it
    last. Its answer is usually ``None`` anyway.
    """
    out = []
    for group in _question_groups(pairs, n_prompts):
        z: dict[str, list[float | None]] = {n: [] for n in IAP_FLOWS}
        for r in group:
            means = r.get("flow_means") or {}
            for n in IAP_FLOWS:
                z[n].append(float(standardizer.z(n, means[n])) if r.get("scored", bool(means)) else None)
        for n in IAP_FLOWS:
            known = [x for x in z[n] if x is not None]
            floor = (min(known) - 1.0) if known else -1.0
            z[n] = [floor if x is None else x for x in z[n]]
        out.append(QuestionRecord(z_qp=z[FLOW_QP], z_qr=z[FLOW_QR], z_pr=z[FLOW_PR],
                                  answers=[r["answer"] for r in group]))
    return out


def evaluate(
    pairs: Sequence[Mapping[str, Any]],
    pool: PromptPool,
    standardizer: FlowStandardizer,
    config: Any,
    task: Any,
    *,
    calibration: CalibrationResult | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every strategy on cached pairs: per-question decisions and the summary table.

    Accuracies (fraction of questions whose answer ``task.is_correct``):

    * ``single[k]``: prompt k on every question (task-level prompting);
    * ``majority``: the plain majority answer over all prompts (:func:`majority_vote`);
    * ``iap_ss``: :func:`iap_ss` with ``config.ss`` (lam, mu, tau);
    * ``iap_mv``: :func:`iap_mv` with ``config.mv`` (lam, mu, m);
    * ``oracle``: some prompt is right (the ceiling of any per-instance choice).

    Cost per question, as a deployment would pay it (generations = backward passes = prompts
    that must be generated and scored): IAP-ss ``n_tried`` (it stops at the first prompt with
    S >= tau), IAP-mv and majority the pool size, a single prompt 1 generation and no backward.

    Whether the score can choose (:mod:`dpc_lens.iap.diagnostics`), in the summary:

    * ``score_diagnostics``: within-question and pooled AUC of each z-scored flow and of the
      IAP-ss and IAP-mv scores on this run's pairs, with bootstrap intervals over questions;
    * ``degenerate``: what the chosen config reduces to on these questions (IAP-ss = the first
      prompt or the argmax, IAP-mv = the argmax or plain majority; with ``calibration``, a
      calibrated value at the edge of its grid), or ``None``;
    * ``paired_differences``: IAP-ss, IAP-mv, majority and the oracle against the first prompt
      and against the single prompt best on dev (``calibration``'s; without it, the best on this
      run's own questions, in-sample, and ``reference_prompts`` says so), each the mean paired
      difference with its paired-bootstrap 95% interval;
    * ``warnings``: one line for each score whose within-question interval includes 0.5;
    * ``dev``: with ``calibration``, its own diagnostics, degenerate cases and grids.
    """
    n_prompts = len(pool)
    if len(pairs) % n_prompts:
        raise InputError(
            f"evaluate: {len(pairs)} pair records do not split into questions of {n_prompts} "
            "prompts; give every prompt's record for every question, question-major."
        )
    qrecs = question_records(pairs, n_prompts, standardizer)
    groups = _question_groups(pairs, n_prompts)
    ss, mv = config.ss, config.mv
    per_bwd = 2 if config.per_head else 1
    rows: list[dict[str, Any]] = []
    for qr, group in zip(qrecs, groups, strict=True):
        gold = group[0]["gold"]

        def ok(a: Answer, gold: str = gold) -> bool:
            return bool(task.is_correct(a, gold))

        s_ss, s_mv = qr.scores(ss.lam, ss.mu), qr.scores(mv.lam, mv.mu)
        pick_ss = iap_ss(s_ss, qr.answers, ss.tau)
        pick_mv = iap_mv(s_mv, qr.answers, mv.m)
        maj = majority_vote(qr.answers)
        rows.append({
            "id": group[0]["id"],
            "gold": gold,
            "answers": list(qr.answers),
            "correct": [bool(r["correct"]) for r in group],
            "z": {FLOW_QP: list(qr.z_qp), FLOW_QR: list(qr.z_qr), FLOW_PR: list(qr.z_pr)},
            "scores_ss": s_ss,
            "scores_mv": s_mv,
            "iap_ss": {**pick_ss.to_dict(), "correct": ok(pick_ss.answer)},
            "iap_mv": {**pick_mv.to_dict(), "correct": ok(pick_mv.answer)},
            "majority": {"answer": maj, "correct": ok(maj)},
            "oracle": any(bool(r["correct"]) for r in group),
        })
    n = len(rows)
    acc = lambda xs: sum(bool(x) for x in xs) / n if n else float("nan")  # noqa: E731
    single = {p.text: acc(r["correct"][k] for r in rows) for k, p in enumerate(pool)}
    best = max(single, key=single.get) if single else None
    mean_ss = sum(r["iap_ss"]["n_tried"] for r in rows) / n if n else float("nan")
    summary = {
        "n_questions": n,
        "n_prompts": n_prompts,
        "accuracy": {
            "single": single,
            "best_single": {"prompt": best, "accuracy": single.get(best)},
            "majority": acc(r["majority"]["correct"] for r in rows),
            "iap_ss": acc(r["iap_ss"]["correct"] for r in rows),
            "iap_mv": acc(r["iap_mv"]["correct"] for r in rows),
            "oracle": acc(r["oracle"] for r in rows),
        },
        "mean_prompts_tried_ss": mean_ss,
        "iap_ss_fallback_rate": acc(r["iap_ss"]["fallback"] for r in rows),
        "cost_per_question": {
            "single": {"generations": 1, "backward_passes": 0},
            "majority": {"generations": n_prompts, "backward_passes": 0},
            "iap_ss": {"generations": mean_ss, "backward_passes": mean_ss * per_bwd},
            "iap_mv": {"generations": n_prompts, "backward_passes": n_prompts * per_bwd},
            "note": ("What a deployment pays per question. IAP-ss stops at the first prompt whose "
                     "score clears tau (n_tried); IAP-mv scores the whole pool. This run computed "
                     "every pair once to evaluate all strategies from one cache."),
        },
        "pool": [p.to_dict() for p in pool],
    }
    if rows:
        summary.update(choice_diagnostics(rows, pool, config, calibration))
    return rows, summary


def choice_diagnostics(
    rows: Sequence[Mapping[str, Any]],
    pool: PromptPool,
    config: Any,
    calibration: CalibrationResult | None = None,
) -> dict[str, Any]:
    """The summary's ``score_diagnostics``, ``degenerate``, ``paired_differences``,
    ``reference_prompts``, ``warnings`` (and ``dev`` with a ``calibration``) from
    :func:`evaluate`'s per-question rows (see there)."""
    from .diagnostics import (
        FALLBACK,
        degenerate_choices,
        diagnostic_warnings,
        paired_differences,
        score_diagnostics,
    )

    correct = [[bool(c) for c in r["correct"]] for r in rows]
    tables = {flow: [list(r["z"][flow]) for r in rows] for flow in IAP_FLOWS}
    same = (config.ss.lam, config.ss.mu) == (config.mv.lam, config.mv.mu)
    score_names = ["score"] if same else ["score_ss", "score_mv"]
    if same:  # one score serves both strategies
        tables["score"] = [list(r["scores_ss"]) for r in rows]
    else:
        tables["score_ss"] = [list(r["scores_ss"]) for r in rows]
        tables["score_mv"] = [list(r["scores_mv"]) for r in rows]
    diag = score_diagnostics(tables, correct)
    texts = [p.text for p in pool]
    dev_single = (list(calibration.baselines.get("single") or []) if calibration is not None else [])
    if len(dev_single) == len(texts):
        best = texts[max(range(len(texts)), key=dev_single.__getitem__)]
        chosen_on = "dev"
    else:
        acc = [sum(c[k] for c in correct) for k in range(len(texts))]
        best = texts[max(range(len(texts)), key=acc.__getitem__)]
        chosen_on = "this run's own questions (in-sample: no dev calibration was given)"
    k_best = texts.index(best)
    refs = {"vs_first_prompt": [c[0] for c in correct], "vs_best_single": [c[k_best] for c in correct]}
    methods = {
        "iap_ss": [bool(r["iap_ss"]["correct"]) for r in rows],
        "iap_mv": [bool(r["iap_mv"]["correct"]) for r in rows],
        "majority": [bool(r["majority"]["correct"]) for r in rows],
        "oracle": [bool(r["oracle"]) for r in rows],
    }
    chosen = grids = None
    if calibration is not None and calibration.grids:
        chosen = {"lam": config.ss.lam, "tau": config.ss.tau,
                  **({"lam_mv": config.mv.lam} if config.mv.lam != config.ss.lam else {})}
        grids = {"lam": calibration.grids.get("lam", ()), "tau": calibration.grids.get("tau", ()),
                 "lam_mv": calibration.grids.get("lam", ())}
    degenerate = degenerate_choices(
        tau=config.ss.tau, scores_ss=[list(r["scores_ss"]) for r in rows], m=config.mv.m,
        n_prompts=len(texts),
        first_prompt=texts[0], chosen=chosen, grids=grids,
    )
    out: dict[str, Any] = {
        "score_diagnostics": diag,
        "degenerate": degenerate,
        "reference_prompts": {"first": texts[0], "best_single": best, "best_single_chosen_on": chosen_on},
        "paired_differences": paired_differences(methods, refs),
        "warnings": diagnostic_warnings(diag, score_names, FALLBACK),
    }
    if calibration is not None:
        out["dev"] = {"n_questions": calibration.n_questions,
                      "best_ss": dict(calibration.best_ss), "best_mv": dict(calibration.best_mv),
                      "score_diagnostics": calibration.score_diagnostics,
                      "degenerate": calibration.degenerate, "grids": calibration.grids,
                      "warnings": list(calibration.warnings), "baselines": dict(calibration.baselines)}
    return out


def format_summary(summary: Mapping[str, Any]) -> str:
    """A :func:`run_iap` summary as plain text: the accuracy and cost table with each method's
    paired-bootstrap difference against the first prompt and the best single prompt, whether
    the score ranks prompts (within-question AUC), what the chosen config reduces to, and the
    warnings."""
    acc = summary["accuracy"]
    cost = summary["cost_per_question"]
    diffs = summary.get("paired_differences") or {}

    def delta(name: str, ref: str) -> str:
        d = diffs.get(name, {}).get(ref)
        if d is None:
            return ""
        lo, hi = d["ci95"]
        return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"

    w = 46
    lines = [f"n = {summary['n_questions']} questions x {summary['n_prompts']} prompts",
             f"{'method':<{w}} {'accuracy':>9} {'gen/q':>6} {'bwd/q':>6}  {'vs first prompt [95% CI]':<25}"
             f"{'vs best single [95% CI]'}"]
    for text, a in acc["single"].items():
        lines.append(f"{'single: ' + text:<{w}.{w}} {100 * a:>8.1f}% {1:>6} {0:>6}")
    for name in ("majority", "iap_ss", "iap_mv"):
        c = cost[name]
        gen, bwd = c["generations"], c["backward_passes"]
        lines.append(f"{name:<{w}} {100 * acc[name]:>8.1f}% {gen:>6.2f} {bwd:>6.2f}  "
                     f"{delta(name, 'vs_first_prompt'):<25}{delta(name, 'vs_best_single')}")
    lines.append(f"{'oracle (some prompt right)':<{w}} {100 * acc['oracle']:>8.1f}% {'':>6} {'':>6}  "
                 f"{delta('oracle', 'vs_first_prompt'):<25}{delta('oracle', 'vs_best_single')}")
    refs = summary.get("reference_prompts")
    if refs:
        lines.append(f"first prompt: {refs['first']!r}; best single: {refs['best_single']!r} "
                     f"(chosen on {refs['best_single_chosen_on']})")
    lines.append(f"IAP-ss mean prompts tried: {summary['mean_prompts_tried_ss']:.2f} "
                 f"of {summary['n_prompts']}")
    diag = summary.get("score_diagnostics")
    if diag:
        lines.append("does the score rank prompts? within-question AUC [95% CI] over (right, wrong) "
                     "prompt pairs of one question; pooled AUC over all answers; 0.5 = chance")
        for name, d in diag.items():
            if d["within_question_auc"] is None:
                lines.append(f"  {name:<21} no question has both a right and a wrong answer")
                continue
            lo, hi = d["within_question_ci95"] or (float("nan"), float("nan"))
            pooled = d["pooled_auc"]
            plo, phi = d["pooled_ci95"] or (float("nan"), float("nan"))
            lines.append(f"  {name:<21} {d['within_question_auc']:.3f} [{lo:.3f}, {hi:.3f}] "
                         f"({d['within_question_pairs']} pairs, {d['verdict']})   pooled "
                         f"{pooled:.3f} [{plo:.3f}, {phi:.3f}]")
    for line in (summary.get("degenerate") or {}).values():
        lines.append(f"degenerate: {line}")
    for line in summary.get("warnings") or ():
        lines.append(f"warning: {line}")
    note = summary.get("standardizer", {}).get("note")
    if note:
        lines.append(f"standardiser: {note}")
    return "\n".join(lines)
