"""End-to-end tests of the IAP pipeline on a tiny offline Llama (the reasoner's tokenizer).

What is pinned, and by what:

* the CLI run (``main(["iap", ...])``) writes the documented files; every (question, prompt)
  pair appears exactly once, also after a run killed half-way and resumed (with a torn last
  line);
* the summary's accuracies and IAP-ss cost equal counts recomputed here from ``pairs.jsonl``,
  ``standardizer.json`` and ``config.json`` alone (z-scores and scores written out by hand);
* the per-layer flows of a pair equal a direct :func:`compute_saliency` on a
  ``[bos; question; prompt; rationale]`` sequence built here from separately tokenised pieces
  (an independent check of the layout the pipeline finds by character offsets);
* a pair is generated and scored once, however many strategies and grid points are evaluated
  (``generate`` / ``compute_saliency`` calls counted with monkeypatch);
* chat-template spans, per-head maps and the error messages users see.

The golds of the data file are chosen from what the model generates (arith's answer rule: the
last number of the rationale), so that different prompts are right on different questions and
the accuracy checks compare non-trivial numbers. The model is random: its answers mean nothing.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter

import pytest
import torch

from dpc_lens.cli import main
from dpc_lens.errors import InputError
from dpc_lens.generation import GenerationConfig, generate
from dpc_lens.iap import (
    FLOW_PR,
    FLOW_QP,
    FLOW_QR,
    IAP_FLOWS,
    FlowStandardizer,
    IAPConfig,
    IAPRunConfig,
    PromptPool,
    calibrate_iap,
    encode_pair,
    evaluate,
    iap_mv,
    run_iap,
    score_pairs,
)
from dpc_lens.model import as_adapter, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch, SegmentLayout
from dpc_lens.tasks import get_task
from dpc_lens.tasks.arith import make_split, save_jsonl

POOL = ["Let's think step by step.", "Don't think. Just feel.", "Answer:"]
MAX_NEW = 8
N_LAYERS = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 3-layer Llama with the reasoner's tokenizer; weights spread out so greedy decoding
    varies between prompts instead of repeating one token, and nudged towards emitting numbers
    (a small constant embedding feature that only the digit and space logits read), so some
    rationales have an answer to extract."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpc_lens.testbed.reasoner import build_tokenizer

    d = tmp_path_factory.mktemp("iap_llama")
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
        m.model.embed_tokens.weight[:, 0] = 0.3
        numeric = tok.convert_tokens_to_ids(list("0123456789") + ["▁"])
        m.lm_head.weight[:, 0] = 0.0
        m.lm_head.weight[numeric, 0] = 4.0
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    torch.set_num_threads(1)
    return load_model(str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    """test.jsonl (4 arith questions, golds re-chosen: see the module docstring), dev.jsonl and
    the pool file."""
    d = tmp_path_factory.mktemp("iap_data")
    task = get_task("arith")
    adapter = as_adapter(model)
    exs = make_split("test", 4, seed=0)
    ids = [encode_pair(adapter.tokenizer, e.question, p)[0] for e in exs for p in POOL]
    gens = generate(adapter, ids, None, GenerationConfig(max_new_tokens=MAX_NEW), progress=False)
    answers = [task.extract_answer(g.text) for g in gens]
    rechosen = []
    for q, e in enumerate(exs):
        row = answers[3 * q:3 * q + 3]
        want = row[q % 3] if row[q % 3] is not None else next((a for a in row if a), e.answer)
        rechosen.append(type(e)(e.id, e.question, str(want), e.rationale, dict(e.meta)))
    save_jsonl(rechosen, d / "test.jsonl")
    save_jsonl(make_split("alt", 4, seed=1), d / "dev.jsonl")
    (d / "pool.txt").write_text("\n".join(POOL) + "\n", encoding="utf-8")
    return d


def cli_args(files, ckpt, out, *extra):
    return ["iap", "--model", str(ckpt), "--data", str(files / "test.jsonl"), "--task", "arith",
            "--prompts", str(files / "pool.txt"), "--out", str(out), "--max-new-tokens", str(MAX_NEW),
            "--device", "cpu", "--no-progress", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli_run(files, ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("iap_out") / "run"
    assert main(cli_args(files, ckpt, out, "--dev", str(files / "dev.jsonl"))) == 0
    return out


PAIR_KEYS = {"id", "question", "gold", "prompt_index", "prompt", "group", "rationale",
             "rationale_ids", "stop_reason", "flows", "flow_means", "layer_sets", "layers",
             "n_tokens", "loss", "chat_template", "flows_per_head", "answer", "correct", "scored"}


def test_cli_writes_every_file_and_one_record_per_pair(cli_run):
    for name in ("pairs.jsonl", "questions.jsonl", "summary.json", "config.json",
                 "standardizer.json", "dev/pairs.jsonl", "dev/calibration.json",
                 "dev/standardizer.json"):
        assert (cli_run / name).is_file(), name
    pairs = read_jsonl(cli_run / "pairs.jsonl")
    assert len(pairs) == 4 * 3
    assert Counter((r["id"], r["prompt"]) for r in pairs) == Counter(
        {(e, p): 1 for e in {r["id"] for r in pairs} for p in POOL})
    for r in pairs:
        assert set(r) == PAIR_KEYS
        assert r["prompt"] == POOL[r["prompt_index"]] and r["group"] == "custom"
        assert r["n_tokens"]["rationale"] == len(r["rationale_ids"]) > 0
        assert r["n_tokens"]["total"] == (r["n_tokens"]["bos"] + r["n_tokens"]["question"]
                                          + r["n_tokens"]["prompt"] + len(r["rationale_ids"]))
        assert r["layers"] == list(range(N_LAYERS))
        # default layer sets on 3 layers: first third = [0], last third = [2]
        assert r["layer_sets"] == {FLOW_QP: [0], FLOW_QR: [2], FLOW_PR: [2]}
        for f in IAP_FLOWS:
            assert len(r["flows"][f]) == N_LAYERS
            assert r["flow_means"][f] == pytest.approx(
                sum(r["flows"][f][i] for i in r["layer_sets"][f]) / len(r["layer_sets"][f]))
    dev = read_jsonl(cli_run / "dev" / "pairs.jsonl")
    assert len(dev) == 4 * 3 and not {r["id"] for r in dev} & {r["id"] for r in pairs}
    summary = json.loads((cli_run / "summary.json").read_text())
    assert summary["standardizer"]["fitted_on"] == "dev"
    assert summary["this_run"]["generations"] == 12 and summary["this_run"]["backward_passes"] == 12
    # the standardiser saved is the dev one, not refitted on the test pairs
    assert json.loads((cli_run / "standardizer.json").read_text())["mean"] == \
        json.loads((cli_run / "dev" / "standardizer.json").read_text())["mean"]


def test_summary_equals_counts_recomputed_from_pairs(cli_run):
    pairs = read_jsonl(cli_run / "pairs.jsonl")
    summary = json.loads((cli_run / "summary.json").read_text())
    cfg = json.loads((cli_run / "config.json").read_text())
    std = json.loads((cli_run / "standardizer.json").read_text())
    task = get_task("arith")
    by_q: dict[str, list[dict]] = {}
    for r in pairs:
        by_q.setdefault(r["id"], []).append(r)
    n = len(by_q)
    for r in pairs:  # "correct" is the task's verdict on the extracted answer
        assert r["answer"] == task.extract_answer(r["rationale"])
        assert r["correct"] == (r["answer"] is not None and float(r["answer"]) == float(r["gold"]))

    acc = summary["accuracy"]
    for p in POOL:
        right = sum(r["correct"] for r in pairs if r["prompt"] == p)
        assert acc["single"][p] == right / n
    assert sum(acc["single"].values()) > 0  # the golds make some pairs right (module docstring)

    def z(r, f):
        return (r["flow_means"][f] - std["mean"][f]) / std["std"][f]

    def score(r, c):
        return c["lam"] * z(r, FLOW_QP) + (1 - c["lam"]) * z(r, FLOW_QR) + c["mu"] * z(r, FLOW_PR)

    maj_right = ss_right = mv_right = oracle = tried = 0
    for rows in by_q.values():
        rows = sorted(rows, key=lambda r: r["prompt_index"])
        gold = rows[0]["gold"]
        votes = Counter(r["answer"] for r in rows if r["answer"] is not None)
        if votes:  # most votes, ties to the first in pool order
            top = max(votes.values())
            maj = next(r["answer"] for r in rows if votes.get(r["answer"]) == top)
            maj_right += task.is_correct(maj, gold)
        s_ss = [score(r, cfg["ss"]) for r in rows]
        k = next((i for i, s in enumerate(s_ss) if s >= cfg["ss"]["tau"]), None)
        if k is None:
            k, tried = max(range(3), key=lambda i: (s_ss[i], -i)), tried + 3
        else:
            tried += k + 1
        ss_right += rows[k]["correct"]
        pick = iap_mv([score(r, cfg["mv"]) for r in rows], [r["answer"] for r in rows], cfg["mv"]["m"])
        mv_right += task.is_correct(pick.answer, gold)
        oracle += any(r["correct"] for r in rows)
    assert acc["majority"] == maj_right / n
    assert acc["iap_ss"] == ss_right / n
    assert acc["iap_mv"] == mv_right / n
    assert acc["oracle"] == oracle / n
    assert summary["mean_prompts_tried_ss"] == pytest.approx(tried / n)
    cost = summary["cost_per_question"]
    assert cost["iap_ss"]["generations"] == pytest.approx(tried / n)
    assert cost["iap_ss"]["backward_passes"] == pytest.approx(tried / n)
    assert cost["iap_mv"] == {"generations": 3, "backward_passes": 3}
    questions = read_jsonl(cli_run / "questions.jsonl")
    assert [q["id"] for q in questions] == list(by_q)
    assert sum(q["iap_ss"]["correct"] for q in questions) == ss_right


def test_flows_equal_direct_saliency_on_the_same_sequence(cli_run, model):
    """Rebuild each pair's input from separately tokenised pieces and compare flows."""
    adapter = as_adapter(model)
    tok = adapter.tokenizer
    pairs = read_jsonl(cli_run / "pairs.jsonl")
    for r in pairs[:4]:  # two questions' worth of prompts keeps this fast
        q = tok(r["question"], add_special_tokens=False)["input_ids"]
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        rat = r["rationale_ids"]
        assert tok.decode(rat, skip_special_tokens=True) == r["rationale"]
        seq = [tok.bos_token_id] + q + p + rat
        a, b = 1 + len(q), 1 + len(q) + len(p)
        lay = SegmentLayout({"bos": (0, 1), "question": (1, a), "prompt": (a, b),
                             "rationale": (b, len(seq))}, len(seq))
        assert (r["n_tokens"]["question"], r["n_tokens"]["prompt"]) == (len(q), len(p))
        res = compute_saliency(adapter, PromptBatch.build(adapter, [seq], [lay]),
                               SaliencyConfig(loss_segments=("rationale",)))
        for f in IAP_FLOWS:
            src, dst = f.split("->")
            direct = res.flow(src, dst)[:, 0].double()
            assert torch.allclose(torch.tensor(r["flows"][f], dtype=torch.float64), direct,
                                  rtol=1e-4, atol=1e-9), f
        assert r["loss"] == pytest.approx(float(res.loss[0]), rel=1e-5)


def test_interrupted_run_resumes_without_losing_or_repeating_a_pair(cli_run, files, ckpt, tmp_path,
                                                                     monkeypatch):
    import dpc_lens.iap.pipeline as iap_mod

    real = iap_mod._score_items
    calls = []

    def dies_on_second_chunk(adapter, items, cfg, **kw):
        calls.append(len(items))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(adapter, items, cfg, **kw)

    out = tmp_path / "run"
    monkeypatch.setattr(iap_mod, "_score_items", dies_on_second_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        main(cli_args(files, ckpt, out, "--batch-size", "4"))
    first = read_jsonl(out / "pairs.jsonl")
    assert 0 < len(first) < 12
    with open(out / "pairs.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": "arith-test-0-3", "prom')  # a write cut by the kill
    assert main(cli_args(files, ckpt, out, "--batch-size", "4")) == 2  # refuses without --resume

    calls.clear()
    def counted(adapter, items, cfg, **kw):
        calls.append(len(items))
        return real(adapter, items, cfg, **kw)

    monkeypatch.setattr(iap_mod, "_score_items", counted)
    assert main(cli_args(files, ckpt, out, "--batch-size", "2", "--resume")) == 0  # batch size may change
    assert sum(calls) == 12 - len(first)  # only the missing pairs were computed
    pairs = read_jsonl(out / "pairs.jsonl")
    assert Counter((r["id"], r["prompt"]) for r in pairs) == Counter(
        {(r["id"], r["prompt"]): 1 for r in pairs}) and len(pairs) == 12
    # the same pairs as the uninterrupted run (greedy, batch-independent)
    ref = {(r["id"], r["prompt"]): r for r in read_jsonl(cli_run / "pairs.jsonl")}
    for r in pairs:
        assert r["rationale_ids"] == ref[(r["id"], r["prompt"])]["rationale_ids"]
        for f in IAP_FLOWS:
            assert r["flows"][f] == pytest.approx(ref[(r["id"], r["prompt"])]["flows"][f], rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["standardizer"]["fitted_on"] == "run"
    assert "own flows" in summary["standardizer"]["note"]
    assert summary["this_run"]["pairs_reused"] == len(first)


def test_resume_with_other_generation_settings_is_refused(files, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(files, ckpt, out, "--limit", "1")
    assert main(args) == 0
    args[args.index("--max-new-tokens") + 1] = "3"
    assert main(args + ["--resume"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_each_pair_is_generated_and_scored_once_whatever_is_evaluated(model, files, monkeypatch):
    import dpc_lens.generation as gen_mod
    import dpc_lens.saliency as sal_mod

    counts = Counter()
    real_gen, real_sal = gen_mod.generate, sal_mod.compute_saliency

    def count_gen(model, prompts, *a, **kw):
        counts["generated"] += len(prompts)
        return real_gen(model, prompts, *a, **kw)

    def count_sal(model, batch, *a, **kw):
        counts["saliency_rows"] += batch.batch_size
        counts["saliency_passes"] += 1
        return real_sal(model, batch, *a, **kw)

    monkeypatch.setattr(gen_mod, "generate", count_gen)
    monkeypatch.setattr(sal_mod, "compute_saliency", count_sal)
    task = get_task("arith")
    pool = PromptPool(POOL)
    dev = task.load(files / "dev.jsonl")[:2]
    test = task.load(files / "test.jsonl")[:2]
    cfg = IAPRunConfig(generation=GenerationConfig(max_new_tokens=4), saliency_batch_size=8)
    fit = calibrate_iap(model, dev, task, pool, cfg, progress=False)  # 5 x 6 + 5 x 3 grid points
    pairs, _ = run_iap(model, test, task, pool, fit.config, standardizer=fit.standardizer,
                       progress=False)
    for lam in (0.0, 0.5, 1.0):
        for tau, m in ((-1.0, 1), (0.0, 2), (2.0, 3)):
            c = IAPRunConfig(ss=IAPConfig(lam=lam, tau=tau), mv=IAPConfig(lam=lam, m=m))
            evaluate(pairs, pool, fit.standardizer, c, task)
    n_pairs = (len(dev) + len(test)) * len(pool)
    assert counts["generated"] == n_pairs
    assert counts["saliency_rows"] == n_pairs
    assert counts["saliency_passes"] == 2  # one batch of 6 pairs on each split


def test_chat_template_spans_hold_exactly_the_question_and_the_prompt(model):
    from dpc_lens.testbed.reasoner import build_tokenizer

    tok = build_tokenizer()
    question, prompt = "Ann has 7 pens. How many pens does Ann have now?", "Let's think step by step."
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}the : {{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %} answer :{% endif %}")
    ids, spans, templated = encode_pair(tok, question, prompt)
    assert templated and ids[0] == tok.bos_token_id and "bos" not in spans  # BOS from the template
    assert tok.decode(ids[slice(*spans["question"])]) == question
    assert tok.decode(ids[slice(*spans["prompt"])]) == prompt
    assert tok.decode(ids[1:spans["question"][0]]).strip() == "the :"  # template: no segment
    assert tok.decode(ids[spans["prompt"][1]:]).strip() == "answer :"
    plain, plain_spans, t2 = encode_pair(tok, question, prompt, chat_template="never")
    assert not t2 and plain == [tok.bos_token_id] + tok(question + " " + prompt,
                                                        add_special_tokens=False)["input_ids"]
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        encode_pair(tok, question, prompt, chat_template="always")


def test_per_head_maps_and_unscored_pairs(model):
    recs = score_pairs(model, ["Ann has 7 pens. How many pens does Ann have now?"], POOL[:2],
                       generation_config=GenerationConfig(max_new_tokens=3), per_head=True,
                       progress=False)
    assert [r.prompt_index for r in recs] == [0, 1]
    n_heads = as_adapter(model).n_heads
    for r in recs:
        for f in IAP_FLOWS:
            heads = r.flows_per_head[f]
            assert len(heads) == N_LAYERS and all(len(h) == n_heads for h in heads)
            assert all(math.isfinite(x) and x >= 0 for h in heads for x in h)
            # |sum_h .| <= sum_h |.| per query/key pair, so the head-summed flow is bounded
            for layer in range(N_LAYERS):
                assert r.flows[f][layer] <= sum(heads[layer]) * (1 + 1e-5) + 1e-12
    # an unscored pair (empty rationale) ranks below every scored one
    from dpc_lens.iap import question_records

    std = FlowStandardizer(mean={f: 0.0 for f in IAP_FLOWS}, std={f: 1.0 for f in IAP_FLOWS})
    rows = [{"flow_means": {f: 2.0 for f in IAP_FLOWS}, "scored": True, "answer": "1"},
            {"flow_means": {}, "scored": False, "answer": None}]
    (qr,) = question_records(rows, 2, std)
    assert qr.z_qp == (2.0, 1.0) and qr.answers == ("1", None)


def test_run_iap_errors_say_how_to_fix(model, files, tmp_path):
    task = get_task("arith")
    exs = task.load(files / "test.jsonl")[:1]
    with pytest.raises(InputError, match="FlowStandardizer"):
        run_iap(model, exs, task, POOL, standardizer={"mean": {}}, progress=False)
    with pytest.raises(InputError, match="unique"):
        run_iap(model, exs + exs, task, POOL, progress=False)


def test_summary_diagnostics_equal_a_hand_computation_from_the_pairs(cli_run):
    """``score_diagnostics``, ``paired_differences`` and ``degenerate`` of the CLI run, recomputed
    here from ``pairs.jsonl``, ``standardizer.json``, ``config.json`` and the dev calibration."""
    pairs = read_jsonl(cli_run / "pairs.jsonl")
    summary = json.loads((cli_run / "summary.json").read_text())
    cfg = json.loads((cli_run / "config.json").read_text())
    std = json.loads((cli_run / "standardizer.json").read_text())
    dev_cal = json.loads((cli_run / "dev" / "calibration.json").read_text())
    by_q: dict[str, list[dict]] = {}
    for r in pairs:
        by_q.setdefault(r["id"], []).append(r)
    groups = [sorted(rows, key=lambda r: r["prompt_index"]) for rows in by_q.values()]

    def z(r, f):
        return (r["flow_means"][f] - std["mean"][f]) / std["std"][f]

    def within(vals):  # slow loop: (right, wrong) prompt pairs of one question, ties half
        wins = n = 0.0
        for rows in groups:
            for a in rows:
                for b in rows:
                    if a["correct"] and not b["correct"]:
                        va, vb = vals(a), vals(b)
                        wins += 1.0 if va > vb else 0.5 if va == vb else 0.0
                        n += 1
        return (wins / n if n else None), int(n)

    diag = summary["score_diagnostics"]
    assert set(IAP_FLOWS) <= set(diag)
    for f in IAP_FLOWS:
        value, n = within(lambda r, f=f: z(r, f))
        assert diag[f]["within_question_pairs"] == n
        assert diag[f]["within_question_auc"] == (None if value is None else pytest.approx(value))
    assert n > 0  # the golds make some questions mixed (module docstring)
    same = (cfg["ss"]["lam"], cfg["ss"]["mu"]) == (cfg["mv"]["lam"], cfg["mv"]["mu"])
    assert ("score" in diag) == same and ("score_ss" in diag) != same
    c = cfg["ss"]
    value, _ = within(lambda r: c["lam"] * z(r, FLOW_QP) + (1 - c["lam"]) * z(r, FLOW_QR)
                      + c["mu"] * z(r, FLOW_PR))
    assert diag["score" if same else "score_ss"]["within_question_auc"] == pytest.approx(value)

    # paired differences: the mean is the accuracy difference on the same questions
    acc = summary["accuracy"]
    refs = summary["reference_prompts"]
    assert refs["first"] == POOL[0] and refs["best_single_chosen_on"] == "dev"
    assert refs["best_single"] == POOL[max(range(3), key=lambda k: dev_cal["baselines"]["single"][k])]
    diffs = summary["paired_differences"]
    for name in ("iap_ss", "iap_mv", "majority"):
        d = diffs[name]["vs_first_prompt"]
        assert d["diff"] == pytest.approx(acc[name] - acc["single"][POOL[0]])
        assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        best = acc["single"][refs["best_single"]]
        assert diffs[name]["vs_best_single"]["diff"] == pytest.approx(acc[name] - best)
    assert diffs["oracle"]["vs_first_prompt"]["diff"] == pytest.approx(acc["oracle"] - acc["single"][POOL[0]])

    # degenerate: IAP-mv's m against the pool size, by hand
    deg = summary["degenerate"] or {}
    m = cfg["mv"]["m"]
    assert ("iap_mv" in deg) == (m == 1 or m >= 3)
    assert summary["dev"]["degenerate"] == dev_cal["degenerate"]
    assert summary["dev"]["score_diagnostics"] == dev_cal["score_diagnostics"]
    assert isinstance(summary["warnings"], list)


def test_run_iap_warns_when_the_score_does_not_rank(model, files):
    """On the random model the score cannot rank prompts: run_iap says so with an IAPScoreWarning
    naming the within-question AUC, and the summary holds the same line."""
    from dpc_lens.iap.diagnostics import IAPScoreWarning
    from dpc_lens.tasks import load_examples

    task = get_task("arith")
    exs = load_examples(str(files / "test.jsonl"), task)
    cfg = IAPRunConfig(generation=GenerationConfig(max_new_tokens=MAX_NEW))
    with pytest.warns(IAPScoreWarning, match="does not rank prompts within a question") as rec:
        _, summary = run_iap(model, exs, task, POOL, cfg, progress=False)
    assert [str(w.message) for w in rec if w.category is IAPScoreWarning] == summary["warnings"]
    assert summary["reference_prompts"]["best_single_chosen_on"].startswith("this run's own questions")
    with pytest.raises(InputError, match="calibration must be what calibrate_iap returned"):
        run_iap(model, exs, task, POOL, cfg, calibration={"lam": 0.5}, progress=False)


def test_calibrate_iap_warns_about_the_dev_score_too(model, files):
    from dpc_lens.iap.diagnostics import IAPScoreWarning
    from dpc_lens.tasks import load_examples

    task = get_task("arith")
    dev = load_examples(str(files / "test.jsonl"), task)
    cfg = IAPRunConfig(generation=GenerationConfig(max_new_tokens=MAX_NEW))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = calibrate_iap(model, dev, task, POOL, cfg, progress=False)
    lines = [str(w.message) for w in caught if w.category is IAPScoreWarning]
    assert lines == [f"on the dev split: {line}" for line in fit.calibration.warnings]
