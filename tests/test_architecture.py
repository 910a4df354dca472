"""The shape of the house (issue 10): imports run one way.

Layers, bottom to top: pure maths and checks <- model orchestration (the core services) <- the
method wings (``dpc/``, ``iap/``; neither imports the other) <- plotting, the test bed and the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dpc_lens

ROOT = Path(dpc_lens.__file__).parent
PURE = {"errors", "_typing", "validate", "layers", "flows", "hook_names", "progress"}
CORE = {"model", "checkpoints", "segments", "soft_prompt", "saliency", "generation", "patching",
        "runs", "evaluation", "analysis", "prompt_tuning", "tasks", "testing"}
WINGS = {"dpc", "iap"}
RANK = {**{m: 0 for m in PURE}, **{m: 1 for m in CORE}, **{m: 2 for m in WINGS}}
TOP = 3  # plotting, cli, demo, testbed, reasoner, __main__, __init__, ...
#: the one renderer of tokens shaded by flow (issue 20): HTML from plain data and duck-typed
#: results, importing nothing above the pure layer, so the core's results and the wings' records
#: may call it for their ``_repr_html_`` / ``show`` (test_leaf_renderers_import_only_pure_modules)
LEAF_RENDERERS = {"dpc_lens.plotting.html"}


def _modules() -> dict[str, Path]:
    """Dotted name -> file; a package is named by its folder (``dpc_lens.dpc``, not
    ``dpc_lens.dpc.__init__``), so imports of a package are seen."""
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _unit(dotted: str) -> str:
    """The layer unit of a module: its first component under dpc_lens (a package or a module)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, dotted: str) -> set[str]:
    """Every dpc_lens module ``path`` imports, at module level or inside functions."""
    pkg = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]  # what "." names
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
            if (target if target in mods else target.rsplit(".", 1)[0]) == "dpc_lens":
                continue  # the lazy root (``__version__``, the curated names) imports nothing
            tunit = _unit(target)
            if tunit == unit:
                continue
            trank = RANK.get(tunit, TOP)
            if (target if target in mods else target.rsplit(".", 1)[0]) in LEAF_RENDERERS:
                trank = 0
            if trank > rank or (rank == trank == 2):
                bad.append(f"{dotted} ({unit}, layer {rank}) imports {target} ({tunit}, layer {trank})")
    assert not bad, "imports that run up the layers or across the wings:\n" + "\n".join(sorted(set(bad)))


def test_leaf_renderers_import_only_pure_modules():
    mods = _modules()
    for leaf in LEAF_RENDERERS:
        units = {_unit(t) for t in _imports(mods[leaf], leaf)
                 if t in mods or t.rsplit(".", 1)[0] in mods}
        assert units <= PURE, f"{leaf} imports {sorted(units - PURE)}; it must stay a leaf"


def _graph() -> dict[str, set[str]]:
    """Module -> the dpc_lens modules it imports (a name imported from a package counts as its
    submodule when it is one)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        out = set()
        for target in _imports(path, mod):
            if target in mods:
                out.add(target)
            elif target.rsplit(".", 1)[0] in mods:
                out.add(target.rsplit(".", 1)[0])
        graph[mod] = out - {mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    """No two modules import each other, directly or through others, at module level or inside
    functions (``cli -> demo -> cli`` was one); a package's ``__init__`` counts as a module, and
    the top-level ``dpc_lens/__init__`` (the lazy public API) is left out."""
    graph = {m: t - {"dpc_lens"} for m, t in _graph().items() if m != "dpc_lens"}
    assert _cycles(graph) == []


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: the most lines a module may have: past this, it holds more than one concern
MAX_LINES = 900


def test_no_module_over_the_line_limit():
    long = {d: n for d, p in _modules().items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


#: names that are a convention, not a copy: every script's entry point is ``main``
_CONVENTIONAL = {"main"}
#: known duplicates waiting on their owner (none left)
_PENDING: dict[str, set[str]] = {}


def test_no_function_defined_twice_under_one_name():
    """A module-level function name lives in one module only: a second definition is a copy that
    drifts (``_fill`` was two different functions; the reasoner had its own decoding loop)."""
    where: dict[str, set[str]] = {}
    for dotted, path in _modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where.setdefault(node.name, set()).add(dotted)
    twice = {n: sorted(m) for n, m in where.items()
             if len(m) > 1 and n not in _CONVENTIONAL and _PENDING.get(n) != m}
    assert not twice, f"functions defined in more than one module: {twice}"
