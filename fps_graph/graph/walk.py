"""One recursive walk over an ONNX graph and the bodies of its If, Loop and Scan nodes.

Layer discovery (``layers``), naming (``names``), observer placement (``observe``) and ``apply`` all see a model
through the same list of :class:`Scope` objects, so that a weight inside a body is found, observed and patched the
same way as one in the main graph:

* every graph gets a path: ``""`` for the main graph, ``"<node>/<attribute>"`` for a body (nested bodies append to
  their parent's path), built from the node names ``node_names`` gives (unique within one graph);
* a body may read any tensor of an enclosing scope by name; ``Scope.const_key`` and ``Scope.producer`` look a name
  up the way ONNX scoping does (own constants and values first, then the enclosing scopes);
* constants stored inside a body (initializers, Constant nodes) get a model-wide key ``"<path>::<name>"`` and are
  registered in the ``OnnxModel`` under it, so ``model.tensor(key)`` reads them and ``apply`` can rewrite them in
  place. Sibling branches of an If may reuse the same local names; the keys stay distinct.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import onnx

from fps_graph.errors import ModelError

BODY_OPS = ("If", "Loop", "Scan")       # control flow whose bodies are observed
LOOP_OPS = ("Loop", "Scan")             # bodies run once per iteration; their observer outputs gain an axis
SEP = "::"                              # between a body's path and a local constant name in a model-wide key


def node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique name for every node: its own name, or '<op>_<index>' when it has none (or a duplicate)."""
    seen: set[str] = set()
    names = []
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        names.append(name)
    return names


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The (attribute name, body) pairs of a node, in attribute order."""
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend((f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs))
    return out


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads: its inputs and whatever its bodies read from enclosing scopes."""
    refs = {i for i in node.input if i}
    for _, body in subgraphs(node):
        refs |= outer_reads(body)
    return refs


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a body reads that it does not define itself (its inputs, initializers and node outputs)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    refs: set[str] = set()
    for node in graph.node:
        refs |= node_reads(node)
        defined.update(o for o in node.output if o)
    return refs - defined


@dataclass(eq=False)
class Scope:
    """One graph of the model (the main graph or a body) and how its names resolve."""

    graph: onnx.GraphProto
    path: str                                    # "" for the main graph
    parent: "Scope | None" = None
    owner: onnx.NodeProto | None = None          # the node whose attribute holds this body
    owner_name: str = ""                         # that node's qualified name
    attr: str = ""                               # that attribute ("then_branch", "else_branch", "body")
    trail: tuple[tuple[int, str], ...] = ()      # (node index, attribute) from the main graph down
    names: list[str] = field(default_factory=list)           # unique node names in this graph
    consts: dict[str, str] = field(default_factory=dict)     # local constant name -> model-wide key
    values: set[str] = field(default_factory=set)            # run-time values defined here (inputs, outputs)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)

    @property
    def ops(self) -> tuple[str, ...]:
        """Op types of the nodes holding this body, outermost first."""
        out: list[str] = []
        s: Scope | None = self
        while s is not None and s.owner is not None:
            out.append(s.owner.op_type)
            s = s.parent
        return tuple(reversed(out))

    @property
    def loops(self) -> int:
        """How many enclosing Loop/Scan bodies: the iteration axes an output of this scope gains on its way out."""
        return sum(1 for op in self.ops if op in LOOP_OPS)

    def qualify(self, node_name: str) -> str:
        """Model-wide name of a node of this graph."""
        return f"{self.path}/{node_name}" if self.path else node_name

    def const_key(self, name: str) -> str | None:
        """Model-wide key of the constant this name refers to here, or None for a run-time value."""
        s: Scope | None = self
        while s is not None:
            if name in s.consts:
                return s.consts[name]
            if name in s.values:
                return None
            s = s.parent
        return None

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node (of this or an enclosing graph) that computes a name, if any."""
        s: Scope | None = self
        while s is not None:
            if name in s.producers:
                return s.producers[name]
            if name in s.values or name in s.consts:
                return None
            s = s.parent
        return None


def _make_scope(graph: onnx.GraphProto, parent: Scope | None, owner: onnx.NodeProto | None, owner_name: str,
                attr: str, trail: tuple[tuple[int, str], ...]) -> Scope:
    path = f"{owner_name}/{attr}" if owner is not None else ""
    scope = Scope(graph, path, parent, owner, owner_name, attr, trail, node_names(graph))
    for t in graph.initializer:
        scope.consts[t.name] = t.name if not path else f"{path}{SEP}{t.name}"
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            out = node.output[0]
            scope.consts[out] = out if not path else f"{path}{SEP}{out}"
            continue
        for o in node.output:
            if o:
                scope.producers[o] = node
                scope.values.add(o)
    for i in graph.input:
        if i.name not in scope.consts:           # an initializer that is also an input stays a constant (IR < 4)
            scope.values.add(i.name)
    return scope


def graph_scopes(graph: onnx.GraphProto) -> list[Scope]:
    """The main graph and every body below it, depth first in node order (a body right after its parent)."""
    out: list[Scope] = []

    def visit(scope: Scope) -> None:
        out.append(scope)
        for i, (node, name) in enumerate(zip(scope.graph.node, scope.names)):
            for attr, body in subgraphs(node):
                visit(_make_scope(body, scope, node, scope.qualify(name), attr, scope.trail + ((i, attr),)))

    visit(_make_scope(graph, None, None, "", "", ()))
    paths = [s.path for s in out]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ModelError(f"two subgraphs get the same path {dup!r} (node names with '/'); rename the nodes")
    return out


def model_scopes(model) -> list[Scope]:
    """The scopes of an OnnxModel; constants stored in bodies are registered in it under their model-wide keys.

    Idempotent: the scopes are computed once per model object.
    """
    cached = model.__dict__.get("_fpsg_scopes")
    if cached is not None:
        return cached
    scopes = graph_scopes(model.graph)
    local: dict[str, tuple[str, str]] = {}
    for scope in scopes[1:]:
        for t in scope.graph.initializer:
            key = scope.consts[t.name]
            _check_location(model, t, scope.path)
            _register(model, key, t.name, scope.path, local)
            model.initializers[key] = t
        for node in scope.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                key = scope.consts[node.output[0]]
                _register(model, key, node.output[0], scope.path, local)
                model.constant_nodes[key] = node
    model.__dict__["_fpsg_scopes"] = scopes
    model.__dict__["_fpsg_local"] = local
    return scopes


def _register(model, key: str, name: str, path: str, local: dict[str, tuple[str, str]]) -> None:
    if key in model.initializers or key in model.constant_nodes:
        raise ModelError(f"{model.path}: constant {name!r} of subgraph {path!r} gets the key {key!r}, which the "
                            "main graph already uses; rename one of them")
    local[key] = (path, name)


def _check_location(model, t: onnx.TensorProto, path: str) -> None:
    """Refuse a body's external data that points outside the model's folder or is missing (as for the main graph)."""
    if not (t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL):
        return
    loc = next((e.value for e in t.external_data if e.key == "location"), "")
    base = model.base_dir.resolve()
    target = (base / loc).resolve()
    if os.path.isabs(loc) or (target != base and base not in target.parents):
        raise ModelError(f"{model.path}: external data of initializer {t.name!r} in subgraph {path!r} points "
                            f"outside the model's folder: {loc!r}")
    if not target.is_file():
        raise ModelError(f"{model.path}: external data file of initializer {t.name!r} in subgraph {path!r} is "
                            f"missing: {loc}")


def local_name(model, key: str) -> str:
    """The name a constant has inside its own graph (the key itself for main-graph constants)."""
    model_scopes(model)
    return model.__dict__["_fpsg_local"].get(key, (None, key))[1]


def scope_of_key(model, key: str) -> str:
    """Path of the graph that stores a constant ("" for the main graph)."""
    model_scopes(model)
    return model.__dict__["_fpsg_local"].get(key, ("", key))[0]


def branch_conditions(model, path: str) -> list[str]:
    """The If branches a graph sits in, outermost first, as ``"<If node>: <then_branch|else_branch>"``: its nodes
    run only when every one of them is taken (empty for the main graph and bodies that always run)."""
    scope = next((s for s in model_scopes(model) if s.path == path), None)
    out: list[str] = []
    while scope is not None and scope.owner is not None:
        if scope.owner.op_type == "If":
            out.append(f"{scope.owner_name}: {scope.attr}")
        scope = scope.parent
    return out[::-1]


def iter_nodes(scopes: list[Scope]) -> Iterator[tuple[Scope, onnx.NodeProto, str]]:
    """(scope, node, unique node name within the scope) for every node of every graph, depth first."""
    for scope in scopes:
        for node, name in zip(scope.graph.node, scope.names):
            yield scope, node, name


def all_value_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name defined or read in a graph and its bodies (to check for name clashes)."""
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    names |= {v.name for v in graph.value_info}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for _, body in subgraphs(node):
            names |= all_value_names(body)
    names.discard("")
    return names


__all__ = ["BODY_OPS", "LOOP_OPS", "Scope", "branch_conditions", "graph_scopes", "model_scopes", "node_names", "node_reads",
           "outer_reads", "subgraphs", "iter_nodes", "local_name", "scope_of_key", "all_value_names"]
