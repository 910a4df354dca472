"""The ``dpc-lens`` command line: a thin layer that parses arguments and calls the library.

Commands:

* ``demo`` — the whole method on the shipped reasoner, soft prompt and test set (offline).
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
from typing import Sequence

from .errors import DpcLensError

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    if data:
        p.add_argument("--data", required=True, help="local data file (JSONL, or as the task reads)")
        p.add_argument("--task", required=True, help="gsm8k, math, aqua or arith")
        p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpc-lens", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run base / prompt tuning / DPC on the shipped test bed")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test examples")
    p.add_argument("--plots", action="store_true", help="also write the standard figures")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("dpc", help="Dynamic Prompt Corruption over a data set")
    _add_common(p)
    p.add_argument("--soft-prompt", required=True, help="PEFT prompt-tuning adapter directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None, help="a dpc_config.json (e.g. from calibrate)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--baselines", default=None, help="comma list of base,always,random ('' for none)")
    p.add_argument("--plots", action="store_true", help="also write the standard figures")

    p = sub.add_parser("calibrate", help="fit the DPC trigger on a labelled dev split")
    _add_common(p)
    p.add_argument("--soft-prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="base dpc_config.json")
    p.add_argument("--max-new-tokens", type=int, default=None)

    p = sub.add_parser("train-prompt", help="vanilla prompt tuning, saved as a PEFT adapter")
    _add_common(p)
    p.add_argument("--dev", default=None, help="dev data file for early stopping")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--n-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("iap", help="Instance-adaptive Prompting over a data set")
    _add_common(p)
    p.add_argument("--prompts", default=None,
                   help="prompt pool: .json list or one prompt per line (default: the built-in nine)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dev", default=None,
                   help="labelled dev file: fit the standardiser and calibrate lam, tau, m on it first "
                        "(without it the standardiser is fitted on the run's own flows)")
    p.add_argument("--dev-limit", type=int, default=None, help="use only the first N dev examples")
    p.add_argument("--config", default=None, help="an IAP config.json to start from")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="generation batch size")
    p.add_argument("--per-head", action="store_true", help="also keep layer x head flow maps")
    p.add_argument("--chat-template", choices=("auto", "never", "always"), default=None)
    return parser


def _load(args):
    from .model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _examples(args, path=None):
    from .tasks import get_task, load_examples

    task = get_task(args.task)
    exs = load_examples(path or args.data, task)
    if getattr(args, "limit", None):
        exs = exs[: args.limit]
    return task, exs


def _dpc_config(args):
    from dataclasses import replace

    from .dpc import DPCConfig

    cfg = DPCConfig.load(args.config) if args.config else DPCConfig()
    if getattr(args, "max_new_tokens", None):
        cfg = replace(cfg, generation=replace(cfg.generation, max_new_tokens=args.max_new_tokens))
    if getattr(args, "baselines", None) is not None:
        cfg = replace(cfg, baselines=tuple(b for b in args.baselines.split(",") if b))
    return cfg


def print_summary(summary: dict, file=None) -> None:
    """The accuracy table: methods, trigger rate, flips, ceiling and oracle."""
    file = file or sys.stdout
    acc = summary.get("accuracy", {})
    print(f"n = {summary.get('n', 0)}", file=file)
    print(f"{'method':<10} {'accuracy':>9}", file=file)
    for name in ("base", "pt", "dpc", "always", "random", "oracle"):
        if name in acc:
            print(f"{name:<10} {100 * acc[name]:>8.1f}%", file=file)
    if "trigger_rate" in summary:
        f = summary.get("flips", {})
        print(f"trigger rate {100 * summary['trigger_rate']:.1f}%  flips wrong->right "
              f"{f.get('wrong_to_right', 0)}  right->wrong {f.get('right_to_wrong', 0)}", file=file)
    if "ceiling" in summary:
        print(f"right without prompt & wrong with it (ceiling): {summary['ceiling']}   "
              f"the other way: {summary['pt_only']}", file=file)


def _cmd_dpc(args) -> int:
    from .dpc import run_dpc
    from .soft_prompt import SoftPrompt

    model = _load(args)
    soft = SoftPrompt.from_peft(args.soft_prompt)
    task, exs = _examples(args)
    _, summary = run_dpc(model, soft, exs, task, _dpc_config(args), out_dir=args.out,
                         resume=args.resume, progress=not args.no_progress)
    print_summary(summary)
    if args.plots:
        _plots(args.out)
    print(f"records: {os.path.join(args.out, 'records.jsonl')}")
    return 0


def _plots(out_dir: str) -> None:
    try:
        from .plotting import save_standard_figures
    except ImportError:
        print("plots: dpc_lens.plotting is not available in this install", file=sys.stderr)
        return
    save_standard_figures(out_dir)


def _cmd_calibrate(args) -> int:
    from .calibration import calibrate_dpc
    from .soft_prompt import SoftPrompt

    model = _load(args)
    soft = SoftPrompt.from_peft(args.soft_prompt)
    task, exs = _examples(args)
    cal = calibrate_dpc(model, soft, exs, task, _dpc_config(args), progress=not args.no_progress)
    cal.save(args.out)
    d = cal.to_dict()
    keep = ("best_point", "best_accuracy", "pt_accuracy", "gain", "oracle_accuracy", "n_generations")
    print(json.dumps({k: d[k] for k in keep if k in d}, indent=2))
    print(f"chosen config: {os.path.join(args.out, 'dpc_config.json')}")
    return 0


def _cmd_train_prompt(args) -> int:
    from dataclasses import replace

    from .prompt_tuning import PromptTuningConfig, train_soft_prompt

    model = _load(args)
    task, exs = _examples(args)
    dev = _examples(args, args.dev)[1] if args.dev else None
    cfg = PromptTuningConfig(n_tokens=args.n_tokens, steps=args.steps, seed=args.seed)
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    if args.batch_size is not None:
        cfg = replace(cfg, batch_size=args.batch_size)
    res = train_soft_prompt(model, exs, cfg, dev_examples=dev, progress=not args.no_progress)
    res.soft_prompt.save_peft(args.out, base_model_name_or_path=args.model)
    res.save(os.path.join(args.out, "training_history.json"))
    print(f"adapter: {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, limit=args.limit, progress=not args.no_progress, plots=args.plots)


def _cmd_iap(args) -> int:
    from dataclasses import replace

    from .iap import IAPRunConfig, PromptPool, calibrate_iap, format_summary, run_iap

    cfg = IAPRunConfig.load(args.config) if args.config else IAPRunConfig()
    gen = cfg.generation
    if args.max_new_tokens:
        gen = replace(gen, max_new_tokens=args.max_new_tokens)
    if args.batch_size:
        gen = replace(gen, batch_size=args.batch_size)
    cfg = replace(cfg, generation=gen, per_head=args.per_head or cfg.per_head,
                  chat_template=args.chat_template or cfg.chat_template)
    pool = PromptPool.from_file(args.prompts) if args.prompts else PromptPool.default()
    task, exs = _examples(args)
    model = _load(args)
    progress = not args.no_progress
    std = None
    if args.dev:
        from .tasks import load_examples

        dev = load_examples(args.dev, task)[: args.dev_limit or None]
        fit = calibrate_iap(model, dev, task, pool, cfg, out_dir=os.path.join(args.out, "dev"),
                            resume=args.resume, progress=progress)
        cfg, std = fit.config, fit.standardizer
        print(f"dev calibration: IAP-ss {fit.calibration.best_ss}  IAP-mv {fit.calibration.best_mv}")
    _, summary = run_iap(model, exs, task, pool, cfg, standardizer=std, out_dir=args.out,
                         resume=args.resume, progress=progress)
    print(format_summary(summary))
    print(f"pairs: {os.path.join(args.out, 'pairs.jsonl')}")
    return 0


_COMMANDS = {"dpc": _cmd_dpc, "calibrate": _cmd_calibrate, "train-prompt": _cmd_train_prompt,
             "demo": _cmd_demo, "iap": _cmd_iap}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dpc-lens`` and ``python -m dpc_lens``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except DpcLensError as exc:
        print(f"dpc-lens {args.command}: error: {exc}", file=sys.stderr)
        return 2
