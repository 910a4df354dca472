# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Dynamic Prompt Corruption over a data set
#
# `run_dpc` runs the whole method per instance: generate with the soft prompt, one saliency pass,
# the Dynamic Trigger, and — when it fires — zero the located soft token(s) and answer again. Next
# to it, the paper's ablations on the same questions: the base model without the soft prompt,
# corruption on every instance (`always`) and corruption of random soft tokens (`random`).
# Records are appended to `records.jsonl` as they are produced, so a killed run resumes.
#
# Runs on the shipped model and test set, else a tiny random model on generated arithmetic
# questions. `DPC_LENS_MODEL` / `DPC_LENS_SOFT_PROMPT` switch to your checkpoint;
# `DPC_LENS_DATA` and `DPC_LENS_TASK` (`gsm8k`, `math`, `aqua`, `arith`) to a local data file.

# %%
import os
import tempfile

import dpc_lens
from dpc_lens import plotting
from dpc_lens.tasks.arith import make_split
from dpc_lens.testbed import default_model, shipped_artefacts

N_EXAMPLES = 8
MODEL = os.environ.get("DPC_LENS_MODEL")
SOFT_PROMPT = os.environ.get("DPC_LENS_SOFT_PROMPT")
DATA = os.environ.get("DPC_LENS_DATA")
TASK = os.environ.get("DPC_LENS_TASK", "arith")
shipped = shipped_artefacts()
# $DPC_LENS_MODEL / $DPC_LENS_SOFT_PROMPT, else the shipped reasoner, else a tiny random model
model, soft = default_model()
adapter = dpc_lens.as_adapter(model)

task = dpc_lens.get_task(TASK)
if DATA:
    examples = dpc_lens.load_examples(DATA, task)[:N_EXAMPLES]
elif shipped and not MODEL:
    examples = dpc_lens.load_examples(shipped["test"], task)[:N_EXAMPLES]
else:
    examples = make_split("test", N_EXAMPLES)
if shipped and not MODEL and os.path.exists(shipped["config"]):
    config = dpc_lens.DPCConfig.load(shipped["config"])
else:
    config = dpc_lens.DPCConfig(detector=dpc_lens.DetectorConfig(R=0.2))  # R is not given in the paper
config = dpc_lens.DPCConfig.from_dict({**config.to_dict(), "generation": {"max_new_tokens": 24}})
print(f"{len(examples)} examples; detector: {config.detector}")

# %% [markdown]
# ## Run

# %%
out_dir = tempfile.mkdtemp(prefix="dpc_lens_nb03_")
records, summary = dpc_lens.run_dpc(model, soft, examples, task, config, out_dir=out_dir, progress=False)
summary

# %% [markdown]
# `ceiling` counts instances right without the soft prompt and wrong with it: the most any
# trigger could recover. `oracle` is the accuracy of the best of the base and prompt-tuned answers
# per instance.
#
# One record holds every answer, the trigger's numbers and the per-layer flows:

# %%
first = records[0]
{k: first[k] for k in ("id", "gold", "pt", "dpc", "located_rows")}

# %% [markdown]
# ## The figures
#
# `save_standard_figures` writes the standard set next to the records (`dpc-lens dpc --plots`
# does the same); each figure is also one function call.

# %%
paths = plotting.save_standard_figures(out_dir)
[os.path.basename(p) for p in paths]

# %% [markdown]
# Per-layer flows, as proportions of the three DPC flows (mean ± std over instances):

# %%
plotting.plot_flow_curves(records)

# %% [markdown]
# Deep-layer soft->rationale flow of the instances prompt tuning got right vs wrong. Raw saliency
# grows with the loss (wrong answers have larger flows of every kind); the proportion removes that
# common scale.

# %%
plotting.plot_correct_vs_wrong(records)

# %% [markdown]
# The paper's Fig. 5: does shallow accumulation go with a change in the deep-layer flow, and how
# accurate is prompt tuning in each cell?

# %%
plotting.plot_contingency(records)

# %% [markdown]
# DPC before / after: accuracy of every method, the flips against prompt tuning, and which soft
# tokens were located and corrupted.

# %%
plotting.plot_before_after(records)

# %% [markdown]
# Why the trigger fired on the first instance where it did:

# %%
fired = [r for r in records if r["dpc"]["fired"]]
print(f"{len(fired)} of {len(records)} fired")
shown = fired[0] if fired else next(r for r in records if r["trigger"])
plotting.plot_trigger(shown, title=f"{shown['id']}: {shown['trigger']['reason']}")
