"""IAP on the arith reasoner: calibrate on ~100 dev questions, evaluate on ~100 test questions.

usage: python benchmarks/iap_arith.py CHECKPOINT_DIR OUT_DIR [N_TEST N_DEV MAX_NEW]
Writes OUT_DIR/{dev,test}/... and OUT_DIR/iap_arith.json (the small result file).
"""
import json
import sys
import time

import torch

from dpc_lens.generation import GenerationConfig
from dpc_lens.iap import CandidatePrompt, IAPRunConfig, PromptPool, calibrate_iap, format_summary, run_iap
from dpc_lens.model import load_model
from dpc_lens.tasks import get_task
from dpc_lens.tasks.arith import make_mixture
from dpc_lens.testbed.reasoner import HARD_PROMPTS

torch.set_num_threads(1)
ckpt, out = sys.argv[1], sys.argv[2]
n_test, n_dev, max_new = (int(x) for x in (sys.argv[3:6] or (100, 100, 96)))
task = get_task("arith")
model = load_model(ckpt, device="cpu")
_g = ["instructive"] * 8 + ["misleading", "irrelevant"]
pool = PromptPool(tuple(CandidatePrompt(t, g) for t, g in zip(HARD_PROMPTS, _g)))
test = make_mixture("mixed_test", n_test, seed=0)
dev = make_mixture("mixed_dev", n_dev, seed=1)
cfg = IAPRunConfig(generation=GenerationConfig(max_new_tokens=max_new, batch_size=32), saliency_batch_size=16)
t0 = time.time()
fit = calibrate_iap(model, dev, task, pool, cfg, out_dir=f"{out}/dev", resume=True)
t1 = time.time()
_, summary = run_iap(model, test, task, pool, fit.config, calibration=fit, out_dir=f"{out}/test", resume=True)
t2 = time.time()
print(format_summary(summary))
cal = fit.calibration
result = {
    "what": "IAP on the shipped arith reasoner, the 10 hard prompts of the reasoner vocabulary "
            "(reasoner.HARD_PROMPTS); standardiser and lam/tau/m fitted on make_mixture(mixed_dev, n, "
            "seed=1), evaluated on make_mixture(mixed_test, n, seed=0)",
    "checkpoint": ckpt,
    "n_test": n_test, "n_dev": n_dev, "max_new_tokens": max_new,
    "accuracy": summary["accuracy"],
    "mean_prompts_tried_ss": summary["mean_prompts_tried_ss"],
    "cost_per_question": summary["cost_per_question"],
    "chosen": {"iap_ss": cal.best_ss, "iap_mv": cal.best_mv},
    # the library's own diagnostics (dpc_lens.iap.diagnostics), as run_iap's summary has them
    "paired_differences": summary["paired_differences"],
    "reference_prompts": summary["reference_prompts"],
    "score_diagnostics": summary["score_diagnostics"],
    "degenerate": summary["degenerate"],
    "warnings": summary["warnings"],
    "dev_score_diagnostics": cal.score_diagnostics,
    "dev_degenerate": cal.degenerate,
    "dev_baselines": cal.baselines,
    "sensitivity": [dict(r) for r in cal.sensitivity],
    "wall_s": {"dev": t1 - t0, "test": t2 - t1},
}
with open(f"{out}/iap_arith.json", "w") as fh:
    json.dump(result, fh, indent=1)
