"""The shape of the house (issue 10): imports run one way.

Layers, bottom to top: pure maths and checks <- model orchestration (the core services) <- the
method wings (``dpc/``, ``iap/``; neither imports the other) <- plotting, the test bed and the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dpc_lens

ROOT = Path(dpc_lens.__file__).parent
PURE = {"errors", "_typing", "validate", "layers", "flows", "hook_names"}
CORE = {"model", "checkpoints", "segments", "soft_prompt", "saliency", "generation", "patching",
        "runs", "evaluation", "analysis", "prompt_tuning", "tasks", "testing"}
WINGS = {"dpc", "iap"}
RANK = {**{m: 0 for m in PURE}, **{m: 1 for m in CORE}, **{m: 2 for m in WINGS}}
TOP = 3  # plotting, cli, demo, testbed, reasoner, __main__, __init__, ...


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts): p for p in ROOT.rglob("*.py")}


def _unit(dotted: str) -> str:
    """The layer unit of a module: its first component under dpc_lens (a package or a module)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, dotted: str) -> set[str]:
    """Every dpc_lens module ``path`` imports, at module level or inside functions."""
    pkg = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dpc_lens")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("dpc_lens"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_imports_run_down_the_layers_and_wings_stay_apart():
    mods = _modules()
    bad = []
    for dotted, path in mods.items():
        unit = _unit(dotted)
        rank = RANK.get(unit, TOP)
        for target in _imports(path, dotted):
            if target not in mods and target.rsplit(".", 1)[0] not in mods:
                continue  # a name imported from a module, counted through its module
            tunit = _unit(target)
            if tunit == unit or target == "dpc_lens":
                continue
            trank = RANK.get(tunit, TOP)
            if trank > rank or (rank == trank == 2):
                bad.append(f"{dotted} ({unit}, layer {rank}) imports {target} ({tunit}, layer {trank})")
    assert not bad, "imports that run up the layers or across the wings:\n" + "\n".join(sorted(set(bad)))
