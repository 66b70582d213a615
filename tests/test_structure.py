"""The package's shape, read from its source (ast): imports point down the stages only, never in a circle, and are
never hidden inside a function (that every package folder ships: tests/test_packaging.py). docs/architecture.md shows
the same order."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The stages, lowest first. A module may import modules of its own stage or of a lower one, never of a higher one.
# (The same table is drawn in docs/architecture.md; test_architecture_doc_names_the_order keeps them equal.)
STAGES = (
    ("base", ("fps_graph.errors", "fps_graph._version", "fps_graph._moved")),
    ("formats", ("fps_graph.formats",)),        # artifacts: atomic files, masks, delta, statistics
    ("data", ("fps_graph.data",)),              # calibration and training data -> batches
    ("graph", ("fps_graph.graph",)),            # ONNX: layers, names, observers, plans, apply
    ("runtime", ("fps_graph.runtime",)),        # ONNX Runtime sessions, calibration loops, Ray
    ("selection", ("fps_graph.selection",)),    # scores, ranking, the select job
    ("training", ("fps_graph.training",)),      # PyTorch: sparse deltas, the training loop
    ("integrations", ("fps_graph.integrations",)),   # PyTorch export, PEFT
    ("api", ("fps_graph",)),                    # the package face: fps_graph/__init__.py, fps_graph/api.py
    ("cli", ("fps_graph_cli",)),                # the click app
)

# Third-party modules that may be imported inside a function, and why. Everything else is imported at the top.
DEFERRED = {
    "torch": "optional extra (train, export, attach)", "safetensors.torch": "imports torch",
    "transformers": "optional (train hf:DIR)", "peft": "optional (--peft)", "accelerate": "optional",
    "onnxscript": "optional (the dynamo exporter)", "ray": "optional extra (select --ray); a second to import",
    "tokenizers": "optional extra (text data)", "matplotlib": "optional (plots)",
    "onnxruntime": "60 ms at start-up; inspect/apply never run a session",
    "onnx.reference": "60 ms; only constant folding of recurrent layers needs it",
    "PIL": "70 ms; only image data needs it", "tqdm": "only progress bars need it",
    "fcntl": "POSIX only", "resource": "POSIX only",
}

# Known violations being removed by their owners (issue 17). The test fails when one is gone (delete its line then),
# and on any violation not listed here.
PENDING = {
    # graph/: layers <-> recurrent <-> observe, recurrent -> names (owner: edge, graph/)
    "fn-import fps_graph.graph.layers -> fps_graph.graph.recurrent": "edge",
    "fn-import fps_graph.graph.observe -> fps_graph.graph.recurrent": "edge",
    "fn-import fps_graph.graph.recurrent -> fps_graph.graph.names": "edge",
    "fn-import fps_graph.graph.recurrent -> fps_graph.graph.observe": "edge",
    "fn-import fps_graph.graph.layers -> fps_graph.graph.quantized": "edge",
    "fn-import fps_graph.graph.quantized -> fps_graph.graph.recurrent": "edge",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "cli":
        parts[0] = "fps_graph_cli"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, module
    return rank


class Module:
    def __init__(self, path: Path):
        self.path, self.name = path, module_name(path)
        self.is_package = path.name == "__init__.py"
        self.tree = ast.parse(path.read_text(), str(path))


def load() -> dict[str, Module]:
    mods = {}
    for base in ("fps_graph", "cli"):
        for p in sorted((ROOT / base).rglob("*.py")):
            m = Module(p)
            mods[m.name] = m
    return mods


def _targets(node: ast.AST, mod: Module, known: set[str]) -> list[str]:
    """The modules an import statement loads (a name imported from a package is its submodule when one exists)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        pkg = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in known else base)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(mod: Module, known: set[str]) -> tuple[list[tuple[str, int]], list[tuple[str, int, str]]]:
    """(module-level imports, imports inside functions as (target, line, function)); TYPE_CHECKING blocks skipped."""
    top: list[tuple[str, int]] = []
    inner: list[tuple[str, int, str]] = []

    def visit(stmts, fn: str | None):
        for node in stmts:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(node, mod, known):
                    (top.append((t, node.lineno)) if fn is None else inner.append((t, node.lineno, fn)))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, node.name if fn is None else fn)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse, fn)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    child = getattr(node, field, None)
                    if isinstance(child, list):
                        visit(child, fn)

    visit(mod.tree.body, None)
    return top, inner


def violations() -> list[str]:
    mods = load()
    known = set(mods)
    found: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for mod in mods.values():
        top, inner = imports(mod, known)
        for target, _line in top:
            if target.split(".")[0] not in ("fps_graph", "fps_graph_cli"):
                continue
            graph[mod.name].add(target)
            if stage_of(target) > stage_of(mod.name):
                found.append(f"upward {mod.name} -> {target}")
        for target, _line, fn in inner:
            ours = target.split(".")[0] in ("fps_graph", "fps_graph_cli")
            if ours and (fn == "__getattr__" or mod.name.startswith("fps_graph_cli")):
                continue      # PEP 562 lazy names of a face; the CLI defers subcommands for start-up time
            if not ours and any(target == d or target.startswith(d + ".") for d in DEFERRED):
                continue
            found.append(f"fn-import {mod.name} -> {target}")
    found.extend(f"cycle {' -> '.join(c)}" for c in _cycles(graph))
    return sorted(set(found))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def test_imports_point_down_never_in_a_circle_never_hidden():
    found = violations()
    unexpected = [v for v in found if v not in PENDING]
    fixed = [v for v in PENDING if v not in found]
    assert not unexpected, "import rules broken (see STAGES/DEFERRED in this file):\n" + "\n".join(unexpected)
    assert not fixed, "fixed, so remove from PENDING:\n" + "\n".join(fixed)


def test_the_checker_sees_what_it_must(tmp_path, monkeypatch):
    """An upward import, an import inside a function and a cycle in a throwaway package are all reported."""
    pkg = tmp_path / "fps_graph"
    for sub in ("formats", "graph"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "formats" / "a.py").write_text("from fps_graph.graph import b\n")                  # upward
    (pkg / "graph" / "b.py").write_text("import fps_graph.graph.c\n")
    (pkg / "graph" / "c.py").write_text("from fps_graph.graph import b\n"                      # cycle b <-> c
                                        "def f():\n    from fps_graph.formats import a\n    import json\n")
    (pkg / "graph" / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from fps_graph.runtime import x\n"
                                        "def __getattr__(name):\n    from fps_graph.graph import b\n")
    (tmp_path / "cli").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations() == sorted([
        "upward fps_graph.formats.a -> fps_graph.graph.b",
        "fn-import fps_graph.graph.c -> fps_graph.formats.a",
        "fn-import fps_graph.graph.c -> json",
        "cycle fps_graph.graph.b -> fps_graph.graph.c",
    ])


def test_architecture_doc_names_the_order():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    order = " < ".join(name for name, _ in STAGES)
    assert order in doc, f"docs/architecture.md should state the stage order: {order}"
