"""The ``dpc-lens`` command line: a thin layer that parses arguments and calls the library.

Commands:

* ``paths`` — where the shipped test bed's files are (each also reachable as ``testbed``).
* ``demo`` — the whole method on a shipped test bed: SmolLM2 + its tuned soft prompt, or the
  0.62 M reasoner (``--testbed reasoner``); offline.
* ``dpc`` — DPC and its baselines over a data file; resumable JSONL + summary + config.
* ``calibrate`` — fit the trigger's knobs on a labelled dev split.
* ``train-prompt`` — vanilla prompt tuning, saved as a PEFT adapter.
* ``iap`` — Instance-adaptive Prompting (IAP-ss, IAP-mv, single prompts, majority vote) over a
  data set; resumable JSONL per (question, prompt) + summary + config.

``main(argv=None) -> int`` never calls ``sys.exit`` itself, so tests call ``main([...])``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .errors import DpcLensError, InputError

__all__ = ["main", "build_parser"]


DESCRIPTION = """\
dpc-lens: Dynamic Prompt Corruption (DPC) and Instance-adaptive Prompting (IAP) on
TransformerLens models, from the command line.

Commands:
  demo          the whole method on SmolLM2 + its tuned soft prompt (offline, about 10
                minutes; --testbed reasoner: the 0.62 M reasoner, about a minute)
  dpc           DPC and its baselines over a data file (resumable)
  calibrate     fit the DPC trigger's knobs on a labelled dev split (resumable)
  train-prompt  vanilla prompt tuning, saved as a PEFT adapter
  iap           Instance-adaptive Prompting over a data file (resumable)
  paths         where the shipped test bed's model, soft prompt, config and data are
  flows         saliency flows of your own segmented prompts: tidy table, figure, token view
  report        a run's self-contained HTML report (written by dpc, iap, calibrate and demo
                at the end of every run unless --no-report)

Every run directory (--out) is locked while a run writes into it. Errors exit with code 2
and say what was wrong and how to fix it.
"""

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _writes(*files: str) -> str:
    return "files written into --out:\n" + "\n".join(f"  {f}" for f in files)


def _add_common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    p.add_argument("--model", required=True,
                   help="Hugging Face model directory or hub id; 'testbed' = the shipped reasoner")
    if data:
        p.add_argument("--data", required=True,
                       help="local data file (JSONL, or as the task reads); 'testbed' = the shipped "
                            "test set (dev set for calibrate)")
        p.add_argument("--task", required=True, help="gsm8k, math, aqua or arith")
        p.add_argument("--limit", type=int, default=None,
                       help="use only the first N examples (default: all)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: shown when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    from .generation import GenerationConfig
    from .prompt_tuning import PromptTuningConfig

    gen, ptc = GenerationConfig(), PromptTuningConfig()
    parser = argparse.ArgumentParser(prog="dpc-lens", description=DESCRIPTION, formatter_class=_FORMATTER)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run base / prompt tuning / DPC on the shipped test bed",
                       formatter_class=_FORMATTER,
                       description="Base model, vanilla prompt tuning and DPC on a shipped test bed: "
                                   "SmolLM2-135M-Instruct with its tuned soft prompt (default when "
                                   "installed) or the 0.62 M reasoner (--testbed reasoner); calibrated "
                                   "config, per-question progress.",
                       epilog=_writes("records.jsonl  one JSON record per question",
                                      "summary.json   accuracies, trigger rate, flips, random spread",
                                      "config.json    the DPC config used",
                                      "figures/       the standard figures (--no-plots skips them)"))
    p.add_argument("--out", default="runs/demo",
                   help="output directory; refused if it holds a run other than a demo (default: runs/demo)")
    p.add_argument("--limit", type=int, default=None,
                   help="use a seeded random sample of N test questions (default: 40 on the real test "
                        "bed, all 600 on the reasoner); the closing lines give the full evidence")
    p.add_argument("--testbed", choices=("real", "reasoner"), default=None,
                   help="real: SmolLM2-135M-Instruct + its tuned soft prompt (about 10 minutes on 2 CPU "
                        "cores); reasoner: the shipped 0.62 M model (about a minute) (default: real when "
                        "installed, else reasoner)")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="skip the standard figures (default: written to OUT/figures/)")
    p.add_argument("--plots", dest="plots", action="store_true",
                   help="kept for older scripts: the figures are now written by default")
    p.set_defaults(plots=True)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: shown when stderr is a terminal)")

    p = sub.add_parser("dpc", help="Dynamic Prompt Corruption over a data set", formatter_class=_FORMATTER,
                       description="DPC and its baselines over a data file: one record per question, "
                                   "appended as soon as it is final; --resume continues a killed run.",
                       epilog=_writes("records.jsonl           one JSON record per question",
                                      "records.jsonl.rejected  corrupt lines moved aside by --resume",
                                      "summary.json            accuracies, trigger rate, flips, skipped",
                                      "config.json             the DPC config used",
                                      ".dpc_lens.lock          while the run is going",
                                      "figures/                with --plots"))
    _add_common(p)
    p.add_argument("--soft-prompt", required=True,
                   help="PEFT prompt-tuning adapter directory; 'testbed' = the shipped one")
    p.add_argument("--out", required=True, help="output directory (new, or the run to --resume)")
    p.add_argument("--config", default=None,
                   help="a dpc_config.json, e.g. from calibrate; 'testbed' = the shipped calibrated one "
                        "(default: the built-in DPCConfig defaults, said on the first line)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens generated per answer (default: the config's, built-in {gen.max_new_tokens})")
    p.add_argument("--baselines", default=None,
                   help="comma list of base,always,random ('' for none) (default: the config's, "
                        "built-in base,always,random)")
    p.add_argument("--random-draws", type=int, default=None,
                   help="random corruptions per question; the random row is their mean with its "
                        "spread (default: the config's, built-in 1)")
    p.add_argument("--plots", action="store_true", help="also write the standard figures (default: off)")

    p = sub.add_parser("calibrate",
                   help="fit the DPC trigger on a labelled dev split", formatter_class=_FORMATTER,
                       description="Grid-search the DPC trigger's knobs on a labelled dev split and "
                                   "write the chosen config.",
                       epilog=_writes("dpc_config.json          the chosen config (dpc --config accepts it)",
                                      "calibration.json         every grid point, sensitivity, remarks",
                                      "calibration_progress/    finished batches, for --resume",
                                      ".dpc_lens.lock           while the run is going"))
    _add_common(p)
    p.add_argument("--soft-prompt", required=True,
                   help="PEFT prompt-tuning adapter directory; 'testbed' = the shipped one")
    p.add_argument("--out", required=True,
                   help="output directory for the chosen config (checked before any work)")
    p.add_argument("--config", default=None,
                   help="base dpc_config.json whose non-detector fields are kept "
                        "(default: built-in DPCConfig)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed calibration in --out (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens generated per answer (default: the config's, built-in {gen.max_new_tokens})")

    p = sub.add_parser("train-prompt", help="vanilla prompt tuning, saved as a PEFT adapter",
                       formatter_class=_FORMATTER,
                       description="Train a soft prompt (vanilla prompt tuning) on a data file.",
                       epilog=_writes("adapter_config.json, adapter_model.safetensors  the PEFT adapter",
                                      "training_history.json                         loss and dev accuracy"))
    _add_common(p)
    p.add_argument("--dev", default=None, help="dev data file for early stopping (default: none)")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--n-tokens", type=int, default=16, help="soft-prompt length in tokens (default: 16)")
    p.add_argument("--steps", type=int, default=800, help="optimisation steps (default: 800)")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {ptc.lr})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"training batch size (default: {ptc.batch_size})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p = sub.add_parser("iap", help="Instance-adaptive Prompting over a data set", formatter_class=_FORMATTER,
                       description="IAP-ss, IAP-mv, single prompts and majority vote over a data file.",
                       epilog=_writes("pairs.jsonl         one record per (question, prompt)",
                                      "questions.jsonl     per-question decisions",
                                      "summary.json, config.json, standardizer.json, pair_settings.json",
                                      "dev/                with --dev: the dev calibration's pairs",
                                      "figures/            with --plots: score ranking, paired differences",
                                      ".dpc_lens.lock      while the run is going"))
    _add_common(p)
    p.add_argument("--prompts", default=None,
                   help="prompt pool: .json list or one prompt per line (default: the built-in nine)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dev", default=None,
                   help="labelled dev file: fit the standardiser and calibrate lam, tau, m on it first "
                        "(default: none; the standardiser is then fitted on the run's own flows)")
    p.add_argument("--dev-limit", type=int, default=None,
                   help="use only the first N dev examples (default: all)")
    p.add_argument("--config", default=None,
                   help="an IAP config.json to start from (default: built-in IAPRunConfig)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens generated per answer (default: the config's, built-in {gen.max_new_tokens})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"generation batch size (default: the config's, built-in {gen.batch_size})")
    p.add_argument("--per-head", action="store_true", help="also keep layer x head flow maps (default: off)")
    p.add_argument("--plots", action="store_true",
                   help="also write the score-ranking and paired-difference figures (default: off)")
    p.add_argument("--chat-template", choices=("auto", "never", "always"), default=None,
                   help="wrap prompts in the tokenizer's chat template "
                        "(default: the config's, built-in auto)")

    p = sub.add_parser("paths", help="print where the shipped test bed's files are",
                       description="The shipped test bed's model, soft prompt, calibrated config and "
                                   "data sets; every one can also be named 'testbed' on the command line.")
    _add_view_commands(sub)
    return parser


_COUNTS = ("limit", "max_new_tokens", "batch_size", "dev_limit", "n_tokens", "steps", "random_draws")


def _check_counts(args) -> None:
    from .validate import check_count

    for name in _COUNTS:
        if getattr(args, name, None) is not None:
            check_count(getattr(args, name), "--" + name.replace("_", "-"))


def _testbed(value: str | None, key: str) -> str | None:
    from .testbed import shipped_path

    return shipped_path(value, key)


def _bars(args) -> bool | None:
    """``--no-progress``: off; else dpc_lens's rule (bars only when stderr is a terminal)."""
    return False if getattr(args, "no_progress", False) else None


def _load(args):
    from .model import load_model

    return load_model(_testbed(args.model, "model"), device=args.device, dtype=args.dtype,
                      progress=_bars(args))


def _examples(args, path=None, limit=None):
    from .errors import DataError
    from .tasks import get_task, load_examples

    task = get_task(args.task)
    which = "dev" if getattr(args, "command", "") == "calibrate" else "test"
    # --dev testbed is the shipped dev set, --data testbed the test set (dev set for calibrate)
    src = _testbed(path, "dev") if path else _testbed(args.data, which)
    exs = load_examples(src, task)
    lim = limit if path else getattr(args, "limit", None)
    if lim is not None:
        exs = exs[:lim]
    if not exs:
        raise DataError(f"{src} holds no examples (an empty data set). Pass a data file with at "
                        "least one question.")
    return task, exs


def _dpc_config(args):
    from dataclasses import replace

    from .dpc import DPCConfig

    path = _testbed(args.config, "config") if args.config else None
    cfg = DPCConfig.load(path) if path else DPCConfig()
    if getattr(args, "max_new_tokens", None) is not None:
        cfg = replace(cfg, generation=replace(cfg.generation, max_new_tokens=args.max_new_tokens))
    if getattr(args, "baselines", None) is not None:
        cfg = replace(cfg, baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()))
    if getattr(args, "random_draws", None) is not None:
        cfg = replace(cfg, random_draws=args.random_draws)
    where = path if path else ("built-in DPCConfig defaults (no --config; the shipped calibrated "
                               "config is --config testbed)")
    print(f"detector config: {where}", file=sys.stderr)
    return cfg


def _ranks(args):
    """This process's rank (torchrun / accelerate launch set RANK and WORLD_SIZE); with several
    ranks and CUDA, each rank takes the GPU of its LOCAL_RANK unless --device says otherwise."""
    from .distributed import rank_info

    info = rank_info()
    if info.world > 1 and getattr(args, "device", None) is None:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return info


def _cmd_dpc(args) -> int:
    from .dpc import check_config_fits, print_summary, run_dpc
    from .runs import check_out_dir
    from .soft_prompt import SoftPrompt

    check_out_dir(args.out)
    task, exs = _examples(args)
    cfg = _dpc_config(args)
    soft = SoftPrompt.from_peft(_testbed(args.soft_prompt, "soft_prompt"))
    check_config_fits(cfg, soft)
    info = _ranks(args)
    model = _load(args)
    if info.world > 1:  # under torchrun / accelerate launch: shard, rank 0 merges and reports
        from .distributed import run_dpc_distributed

        result = run_dpc_distributed(model, soft, exs, task, cfg, out_dir=args.out, resume=args.resume,
                                     progress=_bars(args), info=info)
        if result is None:
            return 0
        summary = result[1]
    else:
        _, summary = run_dpc(model, soft, exs, task, cfg, out_dir=args.out,
                             resume=args.resume, progress=_bars(args))
    print_summary(summary)
    if args.plots:
        from .plotting import save_standard_figures

        save_standard_figures(args.out)
    print(f"records: {os.path.join(args.out, 'records.jsonl')}")
    return 0


def _cmd_calibrate(args) -> int:
    from .dpc import calibrate_dpc, check_config_fits
    from .runs import check_out_dir
    from .soft_prompt import SoftPrompt

    check_out_dir(args.out)
    task, exs = _examples(args)
    cfg = _dpc_config(args)
    soft = SoftPrompt.from_peft(_testbed(args.soft_prompt, "soft_prompt"))
    check_config_fits(cfg, soft)
    info = _ranks(args)
    model = _load(args)
    if info.world > 1:
        from .distributed import calibrate_dpc_distributed

        cal = calibrate_dpc_distributed(model, soft, exs, task, cfg, out_dir=args.out, resume=args.resume,
                                        progress=_bars(args), info=info)
        if cal is None:
            return 0
    else:
        cal = calibrate_dpc(model, soft, exs, task, cfg, progress=_bars(args),
                            out_dir=args.out, resume=args.resume)
    d = cal.to_dict()
    keep = ("best_point", "best_accuracy", "always_accuracy", "pt_accuracy", "gain",
            "corruption_oracle_accuracy", "trigger_auc", "n_generations")
    print(json.dumps({k: d[k] for k in keep if k in d}, indent=2))
    for r in cal.remarks:
        print(f"remark: {r}")
    print(f"chosen config: {os.path.join(args.out, 'dpc_config.json')}")
    return 0


def _cmd_train_prompt(args) -> int:
    from dataclasses import replace

    from .prompt_tuning import PromptTuningConfig, train_soft_prompt
    from .runs import check_out_dir

    check_out_dir(args.out)
    task, exs = _examples(args)
    dev = _examples(args, args.dev)[1] if args.dev else None
    cfg = PromptTuningConfig(n_tokens=args.n_tokens, steps=args.steps, seed=args.seed)
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    if args.batch_size is not None:
        cfg = replace(cfg, batch_size=args.batch_size)
    model = _load(args)
    res = train_soft_prompt(model, exs, cfg, dev_examples=dev, progress=_bars(args))
    res.soft_prompt.save_peft(args.out, base_model_name_or_path=_testbed(args.model, "model"))
    res.save(os.path.join(args.out, "training_history.json"))
    print(f"adapter: {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .testbed.demo import run_demo

    return run_demo(out_dir=args.out, limit=args.limit, progress=_bars(args), plots=args.plots,
                    testbed=args.testbed, report=not args.no_report)


def _cmd_paths(args) -> int:
    from .testbed import print_paths

    return print_paths()


def _cmd_iap(args) -> int:
    from dataclasses import replace

    from .iap import IAPRunConfig, PromptPool, format_summary
    from .iap.pipeline import calibrate_and_run_iap
    from .runs import check_out_dir

    check_out_dir(args.out)
    cfg = IAPRunConfig.load(args.config) if args.config else IAPRunConfig()
    gen = cfg.generation
    if args.max_new_tokens is not None:
        gen = replace(gen, max_new_tokens=args.max_new_tokens)
    if args.batch_size is not None:
        gen = replace(gen, batch_size=args.batch_size)
    cfg = replace(cfg, generation=gen, per_head=args.per_head or cfg.per_head,
                  chat_template=args.chat_template or cfg.chat_template)
    pool = PromptPool.from_file(args.prompts) if args.prompts else PromptPool.default()
    task, exs = _examples(args)
    dev = _examples(args, args.dev, args.dev_limit)[1] if args.dev else None
    info = _ranks(args)
    if info.world > 1:
        if dev is not None:
            raise InputError(
                f"--dev under {info.world} ranks: calibrate IAP once in one process "
                "(dpc-lens iap ... --dev), then run the test set over the ranks with --config "
                "pointing at the calibrated config (OUT/dev/config.json).")
        from .distributed import run_iap_distributed

        result = run_iap_distributed(_load(args), exs, task, pool, cfg, out_dir=args.out, resume=args.resume,
                                     progress=_bars(args), info=info)
        if result is None:
            return 0
        print(format_summary(result[1]))
        print(f"pairs: {os.path.join(args.out, 'pairs.jsonl')}")
        return 0
    import warnings

    from .iap.diagnostics import IAPScoreWarning

    with warnings.catch_warnings():  # printed below as "warning:" lines, not twice
        warnings.simplefilter("ignore", IAPScoreWarning)
        _, summary, fit = calibrate_and_run_iap(lambda: _load(args), exs, task, pool, cfg, dev=dev,
                                                out_dir=args.out, resume=args.resume,
                                                progress=_bars(args))
    if fit is not None:
        cal = fit.calibration
        print(f"dev calibration ({cal.n_questions} questions): IAP-ss {cal.best_ss}  IAP-mv {cal.best_mv}")
        for line in (cal.degenerate or {}).values():
            print(f"dev calibration: {line}")
        for line in cal.warnings:
            print(f"dev calibration warning: {line}")
    print(format_summary(summary))
    if args.plots:
        from .plotting.iap import save_iap_figures

        for path in save_iap_figures(args.out):
            print(f"figure: {path}")
    print(f"pairs: {os.path.join(args.out, 'pairs.jsonl')}")
    return 0


# ---------------------------------------------------------------- report and flows (issue 20)

_REPORTED = ("dpc", "iap", "calibrate")  # the demo writes its own report (testbed/demo.py)


def _add_view_commands(sub) -> None:
    """``report`` and ``flows``, and ``--no-report`` on every command that writes a run."""
    for name in _REPORTED + ("demo",):
        sub.choices[name].add_argument(
            "--no-report", action="store_true",
            help="do not write OUT/report.html at the end (default: written; dpc-lens report OUT "
                 "writes it later)")
    p = sub.add_parser("report", help="write a run's self-contained HTML report", formatter_class=_FORMATTER,
                       description="Build RUN_DIR/report.html from a dpc, iap, calibrate or demo run's "
                                   "files alone: summary tables with intervals, a per-question browser "
                                   "with outcome filters, tokens shaded by flow, the flow figures, the "
                                   "config and provenance. One file, no network; open it in a browser.",
                       epilog="files written into --out (here: RUN_DIR, or the --out file):\n"
                              "  report.html  the page")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of a run")
    p.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    p.add_argument("--no-figures", action="store_true",
                   help="leave the matplotlib figures out (faster) (default: drawn)")
    p = sub.add_parser("flows", help="saliency flows of your own segmented prompts",
                       formatter_class=_FORMATTER,
                       description="Saliency flows between named segments of your own prompts: a JSONL "
                                   "file whose every line is a list of [name, text] pieces, e.g. "
                                   '[["question", "Ann has 3 pens."], ["rationale", " 3 + 2 = 5."]]; '
                                   "one forward + backward per batch, loss over --loss-segments; "
                                   "--resume continues a killed run.",
                       epilog=_writes("flows.parquet, flows.csv  tidy table: layer, example, source, "
                                      "target, sum, count, mean",
                                      "flow_curves.png           per-layer flows over the prompts",
                                      "tokens.html               tokens shaded by their flow into the loss "
                                      "segments",
                                      "flows.jsonl               one record per prompt (for --resume)",
                                      "flows_settings.json       what the records depend on",
                                      ".dpc_lens.lock            while the run is going"))
    _add_common(p, data=False)
    p.add_argument("--prompts", required=True,
                   help="JSONL file, one prompt per line as a list of [name, text] pieces")
    p.add_argument("--out", required=True, help="output directory (new, or the run to --resume)")
    p.add_argument("--soft-prompt", default=None,
                   help="PEFT prompt-tuning adapter put first as the segment 'soft'; 'testbed' = the "
                        "shipped one (default: none)")
    p.add_argument("--layers", default="all",
                   help="all, shallow, deep, a comma list of indices (0,1,-1) or a fraction band a:b "
                        "(default: all)")
    p.add_argument("--per-head", action="store_true", help="one row per head in the table (default: off)")
    p.add_argument("--loss-segments", default=None,
                   help="comma list of the segments the teacher-forced loss is taken over; every "
                        "prompt needs one of them (default: rationale,answer, those the prompts have)")
    p.add_argument("--no-bos", action="store_true",
                   help="do not put the tokenizer's BOS first as the segment 'bos' (default: put it)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per saliency pass (default: 8)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out (default: off)")


def _cmd_report(args) -> int:
    from .plotting.report import write_report

    print(f"report: {write_report(args.run_dir, args.out, figures=not args.no_figures)}")
    return 0


def _cmd_flows(args) -> int:
    from .flow_runs import parse_layers, read_segmented_prompts, run_flows
    from .runs import check_out_dir

    check_out_dir(args.out)
    layers = parse_layers(args.layers)
    loss = None
    if args.loss_segments is not None:
        loss = tuple(s.strip() for s in args.loss_segments.split(",") if s.strip())
    if loss is not None and not loss:
        raise InputError("--loss-segments is empty; name the segments the loss is taken over, e.g. "
                         "--loss-segments answer.")
    prompts = read_segmented_prompts(args.prompts)
    soft = None
    if args.soft_prompt:
        from .soft_prompt import SoftPrompt

        soft = SoftPrompt.from_peft(_testbed(args.soft_prompt, "soft_prompt"))
    model = _load(args)
    paths = run_flows(model, prompts, args.out, soft_prompt=soft, layers=layers, per_head=args.per_head,
                      loss_segments=loss, bos=not args.no_bos, batch_size=args.batch_size,
                      resume=args.resume, progress=False if args.no_progress else None,
                      settings_extra={"model": args.model, "soft_prompt": args.soft_prompt})
    for key in ("table", "csv", "figure", "tokens"):
        if key in paths:
            print(f"{key}: {paths[key]}")
    return 0


def _with_report(args, rc: int, argv) -> int:
    """After a run that wrote --out: its provenance.json and report.html (rank 0 only)."""
    if rc != 0 or args.command not in _REPORTED:
        return rc
    if args.no_report:
        stale = os.path.join(args.out, "report.html")
        if os.path.exists(stale):  # a page of the run before this one would mislead
            os.remove(stale)
            print(f"removed {stale} (made before this run; dpc-lens report {args.out} remakes it)",
                  file=sys.stderr)
        return rc
    from .distributed import rank_info

    if rank_info().rank != 0:
        return rc
    from .plotting.report import provenance, write_report
    from .runs import write_json

    write_json(os.path.join(args.out, "provenance.json"), provenance(
        command="dpc-lens " + " ".join(list(argv) if argv is not None else sys.argv[1:]),
        model=getattr(args, "model", None), soft_prompt=getattr(args, "soft_prompt", None),
        data=getattr(args, "data", None), task=getattr(args, "task", None),
        limit=getattr(args, "limit", None), dev=getattr(args, "dev", None)))
    try:
        print(f"report: {write_report(args.out)}")
    except Exception as exc:  # the run's own files are written and whole: keep its exit code
        print(f"dpc-lens {args.command}: warning: the report could not be written ({type(exc).__name__}: "
              f"{exc}); the run's files are complete. Retry with: dpc-lens report {args.out}",
              file=sys.stderr)
    return rc


_COMMANDS = {"dpc": _cmd_dpc, "calibrate": _cmd_calibrate, "train-prompt": _cmd_train_prompt,
             "demo": _cmd_demo, "iap": _cmd_iap, "paths": _cmd_paths,
             "report": _cmd_report, "flows": _cmd_flows}

# how the library spells an option -> how the command line does
_CLI_WORDS = (("resume=True (--resume)", "--resume"), ("Pass --resume (resume=True)", "Pass --resume"),
              ("--resume (resume=True)", "--resume"), ("resume=True", "--resume"))


def _cli_message(msg: str) -> str:
    from .validate import cli_device_words

    for api, cli in _CLI_WORDS:
        msg = msg.replace(api, cli)
    return cli_device_words(msg)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dpc-lens`` and ``python -m dpc_lens``; returns the exit code (2 for a
    usage or input error, whose message says what was wrong and how to fix it)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse usage error (already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        _check_counts(args)
        return _with_report(args, _COMMANDS[args.command](args), argv)
    except DpcLensError as exc:
        print(f"dpc-lens {args.command}: {type(exc).__name__}: {_cli_message(str(exc))}", file=sys.stderr)
        return 2
