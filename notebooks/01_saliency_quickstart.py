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
# # Saliency and information flow in five minutes
#
# The saliency score of Wang et al. (2023), for layer $l$ and attention heads $h$:
#
# $$I_l = \left|\sum_h A_{h,l} \odot \frac{\partial L}{\partial A_{h,l}}\right|$$
#
# $I_l(i, j)$ is the flow from source token $j$ (column) into target token $i$ (row). dpc_lens
# captures it with TransformerLens hooks in one teacher-forced forward + backward pass and reduces
# it to *segment flows*: the mean of $I_l(i, j)$ over $i$ in the target segment and $j$ in the
# source segment.
#
# This notebook runs on the model shipped with dpc_lens when it is installed, else on a tiny
# random model (its numbers mean nothing; the plumbing is real). Set `DPC_LENS_MODEL` (and
# `DPC_LENS_SOFT_PROMPT`, a PEFT prompt-tuning adapter) to use your own checkpoint.

# %%


import dpc_lens
from dpc_lens import plotting
from dpc_lens.tasks.arith import make_split
from dpc_lens.testbed import default_model

# $DPC_LENS_MODEL / $DPC_LENS_SOFT_PROMPT, else the shipped reasoner, else a tiny random model
model, soft = default_model()
adapter = dpc_lens.as_adapter(model)
print(f"{adapter.n_layers} layers, {adapter.n_heads} heads, soft prompt of {soft.n_tokens} tokens")

# %% [markdown]
# ## A rationale to measure
#
# Saliency needs a loss. At inference time there is no label, so the default loss is the
# teacher-forced NLL of the model's *own* rationale. Generate one per question with the soft
# prompt first (as PEFT does), then lay out the input as named segments
# `[soft; bos; question; rationale]`.

# %%
questions = [ex.question for ex in make_split("test", 3)]
gen_cfg = dpc_lens.GenerationConfig(max_new_tokens=16)
gens = dpc_lens.generate(model, questions, soft, gen_cfg, add_bos=True, progress=False)
bos = adapter.tokenizer.bos_token_id
examples = [
    [("bos", [bos]), ("question", q), ("rationale", list(g.token_ids))]
    for q, g in zip(questions, gens)
]
batch = dpc_lens.PromptBatch.from_pieces(adapter, examples, soft)
for q, g in zip(questions, gens):
    print(q, "->", g.text)
print(batch.layouts[0])

# %% [markdown]
# ## One saliency pass
#
# `keep_full=True` also keeps every layer's full map (for the heatmap below); without it only the
# segment sums are stored.

# %%
result = dpc_lens.compute_saliency(model, batch, dpc_lens.SaliencyConfig(loss_segments=("rationale",), keep_full=True))
names = ["soft->question", "soft->rationale", "question->rationale"]
flows = result.flows(names)  # name -> [layer, batch]
for n, v in flows.items():
    print(f"{n:<22}", " ".join(f"{x:.2e}" for x in v[:, 0].tolist()))
result.to_dataframe().head()

# %% [markdown]
# ## The tokens themselves
#
# `result.show(...)` shades one example's tokens by a flow, as inseq's `out.show()` does: the
# flow *from* a source segment (or a group of them) into each token, or from each token *into* a
# target, averaged over a layer or a band of layers (`"shallow"`, `"deep"`, a list, a fraction
# pair). Hover a token for its value; the table below it gives the mean flow between segments
# over the same layers. In a notebook the result itself (`result`) shows example 0 this way, and
# `result.show(...).save("view.html")` writes a self-contained page.

# %%
result.show(0, source="soft", layers="deep")

# %%
result.show(0, target="rationale", layers=[0, 1])

# %% [markdown]
# ## Per-layer flows
#
# Proportions (each layer's flows sum to 1, as Wang et al. plot them) remove the overall scale of
# the gradient, which grows with the loss; the raw values keep it. The band is mean ± std over the
# examples of the batch (or the IQR with `band="iqr"`).

# %%
plotting.plot_flow_curves(result, names)

# %%
plotting.plot_flow_curves(result, names, proportions=False, band="iqr")

# %% [markdown]
# ## The map of one example
#
# Rows are target tokens, columns source tokens; white lines are segment boundaries. Here the
# saliency is summed over all layers.

# %%
plotting.plot_saliency_heatmap(result, example=0)

# %% [markdown]
# ## Per head
#
# `per_head=True` keeps the head axis (abs per head instead of after the head sum), for layer x
# head maps.

# %%
per_head = dpc_lens.compute_saliency(model, batch, dpc_lens.SaliencyConfig(loss_segments=("rationale",), per_head=True))
plotting.plot_head_maps(per_head, names)
