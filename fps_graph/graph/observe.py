"""Augmenting an ONNX graph so that the inputs of the scored layers are observed.

Each observed activation gets small reducer nodes placed right after the node that produces it, so the full tensor
can be freed at once and only per-feature sums leave the runtime per batch:

* features observer (MatMul, Gemm): x -> Cast(float32) -> Reshape[-1, F] -> Abs / x*x -> ReduceSum over rows,
  plus Size(x) for the count;
* map observer (Conv): x -> Cast(float32) -> Abs / x*x -> ReduceSum over the batch axis, plus Shape(x); the
  exact im2col window sums are then taken on the host (see stats.conv_window_sums).

ONNX Runtime must run the reducers as soon as their input exists (runtime._options sets the priority-based
execution order); otherwise every observed activation lives until the end of the pass.

The model's own outputs are dropped, and every node that no observer needs is pruned. In ``host`` mode the raw
activations become outputs instead (the oracle and the fallback).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper
import numpy as np

from fps_graph.graph.layers import Layer

PREFIX = "fpsg"


@dataclass(frozen=True)
class Observer:
    """A reduction of one activation tensor that one or more layers share (e.g. Q, K and V projections)."""

    tensor: str
    kind: str        # "features" or "map"
    axis: int        # features: -1 (last) or 0 (Gemm with transA); map: batch axis 0
    features: int    # F for features observers (0 for maps)
    index: int       # position in the plan, used to name outputs

    def output(self, what: str) -> str:
        """Name of one of this observer's graph outputs ('abs', 'sq', 'size', 'shape', 'raw')."""
        return f"{PREFIX}_{self.index}_{what}"


def observer_key(layer: Layer) -> tuple[str, str, int, int]:
    """Layers with equal keys can share one observer."""
    if layer.op == "Conv":
        return (layer.activation, "map", 0, 0)
    axis = -1 if layer.feature_axis in (-1, 1) else 0
    return (layer.activation, "features", axis, layer.feature_shape[0])


def plan_observers(layers: list[Layer]) -> tuple[list[Observer], dict[str, Observer]]:
    """One observer per distinct (activation, reduction); and the observer of each layer (by node name)."""
    by_key: dict[tuple, Observer] = {}
    of_layer: dict[str, Observer] = {}
    for layer in layers:
        key = observer_key(layer)
        if key not in by_key:
            by_key[key] = Observer(tensor=key[0], kind=key[1], axis=key[2], features=key[3], index=len(by_key))
        of_layer[layer.node] = by_key[key]
    return list(by_key.values()), of_layer


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a (sub)graph's nodes read, including names used by nested subgraphs."""
    refs: set[str] = set()
    for node in graph.node:
        refs |= _node_inputs(node)
    return refs


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node reads: its inputs and whatever its subgraphs (If/Loop bodies) read from outside."""
    refs = {i for i in node.input if i}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            refs |= _outer_refs(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                refs |= _outer_refs(g)
    return refs


def needed_nodes(graph: onnx.GraphProto, targets: set[str]) -> list[int]:
    """Indices (in graph order) of the nodes needed to compute the target tensors."""
    needed = set(targets)
    keep: list[int] = []
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if any(o in needed for o in node.output):
            keep.append(i)
            needed |= _node_inputs(node)
    return sorted(keep)


def _axes_node(name: str, axes: list[int], opset: int, op: str, inp: str, out: str,
               inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    """A reduce node with its axes as attribute or input, whichever the opset wants."""
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        axes_name = f"{name}_axes"
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        return helper.make_node(op, [inp, axes_name], [out], name=name, keepdims=0)
    return helper.make_node(op, [inp], [out], name=name, axes=axes, keepdims=0)


def reducer_nodes(obs: Observer, stats: tuple[str, ...], opset: int
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto]]:
    """Nodes, constants and outputs that reduce one observed tensor in the graph."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outs: list[onnx.ValueInfoProto] = []
    base = f"{PREFIX}_{obs.index}"
    f32 = f"{base}_f32"
    nodes.append(helper.make_node("Cast", [obs.tensor], [f32], name=f"{base}_cast", to=onnx.TensorProto.FLOAT))
    if obs.kind == "features" and obs.axis == -1:
        shape_name = f"{base}_rows_shape"
        inits.append(numpy_helper.from_array(np.array([-1, obs.features], dtype=np.int64), shape_name))
        src = f"{base}_rows"
        nodes.append(helper.make_node("Reshape", [f32, shape_name], [src], name=f"{base}_reshape"))
        axes = [0]
    elif obs.kind == "features":
        src, axes = f32, [1]
    else:
        src, axes = f32, [0]
    # Abs / Mul then ReduceSum rather than ReduceL1 / ReduceSumSquare: ONNX Runtime's CPU ReduceSum has a fast
    # path for reducing the leading axis; ReduceL1 over [6304, 3072] took 49 ms against 10 ms (bench/README.md).
    for what in stats:
        out = obs.output(what)
        mapped = f"{base}_{what}_map"
        if what == "abs":
            nodes.append(helper.make_node("Abs", [src], [mapped], name=f"{base}_{what}_abs"))
        else:
            nodes.append(helper.make_node("Mul", [src, src], [mapped], name=f"{base}_{what}_mul"))
        nodes.append(_axes_node(f"{base}_{what}", axes, opset, "ReduceSum", mapped, out, inits))
        outs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    if obs.kind == "features":
        nodes.append(helper.make_node("Size", [f32], [obs.output("size")], name=f"{base}_size"))
        outs.append(helper.make_tensor_value_info(obs.output("size"), onnx.TensorProto.INT64, None))
    else:
        nodes.append(helper.make_node("Shape", [f32], [obs.output("shape")], name=f"{base}_shape"))
        outs.append(helper.make_tensor_value_info(obs.output("shape"), onnx.TensorProto.INT64, None))
    return nodes, inits, outs


def augment(model: onnx.ModelProto, observers: list[Observer], mode: str = "graph",
            stats: tuple[str, ...] = ("abs",)) -> onnx.ModelProto:
    """A new model whose only outputs are the observers' reductions (graph) or raw activations (host)."""
    graph = model.graph
    targets = {o.tensor for o in observers}
    keep = needed_nodes(graph, targets)
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)

    by_tensor: dict[str, list[Observer]] = {}
    for obs in observers:
        by_tensor.setdefault(obs.tensor, []).append(obs)

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    outputs: list[onnx.ValueInfoProto] = []

    def observe(tensor: str) -> None:
        for obs in by_tensor.pop(tensor, []):
            if mode == "host":
                raw = obs.output("raw")
                new_nodes.append(helper.make_node("Identity", [tensor], [raw], name=f"{PREFIX}_{obs.index}_raw"))
                outputs.append(onnx.ValueInfoProto(name=raw))
            else:
                nodes, inits, outs = reducer_nodes(obs, stats, opset)
                new_nodes.extend(nodes)
                new_inits.extend(inits)
                outputs.extend(outs)

    for name in [i.name for i in graph.input] + [t.name for t in graph.initializer]:
        observe(name)
    for i in keep:
        node = graph.node[i]
        new_nodes.append(node)
        for out in node.output:
            observe(out)
    for name in list(by_tensor):   # produced by nothing we kept (should not happen); observe at the end
        observe(name)

    used = set()
    for node in new_nodes:
        used |= _node_inputs(node)
    new = onnx.ModelProto()
    new.ir_version = model.ir_version
    new.opset_import.extend(model.opset_import)
    new.functions.extend(model.functions)
    new.producer_name = "fps-graph"
    g = new.graph   # filled in place: the weights are copied once, not twice (make_graph, then CopyFrom)
    g.name = f"{graph.name or 'model'}_fps_observed"
    g.node.extend(new_nodes)
    g.input.extend(i for i in graph.input if i.name in used)
    g.output.extend(outputs)
    g.initializer.extend(t for t in graph.initializer if t.name in used)
    g.initializer.extend(new_inits)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in used)
    return new
