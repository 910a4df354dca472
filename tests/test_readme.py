"""Every ```python block of the README runs as written (the front door cannot rot again).

The blocks name checkpoints by documented placeholders; each is replaced by a real file made
here: ``path/to/llama`` -> a tiny random Llama checkpoint saved like a Hugging Face model
(``dpc_lens.testing.save_tiny_hf_model``), ``path/to/adapter`` -> a PEFT prompt-tuning adapter
for it. Nothing else of a block is changed; blocks run in order in one namespace, in a fresh
working directory (a block may write ``out/...``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDERS = ("path/to/llama", "path/to/adapter")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_blocks_and_only_known_placeholders():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README lost its API tour"
    for b in blocks:
        for path in re.findall(r"\"(path/to/[^\"]*)\"", b):
            assert path in PLACEHOLDERS, f"a README block names {path!r}; add it to PLACEHOLDERS"


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    import dpc_lens as dl
    from dpc_lens.model import as_adapter
    from dpc_lens.testing import save_tiny_hf_model

    model_dir = save_tiny_hf_model("llama", tmp_path / "llama", d_model=32)
    soft = dl.SoftPrompt.from_tokens(as_adapter(dl.load_model(model_dir, device="cpu")), [5, 6, 7, 8])
    soft.save_peft(tmp_path / "adapter", base_model_name_or_path=model_dir)
    paths = {"path/to/llama": model_dir, "path/to/adapter": str(tmp_path / "adapter")}
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict = {}
    for k, block in enumerate(python_blocks(README.read_text(encoding="utf-8"))):
        for placeholder, real in paths.items():
            block = block.replace(f'"{placeholder}"', repr(real))
        try:
            exec(compile(block, f"README.md python block {k}", "exec"), namespace)
        except Exception as exc:  # name the block: the traceback points into README text
            pytest.fail(f"README python block {k} failed: {type(exc).__name__}: {exc}\n{block}")
    assert (work / "out").exists()
