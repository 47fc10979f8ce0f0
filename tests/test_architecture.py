"""The package's import structure: no cycles, and the layers that stay uncrossed.

The import graph is read from the sources (every ``import`` statement at any depth, except under
``if TYPE_CHECKING:``); importing ``a.b.c`` depends on the packages ``a`` and ``a.b`` too, since
Python runs their ``__init__`` first, except where they are packages above the importing module
(those are already initialised, or initialising, when it runs).
"""

from __future__ import annotations

import ast
import multiprocessing as mp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "torch_mtlgrad"
PKG = "torch_mtlgrad"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports (with the packages above each)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import module` needs the module, else pkg's name
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    own = {".".join(name.split(".")[:k]) for k in range(1, len(name.split(".")))}
    deps: set[str] = set()
    for mod in found:
        if not mod.startswith(PKG):
            continue
        parts = mod.split(".")
        for k in range(1, len(parts) + 1):
            sub = ".".join(parts[:k])
            if sub in MODULES and sub != name and (sub not in own or sub == mod):
                deps.add(sub)
    return deps


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _reaches(src: str, prefix: str) -> list[str]:
    """Modules under ``prefix`` that ``src`` imports directly."""
    return sorted(d for d in GRAPH[src] if d == prefix or d.startswith(prefix + "."))


def test_the_graph_sees_the_package() -> None:
    assert "torch_mtlgrad.optimizer" in GRAPH and "torch_mtlgrad.capture.select" in GRAPH
    assert "torch_mtlgrad.combine" in GRAPH["torch_mtlgrad.optimizer"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # the detector works


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("layer", ["optimizer", "capture", "combine", "plugins", "conal", "mpps",
                                   "normal", "distributed", "weightings"])
def test_aggregators_are_math_only(layer: str) -> None:
    for name in GRAPH:
        if name.startswith(f"{PKG}.aggregators"):
            assert _reaches(name, f"{PKG}.{layer}") == [], name


@pytest.mark.parametrize("a,b", [("conal", "mpps"), ("conal", "normal"), ("mpps", "conal"),
                                 ("mpps", "normal"), ("normal", "conal"), ("normal", "mpps")])
def test_model_side_methods_do_not_import_each_other(a: str, b: str) -> None:
    for name in GRAPH:
        if name.startswith(f"{PKG}.{a}"):
            assert _reaches(name, f"{PKG}.{b}") == [], name


def test_the_step_imports_no_model_side_method_but_the_conflict_plugin() -> None:
    # conflict_noticing= builds CoNAL's ConflictNoticing plugin: that module, nothing else.
    for stage in ("optimizer", "combine", "_checks", "_checkpoint", "plugins"):
        name = f"{PKG}.{stage}"
        assert _reaches(name, f"{PKG}.mpps") == [] and _reaches(name, f"{PKG}.normal") == []
        assert set(_reaches(name, f"{PKG}.conal")) <= {f"{PKG}.conal", f"{PKG}.conal.conflict"}
    for name in GRAPH:
        if name.startswith(f"{PKG}.capture"):
            for other in ("optimizer", "combine", "conal", "mpps", "normal", "distributed"):
                assert _reaches(name, f"{PKG}.{other}") == [], name


def _import_alone(name: str, queue) -> None:  # runs in a forked child
    import importlib
    import sys

    assert not any(m.startswith(PKG) for m in sys.modules)
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - reported to the parent
        queue.put((name, f"{type(err).__name__}: {err}"))
    else:
        queue.put((name, None))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    import sys

    if any(m.startswith(PKG) for m in sys.modules):
        # Fork from a clean child so that no package module is loaded before the one under test.
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_fork_all, args=(q,))
        p.start()
        failures = q.get(timeout=300)
        p.join(60)
    else:
        failures = _fork_all_local()
    assert failures == []


def _fork_all_local() -> list[tuple[str, str]]:
    import torch  # noqa: F401 - loaded once, before the forks

    ctx = mp.get_context("fork")
    failures = []
    names = sorted(n for n in MODULES if "_triton" not in n)
    for i in range(0, len(names), 8):
        q = ctx.Queue()
        procs = [ctx.Process(target=_import_alone, args=(n, q)) for n in names[i : i + 8]]
        for p in procs:
            p.start()
        for _ in procs:
            name, err = q.get(timeout=120)
            if err is not None:
                failures.append((name, err))
        for p in procs:
            p.join(60)
    return failures


def _fork_all(queue) -> None:
    queue.put(_fork_all_local())
