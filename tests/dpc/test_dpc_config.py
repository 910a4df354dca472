"""DPC config and run guards: unknown fields, bad corruption values, chunk sizes, resume with a
changed config, and per-example random-baseline rows."""

from __future__ import annotations

import pytest
import torch

from dpc_lens.dpc import DPCConfig, random_rows_for, run_dpc
from dpc_lens.errors import ConfigError, InputError
from dpc_lens.generation import GenerationConfig
from dpc_lens.patching import CorruptionConfig
from dpc_lens.soft_prompt import SoftPrompt
from dpc_lens.tasks.base import Example


class FirstWord:
    name = "first-word"

    def extract_answer(self, text):
        return text.split()[0] if text.split() else None

    def is_correct(self, pred, gold):
        return pred == gold


def test_dpc_config_from_dict_names_unknown_fields():
    d = DPCConfig().to_dict()
    d["treshold"] = 0.3
    with pytest.raises(ConfigError, match=r"DPCConfig has an unknown key 'treshold'.*its keys are"):
        DPCConfig.from_dict(d)
    d = DPCConfig().to_dict()
    d["corruption"]["gama"] = 10  # nested: a dpc_lens error with a did-you-mean, not a TypeError
    with pytest.raises(ConfigError,
                       match=r"CorruptionConfig has an unknown key 'gama' \(did you mean 'gamma'\?\)"):
        DPCConfig.from_dict(d)
    assert DPCConfig.from_dict(DPCConfig().to_dict()).to_dict() == DPCConfig().to_dict()


def test_corruption_config_rejects_non_numbers():
    with pytest.raises(ConfigError, match="scale must be a number"):
        CorruptionConfig(mode="scale", scale="0.5")
    with pytest.raises(ConfigError, match="gamma is a percentage"):
        CorruptionConfig(gamma=120)


def test_random_rows_depend_on_seed_and_id_not_on_order():
    a = [random_rows_for(i, 16, 2, seed=0) for i in ("q1", "q2", "q3")]
    b = [random_rows_for(i, 16, 2, seed=0) for i in ("q3", "q1", "q2")]
    assert a == [b[1], b[2], b[0]]
    assert all(len(set(r)) == 2 and all(0 <= x < 16 for x in r) for r in a)
    draws = {tuple(random_rows_for("q1", 16, 2, seed=s)) for s in range(8)}
    assert len(draws) > 1  # the seed matters


@pytest.fixture()
def small_run(tiny_llama):
    soft = SoftPrompt(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 0.1)
    exs = [Example(id=str(i), question=q, answer="7")
           for i, q in enumerate(["ann has 7 pens .", "bob has 3 cats ."])]
    cfg = DPCConfig(generation=GenerationConfig(max_new_tokens=3, stop_at_eos=False), baselines=())
    return tiny_llama, soft, exs, cfg


def test_chunk_size_must_be_positive(small_run):
    model, soft, exs, cfg = small_run
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError, match="chunk_size must be an int >= 1"):
            run_dpc(model, soft, exs, FirstWord(), cfg, chunk_size=bad, progress=False)


def test_resume_with_another_config_is_refused_and_keeps_the_old_config(small_run, tmp_path):
    from dataclasses import replace

    model, soft, exs, cfg = small_run
    run_dpc(model, soft, exs[:1], FirstWord(), cfg, out_dir=tmp_path, progress=False)
    saved = (tmp_path / "config.json").read_text()
    other = replace(cfg, detector=replace(cfg.detector, R=0.9))
    with pytest.raises(InputError, match=r"another config \(differs in \['detector'\]\)"):
        run_dpc(model, soft, exs, FirstWord(), other, out_dir=tmp_path, resume=True, progress=False)
    assert (tmp_path / "config.json").read_text() == saved
    # a different batch size changes no record, so resuming with it is fine
    same = replace(cfg, saliency_batch_size=3, generation=replace(cfg.generation, batch_size=7))
    recs, _ = run_dpc(model, soft, exs, FirstWord(), same, out_dir=tmp_path, resume=True, progress=False)
    assert [r["id"] for r in recs] == ["0", "1"]
