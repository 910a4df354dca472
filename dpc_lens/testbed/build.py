"""Build the shipped DPC test bed: soft prompt, dev/test sets and the calibrated DPC config.

``python -m dpc_lens.testbed`` (deterministic, offline, CPU) writes into ``dpc_lens/data/``:

* ``soft_prompt/`` — 16 soft tokens prompt-tuned with :func:`dpc_lens.train_soft_prompt` on the
  ``alt_train`` mixture (the new phrasing the base reasoner solves about a third of), saved as a
  PEFT adapter with its training log;
* ``dev.jsonl`` (300) and ``test.jsonl`` (600) — the ``mixed_dev`` / ``mixed_test`` mixtures:
  half standard phrasing (the base reasoner solves them, the soft prompt hurts some), half alt
  phrasing (the soft prompt helps): base and prompt-tuned accuracy close, flips both ways, the
  regime of the DPC paper (see :mod:`dpc_lens.testbed.reasoner`'s docstring for the measurements);
* ``dpc_config.json`` + ``calibration.json`` — the DPC config calibrated on dev
  (:func:`dpc_lens.calibrate_dpc`).

The base reasoner itself is built by ``python -m dpc_lens.testbed.reasoner`` (``dpc_lens/data/reasoner``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

__all__ = ["build_testbed", "TESTBED_GENERATION"]

#: decoding used everywhere on the test bed (rationales of 1-3 steps fit well inside 64 tokens)
TESTBED_GENERATION = {"max_new_tokens": 64, "batch_size": 32}


def build_testbed(data_dir: str | None = None, *, steps: int = 600, progress: bool | None = None,
                  n_dev: int = 300, n_test: int = 600) -> dict:
    """Train the soft prompt, write the splits and calibrate; return the measurements."""
    from ..dpc import DPCConfig, calibrate_dpc
    from ..generation import GenerationConfig
    from ..model import load_model
    from ..prompt_tuning import PromptTuningConfig, train_soft_prompt
    from ..tasks import get_task
    from ..tasks.arith import make_mixture
    from ..tasks.io import write_jsonl
    from . import data_dir as default_dir

    d = data_dir or default_dir()
    t0 = time.perf_counter()
    model = load_model(os.path.join(d, "reasoner"), device="cpu")
    train = make_mixture("alt_train", 2000, seed=0)
    dev_pt = make_mixture("alt_train", 100, seed=7)
    cfg = PromptTuningConfig(n_tokens=16, lr=2e-2, batch_size=32, steps=steps, eval_every=50,
                             patience=4, seed=0)
    res = train_soft_prompt(model, train, cfg, dev_examples=dev_pt, progress=progress)
    res.save_adapter(os.path.join(d, "soft_prompt"), base_model_name_or_path="dpc_lens/data/reasoner")
    t_pt = time.perf_counter() - t0
    dev = make_mixture("mixed_dev", n_dev, seed=1)
    test = make_mixture("mixed_test", n_test, seed=0)
    write_jsonl(os.path.join(d, "dev.jsonl"), dev)
    write_jsonl(os.path.join(d, "test.jsonl"), test)
    base = DPCConfig(generation=GenerationConfig(**TESTBED_GENERATION),
                     baselines=("base", "always", "random"))
    cal = calibrate_dpc(model, res.soft_prompt, dev, get_task("arith"), base, progress=progress)
    cal.save(d)
    out = {"prompt_tuning_s": t_pt, "total_s": time.perf_counter() - t0, "best_step": res.best_step,
           "best_dev_loss": res.best_dev_loss, "calibration": {k: cal.to_dict()[k] for k in
           ("best_point", "best_accuracy", "pt_accuracy", "corruption_oracle_accuracy", "n_generations")}}
    with open(os.path.join(d, "testbed_build.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=2)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpc_lens.testbed",
                                 description="Build the shipped DPC test bed (soft prompt, splits, config).")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = build_testbed(args.data_dir, steps=args.steps, progress=not args.no_progress)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
