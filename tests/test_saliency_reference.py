"""compute_saliency against an independent, slow, obviously-correct reference (STYLE item 7).

The reference never goes through dpc_lens's engine, adapter or flow maths:

* for Hugging Face architectures it runs the checkpoint directly with ``transformers``
  (``output_attentions=True``, ``attentions[l].retain_grad()``);
* for the TransformerLens-native bridge and the HookedTransformer it runs ``run_with_hooks`` from
  *token* input, with the soft prompt written into ``hook_embed`` and the pattern gradient taken
  by a backward hook on ``hook_pattern`` (a different route from the engine's forward hook +
  tensor gradient hook over embedding input);
* the loss is the teacher-forced mean NLL written out here token by token;
* ``I_l = |sum_h A * dL/dA|`` and every flow / column / row score are computed with explicit
  Python loops over ``(i, j)`` pairs.

A finite-difference check on a one-layer float64 model pins the gradient itself.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

from dpc_lens.model import as_adapter, hooked_transformer_class, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.testing import ARCHITECTURES, save_tiny_hf_model

ATOL = 1e-6
RTOL = 1e-5
N_SOFT = 3
PIECES = [("question", "ann has 3 apples ."), ("prompt", "let's think"), ("rationale", "so 3 + 2 = 5 .")]
PIECES_SHORT = [("question", "bob buys 2 pens"), ("rationale", "2 pens")]
PIECES_MID = [("question", "how many cats ?"), ("prompt", "think"), ("rationale", "3 cats and 4 dogs")]
FULL_CFG = dict(column_targets=("rationale",), row_sources=("soft", "question"), keep_full=True)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    return {a: save_tiny_hf_model(a, tmp_path_factory.mktemp(f"ref_{a}"), seed=1) for a in ARCHITECTURES}


@pytest.fixture(scope="session")
def bridges(hf_dirs):
    return {}


def _bridge(bridges, hf_dirs, arch):
    if arch == "opt":
        # TL 4.3's OPT bridge registers 6 hooks of its own at load time (mlp.in.hook_in,
        # mlp.out.hook_out, hook_mlp_out per block), which the conftest leak check counts as
        # leaks. Never cache it: the test loads it, checks the hook counts itself, and drops it.
        return load_model(hf_dirs[arch], device="cpu")
    if arch not in bridges:
        bridges[arch] = load_model(hf_dirs[arch], device="cpu")
    return bridges[arch]


def hook_snapshot(model) -> dict[str, int]:
    """Hook count per hook point (forward, backward, pre), for before/after comparisons."""
    out = {}
    for name, hp in model.hook_dict.items():
        n = len(hp._forward_hooks) + len(hp._backward_hooks) + len(hp._forward_pre_hooks)
        if n:
            out[name] = n
    return out


@pytest.fixture(scope="session")
def soft_prompt():
    g = torch.Generator().manual_seed(123)
    return SoftPrompt(torch.randn(N_SOFT, 32, generator=g) * 0.5)


# --------------------------------------------------------------------------- reference maths
def ref_nll(logits: torch.Tensor, token_ids: list[int], targets: list[int]) -> torch.Tensor:
    """Teacher-forced mean NLL of the tokens at positions ``targets`` (token t scored at t-1)."""
    terms = []
    for t in targets:
        logp = torch.log_softmax(logits[t - 1].double(), dim=-1)
        terms.append(-logp[token_ids[t]])
    return torch.stack(terms).sum() / len(terms)


def ref_saliency(A: torch.Tensor, G: torch.Tensor, *, per_head=False, signed=False, diag=False):
    """``A``, ``G``: [head, q, k] of one example and layer. Loops written out on purpose."""
    H, Q, K = A.shape
    prod = (A.double() * G.double())
    if per_head:
        out = prod.clone()
    else:
        out = torch.zeros(Q, K, dtype=torch.float64)
        for h in range(H):
            out += prod[h]
    if not signed:
        out = out.abs()
    if not diag:
        for i in range(min(Q, K)):
            out[..., i, i] = 0.0
    return out


def ref_flow_mean(I: torch.Tensor, src: range, tgt: range, diag=False):
    total, n = 0.0, 0
    for i in tgt:
        for j in src:
            if j < i or (diag and j == i):
                total += float(I[i, j])
                n += 1
    return (total / n if n else math.nan), n


def ref_columns(I, targets: list[int]):
    K = I.shape[-1]
    raw, share = [0.0] * K, [0.0] * K
    for i in targets:
        row_total = sum(float(I[i, jj]) for jj in range(K))
        for j in range(K):
            raw[j] += float(I[i, j])
            if row_total > 0:
                share[j] += float(I[i, j]) / row_total
    return torch.tensor(raw, dtype=torch.float64), torch.tensor(share, dtype=torch.float64)


def ref_rows(I, sources: list[int]):
    Q, K = I.shape
    rs = [sum(float(I[i, j]) for j in sources) for i in range(Q)]
    tot = [sum(float(I[i, j]) for j in range(K)) for i in range(Q)]
    return torch.tensor(rs, dtype=torch.float64), torch.tensor(tot, dtype=torch.float64)


def _close(got, ref, msg=""):
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), atol=ATOL, rtol=RTOL, msg=msg)


# --------------------------------------------------------------------------- references
def hf_reference(model_dir, tokenizer, pieces, soft: torch.Tensor | None, **load_kwargs):
    """Run the HF checkpoint directly; return (per-layer A, per-layer G, spans, loss).
    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``gguf_file=`` for a GGUF checkpoint)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                           **load_kwargs)
    hf.eval()
    ids, spans = [], {}
    P = 0 if soft is None else soft.shape[0]
    if P:
        spans["soft"] = (0, P)
    for name, text in pieces:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        spans[name] = (P + len(ids), P + len(ids) + len(toks))
        ids.extend(toks)
    with torch.no_grad():
        tok_emb = hf.get_input_embeddings()(torch.tensor([ids]))
    emb = tok_emb if soft is None else torch.cat([soft[None].to(tok_emb.dtype), tok_emb], dim=1)
    out = hf(inputs_embeds=emb, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    full_ids = [-1] * P + ids
    rs, re = spans["rationale"]
    loss = ref_nll(out.logits[0], full_ids, list(range(max(rs, 1), re)))
    loss.backward()
    A = [a.detach()[0] for a in out.attentions]
    G = [a.grad.detach()[0] for a in out.attentions]
    return A, G, spans, loss.detach(), out.logits.detach()[0]


def tl_reference(model, tokenizer, pieces, soft: torch.Tensor, n_layers: int):
    """TransformerLens route: token input, soft prompt written into hook_embed, pattern gradient
    from backward hooks on hook_pattern (never the engine's forward-hook/tensor-hook route)."""
    ids, spans = [], {}
    P = soft.shape[0]
    spans["soft"] = (0, P)
    for name, text in pieces:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        spans[name] = (P + len(ids), P + len(ids) + len(toks))
        ids.extend(toks)
    # placeholder ids (hook_embed overwrites their embeddings); never the pad id, which a
    # HookedTransformer with a left-padding tokenizer would mask out
    full_ids = [tokenizer.unk_token_id] * P + ids
    assert tokenizer.unk_token_id != tokenizer.pad_token_id
    leaf = soft.clone().requires_grad_(True)  # the graph starts here (weights are frozen)
    pats, grads = {}, {}

    def put_soft(x, hook):
        x = x.clone()
        x[:, :P] = leaf.to(x.dtype)
        return x

    live = {}

    def keep(x, hook):
        pats[hook.name] = x.detach()[0]
        x.retain_grad()  # second route, for bridges whose backward hooks do not fire
        live[hook.name] = x

    def keep_grad(g, hook):
        grads[hook.name] = g.detach()[0]

    names = [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]
    fwd = [("hook_embed", put_soft)] + [(n, keep) for n in names]
    # Backward hooks on hook_pattern are the main route. On the TL 3.9 bridge a backward hook
    # on hook_pattern cuts the pattern off the graph (neither it nor retain_grad sees a
    # gradient), so there the retained gradient alone is used.
    ht = hooked_transformer_class()
    use_bwd = ht is None or isinstance(model, ht)
    bwd = [(n, keep_grad) for n in names] if use_bwd else []
    # hooks() rather than run_with_hooks: the latter drops backward hooks before backward runs
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = model(torch.tensor([full_ids]))
        rs, re = spans["rationale"]
        loss = ref_nll(logits[0], [-1] * P + ids, list(range(max(rs, 1), re)))
        loss.backward()
    # The fixture in conftest checks the hooks are gone afterwards.
    A = [pats[n] for n in names]
    G = []
    for n in names:
        retained = live[n].grad
        assert retained is not None or n in grads, f"no gradient reached {n}"
        if n in grads and retained is not None:  # both routes: they must agree
            torch.testing.assert_close(grads[n], retained[0], atol=0, rtol=0)
        G.append(grads[n] if n in grads else retained[0].detach())
    return A, G, spans, loss.detach(), logits.detach()[0]


# --------------------------------------------------------------------------- comparison
def compare_all(res, A, G, spans, *, b=0, offset=0, diag=False, layers=None):
    """Compare every reduced output of ``res`` (example ``b``, positions shifted by ``offset``
    for left padding) with the loop reference built from ``A``/``G``."""
    layers = list(range(len(A))) if layers is None else layers
    assert list(res.layers) == layers
    for li, l in enumerate(layers):
        I = ref_saliency(A[l], G[l], diag=diag)
        T = I.shape[0]
        # full map
        full = res.full[li, b, offset:offset + T, offset:offset + T]
        _close(full, I, msg=f"full map layer {l}")
        if offset:
            assert torch.count_nonzero(res.full[li, b, :offset]) == 0
            assert torch.count_nonzero(res.full[li, b, :, :offset]) == 0
        # segment flows, every ordered pair with a nonzero count
        n_checked = 0
        for sname, (ss, se) in spans.items():
            for tname, (ts, te) in spans.items():
                ref, n = ref_flow_mean(I, range(ss, se), range(ts, te), diag=diag)
                si, ti = res.segment_names.index(sname), res.segment_names.index(tname)
                assert int(res.pair_counts[b, ti, si]) == n, (sname, tname)
                if n == 0:
                    assert math.isnan(float(res.flow(sname, tname)[li, b]))
                    continue
                n_checked += 1
                got = float(res.flow(sname, tname)[li, b])
                assert got == pytest.approx(ref, rel=RTOL, abs=ATOL), (l, sname, tname)
        assert n_checked >= 6
        # columns over rationale rows, rows from soft+question sources
        tgt = list(range(*spans["rationale"]))
        raw, share = ref_columns(I, tgt)
        _close(res.column_sums[li, b, offset:offset + T], raw, msg=f"column_sums layer {l}")
        _close(res.column_shares[li, b, offset:offset + T], share, msg=f"column_shares layer {l}")
        src = [j for n in ("soft", "question") if n in spans for j in range(*spans[n])]
        rsum, rtot = ref_rows(I, src)
        _close(res.row_sums[li, b, offset:offset + T], rsum, msg=f"row_sums layer {l}")
        _close(res.row_totals[li, b, offset:offset + T], rtot, msg=f"row_totals layer {l}")


def _engine(model, pieces, soft, **cfg):
    adapter = as_adapter(model)
    batch = PromptBatch.from_pieces(adapter, [pieces], soft)
    conf = dict(FULL_CFG)
    conf.update(cfg)
    return compute_saliency(model, batch, SaliencyConfig(**conf)), batch


# --------------------------------------------------------------------------- HF architectures
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_hf_reference(arch, hf_dirs, bridges, soft_prompt):
    model = _bridge(bridges, hf_dirs, arch)
    hooks_before = hook_snapshot(model)
    tok = as_adapter(model).tokenizer
    A, G, spans, loss, ref_logits = hf_reference(hf_dirs[arch], tok, PIECES, soft_prompt.embeddings)
    if arch == "llama":  # GQA: patterns carry n_heads, not n_kv_heads
        assert A[0].shape[0] == model.cfg.n_heads == 4
    res, batch = _engine(model, PIECES, soft_prompt)
    # same input, same model: the logits agree (else the comparison below means nothing)
    with torch.no_grad():
        logits = as_adapter(model).forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
    _close(logits[0], ref_logits, msg="bridge logits vs HF logits")
    assert float(res.loss[0]) == pytest.approx(float(loss), rel=1e-6, abs=1e-6)
    assert res.layouts[0].spans == spans
    # the saliency is not trivially zero
    assert max(float(ref_saliency(a, g).max()) for a, g in zip(A, G)) > 1e-4
    compare_all(res, A, G, spans)
    assert hook_snapshot(model) == hooks_before
    if arch == "opt":
        del model, res, batch
        gc.collect()


def test_native_bridge_matches_reference(native_model, soft_prompt):
    tok = as_adapter(native_model).tokenizer
    n = native_model.cfg.n_layers
    A, G, spans, loss, _ = tl_reference(native_model, tok, PIECES, soft_prompt.embeddings, n)
    res, _ = _engine(native_model, PIECES, soft_prompt)
    assert float(res.loss[0]) == pytest.approx(float(loss), rel=1e-6, abs=1e-6)
    compare_all(res, A, G, spans)


# --------------------------------------------------------------------------- options
@pytest.fixture(scope="module")
def llama_case(hf_dirs, bridges, soft_prompt):
    model = _bridge(bridges, hf_dirs, "llama")
    tok = as_adapter(model).tokenizer
    A, G, spans, _, _ = hf_reference(hf_dirs["llama"], tok, PIECES, soft_prompt.embeddings)
    return model, A, G, spans


def test_upper_triangle_exactly_zero(llama_case, soft_prompt):
    model, *_ = llama_case
    for kw in ({}, {"signed": True}, {"include_diagonal": True}, {"per_head": True, "signed": True}):
        res, _ = _engine(model, PIECES, soft_prompt, **kw)
        T = res.full.shape[-1]
        upper = torch.ones(T, T, dtype=torch.bool).triu(1)
        assert torch.all(res.full[..., upper] == 0), kw
        assert torch.count_nonzero(res.full[..., ~upper]) > 0
        if not kw.get("include_diagonal"):
            assert torch.all(torch.diagonal(res.full, dim1=-2, dim2=-1) == 0)


def test_per_head_signed_matches_reference_and_sums_to_default(llama_case, soft_prompt):
    model, A, G, spans = llama_case
    res, _ = _engine(model, PIECES, soft_prompt, per_head=True, signed=True)
    default, _ = _engine(model, PIECES, soft_prompt)
    assert res.full.shape[:3] == (2, 1, 4)
    for l in range(2):
        _close(res.full[l, 0], ref_saliency(A[l], G[l], per_head=True, signed=True))
    _close(res.full.sum(2).abs(), default.full)
    # flows per head are per-head sums of the per-head map; their head sum is the signed flow
    signed, _ = _engine(model, PIECES, soft_prompt, signed=True)
    _close(res.flow_sums.sum(2), signed.flow_sums)


def test_signed_matches_reference(llama_case, soft_prompt):
    model, A, G, spans = llama_case
    res, _ = _engine(model, PIECES, soft_prompt, signed=True)
    has_negative = False
    for l in range(2):
        ref = ref_saliency(A[l], G[l], signed=True)
        _close(res.full[l, 0], ref)
        has_negative |= bool((ref < -1e-6).any())
        s, e = spans["question"]
        t0, t1 = spans["rationale"]
        mean, _ = ref_flow_mean(ref, range(s, e), range(t0, t1))
        assert float(res.flow("question", "rationale")[l, 0]) == pytest.approx(mean, rel=RTOL, abs=ATOL)
    assert has_negative, "signed saliency should have negative entries on a random model"


def test_include_diagonal_matches_reference(llama_case, soft_prompt):
    model, A, G, spans = llama_case
    res, _ = _engine(model, PIECES, soft_prompt, include_diagonal=True)
    compare_all(res, A, G, spans, diag=True)
    assert float(torch.diagonal(res.full, dim1=-2, dim2=-1).abs().sum()) > 0


def test_layer_subset_is_slice_of_all_layers(llama_case, soft_prompt):
    model, A, G, spans = llama_case
    full, _ = _engine(model, PIECES, soft_prompt)
    last, _ = _engine(model, PIECES, soft_prompt, layers=(-1,))
    assert last.layers == (1,)
    for key in ("flow_sums", "full", "column_sums", "column_shares", "row_sums", "row_totals"):
        _close(getattr(last, key)[0], getattr(full, key)[1], msg=key)
    compare_all(last, A, G, spans, layers=[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_one_by_one(arch, hf_dirs, bridges, soft_prompt):
    model = _bridge(bridges, hf_dirs, arch)
    adapter = as_adapter(model)
    examples = [PIECES, PIECES_SHORT, PIECES_MID]
    cfg = SaliencyConfig(**FULL_CFG)
    batch = PromptBatch.from_pieces(adapter, examples, soft_prompt)
    assert len(set(batch.pad_lengths)) == 3  # three different lengths, padded
    res = compute_saliency(model, batch, cfg)
    T = batch.seq_len
    for b, ex in enumerate(examples):
        one = compute_saliency(model, PromptBatch.from_pieces(adapter, [ex], soft_prompt), cfg)
        p = batch.pad_lengths[b]
        n = T - p
        assert float(res.loss[b]) == pytest.approx(float(one.loss[0]), rel=1e-6, abs=1e-6)
        _close(res.full[:, b, p:, p:], one.full[:, 0], msg=f"full map example {b}")
        _close(res.column_sums[:, b, p:], one.column_sums[:, 0])
        _close(res.column_shares[:, b, p:], one.column_shares[:, 0])
        _close(res.row_sums[:, b, p:], one.row_sums[:, 0])
        _close(res.row_totals[:, b, p:], one.row_totals[:, 0])
        for s in one.segment_names:
            for t in one.segment_names:
                a, c = res.flow(s, t)[:, b], one.flow(s, t)[:, 0]
                assert torch.equal(torch.isnan(a), torch.isnan(c)), (s, t)
                ok = ~torch.isnan(c)
                _close(a[ok], c[ok], msg=f"{s}->{t} example {b}")
        # pads carry nothing
        assert torch.count_nonzero(res.full[:, b, :p]) == 0
        assert torch.count_nonzero(res.full[:, b, :, :p]) == 0
        assert n == one.full.shape[-1]
    # and example 1 (padded) still matches the independent reference
    A, G, spans, _, _ = hf_reference(hf_dirs[arch], adapter.tokenizer, PIECES_SHORT, soft_prompt.embeddings)
    compare_all(res, A, G, spans, b=1, offset=batch.pad_lengths[1])


# --------------------------------------------------------------------------- finite differences
@pytest.fixture(scope="module")
def one_layer_f64(tmp_path_factory):
    # GPT-2, not Llama: HF's Llama RMSNorm and eager softmax compute in float32 even in a
    # float64 model, which leaves ~1e-7 relative noise in the loss and ruins central differences.
    d = save_tiny_hf_model("gpt2", tmp_path_factory.mktemp("fd_gpt2"), seed=3, n_layers=1)
    return load_model(d, device="cpu", dtype=torch.float64)


def test_gradient_matches_finite_differences(one_layer_f64):
    model = one_layer_f64
    adapter = as_adapter(model)
    assert adapter.dtype == torch.float64
    g = torch.Generator().manual_seed(5)
    soft = SoftPrompt(torch.randn(2, 32, generator=g, dtype=torch.float64) * 0.5)
    pieces = [("question", "ann has 3 pens"), ("rationale", "so 3 pens")]
    batch = PromptBatch.from_pieces(adapter, [pieces], soft)
    ids = batch.token_ids[0].tolist()
    rs, re = batch.layouts[0].spans["rationale"]
    hook = "blocks.0.attn.hook_pattern"

    # The loss is given explicitly, in float64 end to end: the default target_nll casts the
    # logits to float32, which would limit the comparison to ~1e-7 relative.
    def f64_loss(logits, b):
        return ref_nll(logits[0], ids, list(range(rs, re)))

    res = compute_saliency(model, batch, SaliencyConfig(
        per_head=True, signed=True, include_diagonal=True, keep_full=True, fp32=False), loss_fn=f64_loss)
    AG = res.full[0, 0]  # [head, q, k] = A * dL/dA
    assert AG.dtype == torch.float64

    def loss_with(h=None, i=None, j=None, eps=0.0, keep=None):
        def patch(x, hook):
            if keep is not None:
                keep.append(x.detach().clone())
            if eps:
                x = x.clone()
                x[0, h, i, j] += eps
            return x

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook, patch)]):
            logits = adapter.forward_embeds(batch.embeds, batch.attention_mask, batch.position_ids)
        return float(ref_nll(logits[0], ids, list(range(rs, re))))

    kept: list[torch.Tensor] = []
    base = loss_with(keep=kept)
    assert base == pytest.approx(float(res.loss[0]), rel=1e-6)
    A = kept[0][0]
    # the patching hook really reaches the output (else finite differences are all zero)
    T = A.shape[-1]
    assert re == T and loss_with(0, T - 2, 0, 1e-2) != base
    # the last row predicts nothing the loss scores: zero gradient, in the engine and in truth
    assert loss_with(0, T - 1, 0, 1e-2) == base
    assert float(AG[:, T - 1].abs().max()) == 0.0
    checked = 0
    entries = [(0, T - 2, 0), (1, T - 2, 2), (3, T - 3, 1), (2, rs, rs - 1), (1, T - 2, T - 2),
               (0, rs - 1, 3)]
    for h, i, j in entries:
        assert A[h, i, j] > 1e-3, (h, i, j)
        eps = 1e-5
        fd = (loss_with(h, i, j, eps) - loss_with(h, i, j, -eps)) / (2 * eps)
        engine_grad = float(AG[h, i, j] / A[h, i, j])
        assert engine_grad == pytest.approx(fd, rel=1e-6, abs=1e-9), (h, i, j, engine_grad, fd)
        checked += 1
    assert checked == 6


# --------------------------------------------------------------------------- HookedTransformer
@pytest.mark.hooked
@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_hooked_transformer_matches_reference(positional, soft_prompt):
    if hooked_transformer_class() is None:
        pytest.skip("HookedTransformer needs transformer-lens < 4")
    from dpc_lens.testing import hooked_tiny

    model = hooked_tiny(positional=positional, seed=7)
    tok = as_adapter(model).tokenizer
    A, G, spans, loss, _ = tl_reference(model, tok, PIECES, soft_prompt.embeddings, model.cfg.n_layers)
    res, _ = _engine(model, PIECES, soft_prompt)
    assert float(res.loss[0]) == pytest.approx(float(loss), rel=1e-6, abs=1e-6)
    compare_all(res, A, G, spans)
    # batched with left padding equals the reference too (positions must skip the pads)
    adapter = as_adapter(model)
    batch = PromptBatch.from_pieces(adapter, [PIECES, PIECES_SHORT], soft_prompt)
    resb = compute_saliency(model, batch, SaliencyConfig(**FULL_CFG))
    A2, G2, spans2, _, _ = tl_reference(model, tok, PIECES_SHORT, soft_prompt.embeddings, model.cfg.n_layers)
    compare_all(resb, A2, G2, spans2, b=1, offset=batch.pad_lengths[1])
