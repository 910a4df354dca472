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
# # Instance-adaptive Prompting (IAP)
#
# Zero-shot chain of thought: the input is `[question; prompt; rationale]`, and no single hard
# prompt suits every question. IAP (Yuan et al., NeurIPS 2024) scores each candidate prompt per
# question by its information flows and picks one per instance:
#
# $$S_k = \lambda\, z(\text{question}\to\text{prompt}) + (1-\lambda)\, z(\text{question}\to\text{rationale}) \;(+\,\mu\, z(\text{prompt}\to\text{rationale}))$$
#
# with $z$ a per-flow standardisation fitted on dev data. **IAP-ss** answers with the first prompt
# whose score clears $\tau$; **IAP-mv** takes the majority answer among the top $m$ prompts.
#
# Runs on the shipped model, else a tiny random one; `DPC_LENS_MODEL` switches to your checkpoint.

# %%

from IPython.display import display

import dpc_lens
from dpc_lens import iap, plotting
from dpc_lens.tasks.arith import make_split
from dpc_lens.testbed import default_model

N_EXAMPLES = 4
# $DPC_LENS_MODEL, else the shipped reasoner, else a tiny random model
model, _ = default_model(with_soft_prompt=False)
adapter = dpc_lens.as_adapter(model)
task = dpc_lens.get_task("arith")
examples = make_split("test", N_EXAMPLES)
pool = dpc_lens.PromptPool(["Let's think step by step.", "First, solve the problem carefully.", "Just answer."])
print(f"{len(examples)} questions x {len(pool)} prompts")

# %% [markdown]
# ## Generate and score every (question, prompt) pair
#
# `run_iap` generates a rationale for each pair, runs one saliency pass over
# `[question; prompt; rationale]`, reduces the three flows over their layer sets, standardises
# them and applies both strategies and the baselines. Without a dev split the standardiser is
# fitted on the run's own pairs (the summary says so).

# %%
run_config = iap.IAPRunConfig(generation=dpc_lens.GenerationConfig(max_new_tokens=16))
pairs, summary = iap.run_iap(model, examples, task, pool, run_config, progress=False)
print(iap.format_summary(summary))

# %% [markdown]
# ## Per-layer flows of each prompt
#
# Good prompts show strong question->prompt flow in shallow layers and sustained
# question/prompt->rationale flow later. Each pair record holds its per-layer flows.

# %%
for k, prompt in enumerate(pool.texts):
    fig = plotting.plot_flow_curves([p for p in pairs if p["prompt_index"] == k],
                                    proportions=True, title=f"{prompt!r}: flow proportions over questions")
    display(fig)

# %% [markdown]
# ## The model-free core, by hand
#
# The same decision for one question, from the pairs' reduced flows: fit the standardiser, score,
# select.

# %%
standardizer = iap.fit_standardizer(pairs)
cfg = iap.IAPConfig()
# z-scores per question in pool order; a pair with an empty rationale (no flows) scores last
rec = iap.question_records(pairs, len(pool), standardizer)[0]
q0 = [p for p in pairs if p["id"] == examples[0].id]  # the first question's pairs, pool order
scores = rec.scores(cfg.lam, cfg.mu)
answers = rec.answers
print("scores ", [round(float(s), 3) for s in scores])
print("answers", answers)
print("IAP-ss:", iap.iap_ss(scores, answers, cfg.tau))
print("IAP-mv:", iap.iap_mv(scores, answers, cfg.m))

# %% [markdown]
# ## Layer x head maps
#
# One saliency pass with `per_head=True` over the first question's three pairs (each pair's
# rationale as generated above), laid out as `[bos; question; prompt; rationale]`.

# %%
bos = adapter.tokenizer.bos_token_id
question = examples[0].question
batch = dpc_lens.PromptBatch.from_pieces(adapter, [
    [("bos", [bos]), ("question", question), ("prompt", " " + p["prompt"]), ("rationale", p["rationale_ids"])]
    for p in q0 if p["rationale_ids"]
])
per_head = dpc_lens.compute_saliency(model, batch, dpc_lens.SaliencyConfig(loss_segments=("rationale",), per_head=True))
plotting.plot_head_maps(per_head, iap.IAP_FLOWS)
