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
# # The accumulation detector and the Dynamic Trigger on one instance
#
# DPC (Fan et al., ICLR 2025) decides per instance whether the soft prompt hurts:
#
# 1. **Information accumulation** (shallow layers): the column score
#    $c_j = \sum_{l}\sum_{i \in \text{question} \cup \text{rationale}} I_l(i, j)$ of each soft token
#    $j$; a few columns carrying most of it is accumulation, and its top tokens are what DPC zeroes.
# 2. **Deep-layer flow** (the trigger): $f_i$, the deep-layer soft-prompt flow into rationale
#    token $i$; $\beta$ is the mean of $f$ over the first half of the rationale; a second-half token
#    is *affected* if $f_i > \beta$; the trigger fires if the affected share exceeds $R$.
#
# By default the detector uses *normalised* statistics (each row's share of its incoming flow):
# raw saliency grows with the loss, so a trigger on raw values measures the loss.
#
# Runs on the shipped model, else a tiny random one; `DPC_LENS_MODEL` / `DPC_LENS_SOFT_PROMPT`
# switch to your own checkpoint.

# %%
import os

import dpc_lens
from dpc_lens import plotting
from dpc_lens.dpc import fires_at_thresholds
from dpc_lens.tasks.arith import make_split
from dpc_lens.testbed import default_model, shipped_artefacts

# $DPC_LENS_MODEL / $DPC_LENS_SOFT_PROMPT, else the shipped reasoner, else a tiny random model
model, soft = default_model()
adapter = dpc_lens.as_adapter(model)
MODEL = os.environ.get("DPC_LENS_MODEL")
shipped = shipped_artefacts()
if shipped and not MODEL and os.path.exists(shipped["config"]):
    config = dpc_lens.DPCConfig.load(shipped["config"])
else:
    config = dpc_lens.DPCConfig(detector=dpc_lens.DetectorConfig(R=0.2))  # R is not given in the paper
config = dpc_lens.DPCConfig.from_dict({**config.to_dict(), "generation": {"max_new_tokens": 24}})
print(config.detector)

# %% [markdown]
# ## Step 1: generate with the soft prompt and measure
#
# `analyse` generates the rationale (greedy) and runs one forward + backward over
# `[soft; bos; question; rationale]`, reduced straight into the detector's four small tensors.

# %%
question = make_split("test", 1)[0].question
analysis = dpc_lens.analyse(model, soft, [question], config, progress=False)[0]
print(question, "->", analysis.generation.text)
inputs = analysis.inputs
print("soft columns", tuple(inputs.soft_columns.shape), "rationale rows", tuple(inputs.rationale_rows.shape))

# %% [markdown]
# ## Step 2: the trigger
#
# Every intermediate number is kept in the decision, and `reason` says in one sentence why it
# fired or not.

# %%
decision = dpc_lens.dynamic_trigger(inputs, config.detector)
print(decision.reason)
print("shallow layers", decision.shallow_layers, "deep layers", decision.deep_layers)
print("located soft tokens", decision.accumulation.top_indices,
      f"(max share {decision.accumulation.max_share:.2f}, max/mean {decision.accumulation.max_over_mean:.2f})")

# %% [markdown]
# Left: $f_i$ per rationale token, $\beta$, the half split and the affected tokens (red). Right:
# the shallow-layer accumulation score of every soft token, with the located one(s) in red.

# %%
tokens = adapter.tokenizer.convert_ids_to_tokens(list(analysis.generation.token_ids))
plotting.plot_trigger(decision, tokens=tokens)

# %% [markdown]
# ## Where the accumulation sits in the saliency map
#
# The same layout again, now keeping the full maps, summed over the shallow layers; the dashed
# red column is the located soft token.

# %%
ids = list(analysis.prompt_ids) + list(analysis.generation.token_ids)
n_prompt = len(analysis.prompt_ids)
layout = dpc_lens.SegmentLayout({"bos": (0, 1), "question": (1, n_prompt), "rationale": (n_prompt, len(ids))}, len(ids))
batch = dpc_lens.PromptBatch.build(adapter, [ids], [layout], soft)
full = dpc_lens.compute_saliency(model, batch, dpc_lens.SaliencyConfig(loss_segments=("rationale",), keep_full=True))
plotting.plot_saliency_heatmap(full, 0, layers=decision.shallow_layers, marked=decision)

# %% [markdown]
# ## The knobs
#
# R and the accumulation threshold change no statistic, so a sweep over them needs no
# recomputation. Layer sets, the statistic and the sink handling do: re-run the detector on the
# same cached inputs (well under a millisecond).

# %%
print("fires at R =", [0.0, 0.25, 0.5, 0.75], fires_at_thresholds([decision], [0.0, 0.25, 0.5, 0.75])[:, 0, 0].tolist())
for sink in ("keep", "exclude"):
    d = dpc_lens.dynamic_trigger(inputs, dpc_lens.DetectorConfig(sink=sink, R=config.detector.R))
    print(f"sink={sink:<8} located {d.accumulation.top_indices}  {d.reason}")

# %% [markdown]
# ## Step 3: corruption
#
# Zero the located soft token (positions stay; the caller's prompt is never changed) and answer
# again from scratch.

# %%
corrupted = dpc_lens.corrupt_soft_prompt(soft, decision.accumulation.top_indices, config.corruption)
again = dpc_lens.generate(model, [list(analysis.prompt_ids)], corrupted, config.generation, progress=False)
print("with the soft prompt:   ", analysis.generation.text)
print("located token corrupted:", again[0].text)
