"""Stop tokens: GenerationConfig.stop_token_ids, and the turn-end tokens read from the tokenizer
(Gemma's <end_of_turn>, SmolLM2's <|im_end|>). Expected outputs come from an unstopped greedy run
cut by hand at the first stop token."""

from __future__ import annotations

import importlib.util

import pytest

from dpc_lens import generation as G
from dpc_lens.errors import ConfigError
from dpc_lens.generation import GenerationConfig, generate
from dpc_lens.testing import boot_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return boot_tiny("llama", tmp_path_factory.mktemp("stop_llama"), seed=2)


PROMPT = "ann has 3 apples and"


def _free(model, n=12):
    return generate(model, [PROMPT], config=GenerationConfig(max_new_tokens=n, stop_at_eos=False),
                    add_bos=True, progress=False)[0]


def test_stop_token_ids_cut_at_the_first_one(model):
    free = _free(model)
    assert len(free.token_ids) == 12
    t = free.token_ids[3]
    want = list(free.token_ids[: free.token_ids.index(t)])
    got = generate(model, [PROMPT], config=GenerationConfig(max_new_tokens=12, stop_at_eos=False,
                                                           stop_token_ids=(t,)),
                   add_bos=True, progress=False)[0]
    assert list(got.token_ids) == want and got.stop_reason == "stop_token"
    cfg = GenerationConfig(stop_token_ids=[t, 5])
    assert GenerationConfig.from_dict(cfg.to_dict()) == cfg and cfg.stop_token_ids == (t, 5)
    # settings written before the field existed compare equal (a run resumes)
    assert "stop_token_ids" not in GenerationConfig().to_dict()
    assert GenerationConfig.from_dict(GenerationConfig().to_dict()) == GenerationConfig()
    with pytest.raises(ConfigError, match="stop_token_ids"):
        GenerationConfig(stop_token_ids=("<end_of_turn>",))


def test_tokenizer_named_turn_end_stops_with_stop_at_eos(model, monkeypatch):
    free = _free(model)
    t = free.token_ids[2]
    eos = model.tokenizer.eos_token_id
    monkeypatch.setattr(G, "tokenizer_stop_ids", lambda tok: (eos, t))
    got = generate(model, [PROMPT], config=GenerationConfig(max_new_tokens=12), add_bos=True,
                   progress=False)[0]
    assert list(got.token_ids) == list(free.token_ids[: free.token_ids.index(t)])
    assert got.stop_reason == "stop_token"
    off = generate(model, [PROMPT], config=GenerationConfig(max_new_tokens=12, stop_at_eos=False),
                   add_bos=True, progress=False)[0]
    assert off.token_ids == free.token_ids


def test_tokenizer_stop_ids_reads_the_special_tokens(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    assert G.tokenizer_stop_ids(tok) == (tok.eos_token_id,)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    assert G.tokenizer_stop_ids(tok) == (tok.eos_token_id, len(tok) - 1)
    assert G.tokenizer_stop_ids(None) == ()


@pytest.mark.parametrize("name,turn_end", [("smollm2", "<|im_end|>"), ("gemma3-270m", "<end_of_turn>")])
def test_real_tokenizers(name, turn_end):
    from transformers import AutoTokenizer

    from dpc_lens import checkpoints

    row = checkpoints.KNOWN_MODELS[name]
    if importlib.util.find_spec(row.module) is None:
        pytest.skip(f"{row.package} is not installed")
    gguf = checkpoints.known_model_path(name).resolve()
    path = checkpoints._entry_dir(gguf, checkpoints.cache_dir())
    if not checkpoints._is_complete(path):
        if name != "smollm2":  # Gemma's first conversion (~2 min, 3.3 GB) belongs to the slower tier
            pytest.skip(f"{name} is not converted yet (load_model({name!r}) once)")
        path = checkpoints.convert_gguf(gguf, progress=False)  # SmolLM2 is installed in CI: convert
    tok = AutoTokenizer.from_pretrained(path)
    ids = G.tokenizer_stop_ids(tok)
    assert tok.convert_tokens_to_ids(turn_end) in ids and ids[0] == tok.eos_token_id
    print(name, ids, [tok.convert_ids_to_tokens(i) for i in ids])
