"""Augmenting an ONNX graph so that the inputs of the scored layers are observed.

Each observed activation gets small reducer nodes placed right after the node that produces it, so the full tensor
can be freed at once and only per-feature sums leave the runtime per batch:

* features observer (MatMul, Gemm): x -> Cast(float32) -> Reshape[-1, F] -> Abs / x*x -> ReduceSum over rows,
  plus Size(x) for the count;
* cols observer (Conv): x -> Cast(float32) -> Abs / x*x, reduced over the batch and along the last spatial axis to
  what the kernel taps can tell apart there: one sum per stride residue class of the columns, plus the few border
  columns that some tap's windows leave out, individually ([1, C, *spatial[:-1], stride + left + right]), plus
  Shape(x); the exact window sums are then finished on the host (runtime/windows.py: conv_col_window_sums);
* map observer (ConvTranspose; Conv with ``--reduce host`` or an opset below 10): x -> Cast(float32) -> Abs / x*x ->
  ReduceSum over the batch axis, plus Shape(x); the exact im2col window sums are then taken on the host (see
  runtime/windows.py: conv_window_sums, conv_transpose_window_sums).

ONNX Runtime must run the reducers as soon as their input exists (runtime._options sets the priority-based
execution order); otherwise every observed activation lives until the end of the pass.

The model's own outputs are dropped, and every node that no observer needs is pruned. In ``host`` mode the raw
activations become outputs instead (the oracle and the fallback).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper, numpy_helper
import numpy as np

from fps_graph.errors import ModelError, OptionError
from fps_graph.graph.layers import Layer
from fps_graph.graph.walk import LOOP_OPS, all_value_names, graph_scopes, node_reads, subgraphs

PREFIX = "fpsg"


@dataclass(frozen=True)
class Observer:
    """A reduction of one activation tensor that one or more layers share (e.g. Q, K and V projections)."""

    tensor: str
    kind: str        # "features", "cols" (Conv input reduced along its last axis in the graph) or "map"
    axis: int        # features: -1 (last) or 0 (Gemm with transA); map, cols: batch axis 0
    features: int    # F for features observers (0 for maps)
    index: int       # position in the plan, used to name outputs
    graph: str = ""  # path of the (sub)graph holding the tensor ("" = main graph; see graph.walk)
    lead: int = 0    # Loop/Scan bodies around it: its outputs carry one iteration axis per body, summed on the host
    channels: int = 0   # map/cols observers: input channels (to shape the zeros an untaken If branch yields)
    rank: int = 0       # map/cols observers: rank of the observed activation
    cols: tuple[int, int, int] = ()   # cols observers: (stride, left, right) along the last axis (col_borders)
    state: tuple = ()   # recurrent h_(t-1) observers (graph/recurrent.py): (initial_h, dirs, layout, reverse, direction)

    def output(self, what: str) -> str:
        """Name of one of this observer's graph outputs ('abs', 'sq', 'size', 'shape', 'raw')."""
        return f"{PREFIX}_{self.index}_{what}"


def observer_key(layer: Layer, cols: bool = True) -> tuple:
    """Layers with equal keys can share one observer (tensor names are only unique within one graph).

    cols=False keeps every Conv input as a whole map reduced over the batch only (``--reduce host``, the oracle)."""
    if hasattr(layer, "observer_key"):          # recurrent layers (graph/recurrent.py)
        return layer.observer_key()
    if layer.op == "Conv":
        if pointwise(layer.conv):   # every tap reads every position: per-channel sums, reduced in the graph
            return (layer.activation, "features", 1, layer.feature_shape[0], layer.graph)
        if cols:   # convs with the same stride along the last axis share one (borders: the widest of them)
            return (layer.activation, "cols", 0, int(layer.conv["strides"][-1]), layer.graph)
        return (layer.activation, "map", 0, 0, layer.graph)
    axis = -1 if layer.feature_axis in (-1, 1) else 0
    return (layer.activation, "features", axis, layer.feature_shape[0], layer.graph)


def col_borders(conv: dict) -> tuple[int, int]:
    """How many leading and trailing columns (last spatial axis) a Conv's taps may leave out, for any input width.

    Tap t reads columns t*d - pad_begin + stride*o for the output positions o: each tap's set is one stride residue
    class of the columns minus some at either end. Those ends lie within the first (k-1)*d - pad_begin and the last
    (k-1)*d + stride - 1 - pad_end columns (pads unknown before the width is, for auto_pad: taken as 0). The last
    width % stride columns are kept individually too (the graph's residue sums cover whole stride groups only)."""
    k, s, d = int(conv["kernel"][-1]), int(conv["strides"][-1]), int(conv["dilations"][-1])
    n = len(conv["kernel"])
    begin = end = 0
    if conv.get("auto_pad", "NOTSET") in ("NOTSET", ""):
        begin, end = int(conv["pads"][n - 1]), int(conv["pads"][2 * n - 1])
    return max(0, (k - 1) * d - begin), max(s - 1, (k - 1) * d + s - 1 - end)


def pointwise(conv: dict) -> bool:
    """A 1x1 conv with stride 1 and no padding: its single tap reads every input position once, so its input
    statistic is the per-channel sum over batch and positions, which the graph can reduce to [C] itself (no activation
    map leaves the runtime, no window sums on the host: conv nets at batch 1 spent most of their overhead there)."""
    n = len(conv["kernel"])
    no_pad = conv.get("auto_pad", "NOTSET") in ("VALID", "SAME_UPPER", "SAME_LOWER") or \
        not any(int(v) for v in conv.get("pads", [0] * 2 * n))
    return all(int(k) == 1 for k in conv["kernel"]) and all(int(v) == 1 for v in conv["strides"]) and no_pad


def plan_observers(layers: list[Layer], cols: bool = True) -> tuple[list[Observer], dict[str, Observer]]:
    """One observer per distinct (activation, reduction); and the observer of each layer (by node name).

    cols=False: Conv inputs as whole maps (``map``), as ``--reduce host`` and opsets below 10 need."""
    keys: dict[tuple, list[Layer]] = {}
    for layer in layers:
        keys.setdefault(observer_key(layer, cols), []).append(layer)
    observers: list[Observer] = []
    of_layer: dict[str, Observer] = {}
    for key, group in keys.items():
        layer = group[0]
        spatial = key[1] in ("map", "cols")
        borders = ()
        if key[1] == "cols":
            ends = [col_borders(g.conv) for g in group]
            borders = (key[3], max(e[0] for e in ends), max(e[1] for e in ends))
        obs = Observer(tensor=key[0], kind=key[1], axis=key[2], features=0 if spatial else key[3],
                       index=len(observers), graph=layer.graph, lead=layer.loops,
                       channels=layer.feature_shape[0] if spatial else 0,
                       rank=len(layer.op_shape) if spatial or key[1:3] == ("features", 1) else 0,
                       state=key[5] if len(key) > 5 else (), cols=borders)
        observers.append(obs)
        for g in group:
            of_layer[g.node] = obs
    return observers, of_layer


_node_inputs = node_reads     # names a node reads, its bodies' outer-scope reads included (graph.walk)


def needed_nodes(graph: onnx.GraphProto | list[onnx.NodeProto], targets: set[str]) -> list[int]:
    """Indices (in graph order) of the nodes needed to compute the target tensors."""
    nodes = graph.node if isinstance(graph, onnx.GraphProto) else graph
    needed = set(targets)
    keep: list[int] = []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if any(o in needed for o in node.output):
            keep.append(i)
            needed |= _node_inputs(node)
    return sorted(keep)


def _axes_node(name: str, axes: list[int], opset: int, op: str, inp: str, out: str,
               inits: list[onnx.TensorProto], keepdims: int = 0) -> onnx.NodeProto:
    """A reduce node with its axes as attribute or input, whichever the opset wants."""
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        axes_name = f"{name}_axes"
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        return helper.make_node(op, [inp, axes_name], [out], name=name, keepdims=keepdims)
    return helper.make_node(op, [inp], [out], name=name, axes=axes, keepdims=keepdims)


def _const(name: str, values: list[int], inits: list[onnx.TensorProto]) -> str:
    inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def _col_nodes(obs: Observer, what: str, mapped: str, out: str, opset: int,
               inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """A Conv input's |x| (or x*x) reduced over the batch and its last axis as ``col_window_sums`` needs it:
    [1, C, *spatial[:-1], stride + left + right] = the sums of each stride residue class of the columns (whole
    stride groups only), then the first ``left`` and the last ``right`` columns one by one (fewer when the input
    is narrower). ReduceSum over the last axis, not ReduceL1: a float32 sum off by 1e-7 instead of 1e-6."""
    stride, left, right = obs.cols
    last = obs.rank - 1
    base = f"{PREFIX}_{obs.index}_{what}"
    nodes: list[onnx.NodeProto] = []
    pieces = []
    if stride == 1:
        nodes.append(_axes_node(f"{base}_res", [0, last], opset, "ReduceSum", mapped, f"{base}_res", inits, 1))
    else:   # whole groups of `stride` columns as their own axis (a view), summed per residue
        width, cut = f"{base}_width", f"{base}_cut"
        nodes += [
            helper.make_node("Shape", [mapped], [f"{base}_dims"], name=f"{base}_dims"),
            helper.make_node("Slice", [f"{base}_dims", _const(f"{base}_m1", [-1], inits), _const(f"{base}_big", [2 ** 62], inits)],
                             [width], name=f"{base}_width"),
            helper.make_node("Mod", [width, _const(f"{base}_stride", [stride], inits)], [f"{base}_tail"],
                             name=f"{base}_tail"),
            helper.make_node("Sub", [width, f"{base}_tail"], [cut], name=f"{base}_cutw"),
            helper.make_node("Slice", [mapped, _const(f"{base}_zero", [0], inits), cut,
                                       _const(f"{base}_lastax", [last], inits)], [f"{base}_whole"], name=f"{base}_whole"),
            helper.make_node("Reshape", [f"{base}_whole", _const(f"{base}_groups", [0] * last + [-1, stride], inits)],
                             [f"{base}_grouped"], name=f"{base}_grouped"),
            _axes_node(f"{base}_ressum", [0, last], opset, "ReduceSum", f"{base}_grouped", f"{base}_ressum", inits, 1),
            helper.make_node("Reshape", [f"{base}_ressum", _const(f"{base}_resshape", [0] * last + [stride], inits)],
                             [f"{base}_res"], name=f"{base}_res"),
        ]
    pieces.append(f"{base}_res")
    for side, n in (("left", left), ("right", right)):
        if not n:
            continue
        lo, hi = ([0], [n]) if side == "left" else ([-n], [2 ** 62])
        nodes += [
            helper.make_node("Slice", [mapped, _const(f"{base}_{side}_lo", lo, inits),
                                       _const(f"{base}_{side}_hi", hi, inits),
                                       _const(f"{base}_{side}_ax", [last], inits)], [f"{base}_{side}_cols"],
                             name=f"{base}_{side}_cols"),
            _axes_node(f"{base}_{side}", [0], opset, "ReduceSum", f"{base}_{side}_cols", f"{base}_{side}", inits, 1),
        ]
        pieces.append(f"{base}_{side}")
    nodes.append(helper.make_node("Concat", pieces, [out], name=f"{base}_concat", axis=last))
    return nodes


def reducer_nodes(obs: Observer, stats: tuple[str, ...], opset: int, suffix: str = ""
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto]]:
    """Nodes, constants and outputs that reduce one observed tensor in the graph (outputs named + suffix)."""
    if obs.state:   # what a recurrent weight multiplies (graph/recurrent.py), reduced per step
        return state_reducer_nodes(obs, stats, opset, suffix)
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
    elif obs.kind == "features" and obs.axis == 1:   # a pointwise conv's input: all axes but the channels
        src, axes = f32, [0] + list(range(2, obs.rank))
    elif obs.kind == "features":
        src, axes = f32, [1]
    else:   # map (and cols, whose reductions _col_nodes makes)
        src, axes = f32, [0]
    # Abs / Mul then ReduceSum rather than ReduceL1 / ReduceSumSquare: ONNX Runtime's CPU ReduceSum has a fast
    # path for reducing the leading axis; ReduceL1 over [6304, 3072] took 49 ms against 10 ms (bench/README.md).
    for what in stats:
        out = obs.output(what) + suffix
        mapped = f"{base}_{what}_map"
        if what == "abs":
            nodes.append(helper.make_node("Abs", [src], [mapped], name=f"{base}_{what}_abs"))
        else:
            nodes.append(helper.make_node("Mul", [src, src], [mapped], name=f"{base}_{what}_mul"))
        if obs.kind == "cols":
            nodes += _col_nodes(obs, what, mapped, out, opset, inits)
        else:
            nodes.append(_axes_node(f"{base}_{what}", axes, opset, "ReduceSum", mapped, out, inits))
        outs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, _out_shape(obs, what) if suffix else None))
    what = "size" if obs.kind == "features" else "shape"
    out = obs.output(what) + suffix
    nodes.append(helper.make_node("Size" if what == "size" else "Shape", [f32], [out], name=f"{base}_{what}"))
    outs.append(helper.make_tensor_value_info(out, onnx.TensorProto.INT64, _out_shape(obs, what) if suffix else None))
    return nodes, inits, outs


def _out_shape(obs: Observer, what: str) -> list[int | None]:
    """Declared shape of one reducer output (outputs of bodies are typed; both If branches must agree)."""
    if what == "size":
        return []
    if what == "shape":
        return [obs.rank]
    if obs.kind == "features":
        return [obs.features]
    if obs.kind == "cols":
        return [1, obs.channels] + [None] * (obs.rank - 2)
    return [obs.channels] + [None] * (obs.rank - 2)


def _zero(obs: Observer, what: str) -> np.ndarray:
    """What the branch of an If that does not hold the observer yields instead: zero sums, zero counts."""
    if what == "size":
        return np.array(0, dtype=np.int64)
    if what == "shape":
        return np.zeros(obs.rank, dtype=np.int64)          # batch 0: no values
    if obs.kind == "features":
        return np.zeros(obs.features, dtype=np.float32)
    if obs.kind == "cols":
        return np.zeros((1, obs.channels) + (0,) * (obs.rank - 2), dtype=np.float32)
    return np.zeros((obs.channels,) + (0,) * (obs.rank - 2), dtype=np.float32)


@dataclass(frozen=True)
class _Exposed:
    """One observer output on its way out of nested bodies: its top-level name, type and 'no data' value."""

    base: str            # name in the main graph (fpsg_<i>_<what>)
    elem: int
    shape: tuple[int | None, ...]
    zero: np.ndarray

    def at(self, depth: int) -> str:
        """Its name at a nesting depth (names must not repeat an enclosing scope's, so each level has its own)."""
        return self.base if depth == 0 else f"{self.base}__{depth}"

    def value_info(self, depth: int) -> onnx.ValueInfoProto:
        """Typed graph output at a depth."""
        return helper.make_tensor_value_info(self.at(depth), self.elem, list(self.shape))

    def stacked(self) -> "_Exposed":
        """The same output after a Loop/Scan: one more leading (iteration) axis; zero iterations when absent."""
        return _Exposed(self.base, self.elem, (None, *self.shape), np.zeros((0, *self.zero.shape), self.zero.dtype))


class _Augmenter:
    """Places reducers in every (sub)graph that holds observed tensors and threads their sums out of bodies.

    If: the new outputs are added to both branches, in the same order and with the same types; the branch that
    does not hold an observer yields zero sums and zero counts. Loop/Scan: they become extra scan outputs (one row
    per iteration, summed on the host, see ``observer_parts``).
    """

    def __init__(self, observers: list[Observer], trail_of: dict[str, tuple], mode: str, stats: tuple[str, ...],
                 opset: int):
        self.mode, self.stats, self.opset = mode, stats, opset
        self.by_trail: dict[tuple, list[Observer]] = {}
        self.nested: set[tuple] = set()
        self.threaded: list[onnx.NodeProto] = []     # the control-flow node copies made
        for obs in observers:
            trail = trail_of[obs.graph]
            self.by_trail.setdefault(trail, []).append(obs)
            for i in range(1, len(trail) + 1):
                self.nested.add(trail[:i])

    def _reducers(self, obs: Observer, depth: int) -> tuple[list, list, list[_Exposed]]:
        suffix = f"__{depth}" if depth else ""
        if self.mode == "host" and not obs.state:     # h_(t-1) needs Y and initial_h: reduced in the graph
            raw = obs.output("raw")
            return ([helper.make_node("Identity", [obs.tensor], [raw], name=f"{PREFIX}_{obs.index}_raw")], [],
                    [_Exposed(raw, 0, (), np.zeros(0))])
        nodes, inits, outs = reducer_nodes(obs, self.stats, self.opset, suffix)
        whats = list(self.stats) + ["size" if obs.kind == "features" else "shape"]
        exposed = [_Exposed(obs.output(w), vi.type.tensor_type.elem_type, tuple(_out_shape(obs, w)), _zero(obs, w))
                   for w, vi in zip(whats, outs)]
        return nodes, inits, exposed

    def place(self, nodes: list[onnx.NodeProto], local: list[str], trail: tuple, depth: int
              ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[_Exposed]]:
        """One graph's nodes with reducers after each observed tensor's producer, and what leaves the graph."""
        by_tensor: dict[str, list[Observer]] = {}
        for obs in self.by_trail.get(trail, []):
            by_tensor.setdefault(obs.tensor, []).append(obs)
        produced = set(local) | {o for n in nodes for o in n.output}
        out_nodes: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []
        exposed: list[_Exposed] = []

        def observe(tensor: str) -> None:
            for obs in by_tensor.pop(tensor, []):
                n, i, e = self._reducers(obs, depth)
                out_nodes.extend(n)
                inits.extend(i)
                exposed.extend(e)

        for tensor in [t for t in by_tensor if t not in produced]:   # read from an enclosing scope
            observe(tensor)
        for tensor in local:
            observe(tensor)
        for i, node in enumerate(nodes):
            if any(trail + ((i, attr),) in self.nested for attr, _ in subgraphs(node)):
                node, out = self._thread(node, i, trail, depth)
                exposed.extend(out)
            out_nodes.append(node)
            for o in node.output:
                observe(o)
        return out_nodes, inits, exposed

    def _thread(self, node: onnx.NodeProto, index: int, trail: tuple, depth: int
                ) -> tuple[onnx.NodeProto, list[_Exposed]]:
        """A copy of a control-flow node whose bodies hold reducers, with their sums as new node outputs."""
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        self.threaded.append(copy)
        per_body: dict[str, list[_Exposed]] = {}
        bodies = dict(subgraphs(copy))
        for attr, body in bodies.items():
            sub = trail + ((index, attr),)
            if sub not in self.nested:
                per_body[attr] = []
                continue
            local = [i.name for i in body.input] + [t.name for t in body.initializer]
            nodes, inits, out = self.place(list(body.node), local, sub, depth + 1)
            del body.node[:]
            body.node.extend(nodes)
            body.initializer.extend(inits)
            per_body[attr] = out
        inner = depth + 1
        if copy.op_type == "If":
            every = [e for attr in ("then_branch", "else_branch") for e in per_body.get(attr, [])]
            for attr in ("then_branch", "else_branch"):
                body = bodies[attr]
                have = {e.base for e in per_body.get(attr, [])}
                for e in every:
                    if e.base not in have:
                        body.node.append(helper.make_node("Constant", [], [e.at(inner)], name=f"{e.at(inner)}_zero",
                                                          value=numpy_helper.from_array(e.zero)))
                body.output.extend(e.value_info(inner) for e in every)
            copy.output.extend(e.at(depth) for e in every)
            return copy, every
        if copy.op_type in LOOP_OPS:
            out = per_body.get("body", [])
            bodies["body"].output.extend(e.value_info(inner) for e in out)
            copy.output.extend(e.at(depth) for e in out)
            if copy.op_type == "Scan":
                for attr in copy.attribute:
                    if attr.name in ("scan_output_axes", "scan_output_directions"):
                        attr.ints.extend([0] * len(out))
            return copy, [e.stacked() for e in out]
        raise ModelError(f"cannot observe layers inside a {copy.op_type} body (only If, Loop and Scan)")


def _trim_if(node: onnx.NodeProto, needed: set[str]) -> None:
    """Drop the outputs of a (copied) If node that nothing reads, in both branches, and the nodes only they need
    (in a merged decoder the LM head sits inside the branches)."""
    keep = [i for i, o in enumerate(node.output) if o in needed]
    if len(keep) == len(node.output) or not keep:
        return
    outs = [node.output[i] for i in keep]
    del node.output[:]
    node.output.extend(outs)
    for _, body in subgraphs(node):
        kept_vi = [body.output[i] for i in keep]
        del body.output[:]
        body.output.extend(kept_vi)
        idx = needed_nodes(body, {vi.name for vi in kept_vi})
        nodes = [body.node[i] for i in idx]
        del body.node[:]
        body.node.extend(nodes)


def _check_names(model: onnx.ModelProto, observers: list[Observer]) -> None:
    """Refuse a model that already uses the observers' tensor names somewhere (in any scope)."""
    if not observers:
        return
    clash = sorted(n for n in all_value_names(model.graph) if n.startswith(f"{PREFIX}_"))
    if clash:
        raise ModelError(f"the model already has tensors named {PREFIX}_* ({clash[0]!r}), which this tool uses "
                            "for its observers; rename them")


def augment(model: onnx.ModelProto, observers: list[Observer], mode: str = "graph",
            stats: tuple[str, ...] = ("abs",)) -> onnx.ModelProto:
    """A new model whose only outputs are the observers' reductions (graph) or raw activations (host).

    The input model is not changed. Observers inside If/Loop/Scan bodies get their reducers inside the body (see
    ``_Augmenter``); ``observer_parts`` reads their outputs back.
    """
    graph = model.graph
    _check_names(model, observers)
    if mode == "host" and any(o.graph for o in observers):
        raise OptionError("reduce mode 'host' cannot observe layers inside If/Loop/Scan bodies; use 'graph'")
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
    trail_of = {s.path: s.trail for s in graph_scopes(graph)} if any(o.graph for o in observers) else {"": ()}
    aug = _Augmenter(observers, trail_of, mode, stats, opset)
    local = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    nodes, new_inits, exposed = aug.place(list(graph.node), local, (), 0)
    targets = {e.base for e in exposed}
    nodes = [nodes[i] for i in needed_nodes(nodes, targets)]
    reads: set[str] = set(targets)
    for node in nodes:
        reads |= _node_inputs(node)
    for node in aug.threaded[:]:
        if node.op_type == "If" and any(node is n for n in nodes):
            _trim_if(node, reads)
    if mode == "host":
        outputs = [onnx.ValueInfoProto(name=e.base) for e in exposed]
    else:
        outputs = [helper.make_tensor_value_info(e.base, e.elem, None) for e in exposed]

    used = set()
    for node in nodes:
        used |= _node_inputs(node)
    new = onnx.ModelProto()
    new.ir_version = model.ir_version
    new.opset_import.extend(model.opset_import)
    new.functions.extend(model.functions)
    new.producer_name = "fps-graph"
    g = new.graph   # filled in place: the weights are copied once, not twice (make_graph, then CopyFrom)
    g.name = f"{graph.name or 'model'}_fps_observed"
    g.node.extend(nodes)
    g.input.extend(i for i in graph.input if i.name in used)
    for vi in g.input:   # a dim declared -1 or 0 means "any" (PaddlePaddle); ONNX Runtime reads 0 as a fixed 0
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value <= 0:
                    d.ClearField("dim_value")
    g.output.extend(outputs)
    g.initializer.extend(t for t in graph.initializer if t.name in used)
    g.initializer.extend(new_inits)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in used)
    return new


def observer_parts(obs: Observer, results: dict[str, np.ndarray], kinds: tuple[str, ...]
                   ) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """One observer's (sums per kind, size or shape) from the observed graph's outputs, ready to accumulate.

    Outputs that left Loop/Scan bodies carry one leading axis per body (one row per iteration): feature sums are
    added up over them in float64; activation maps come back one part per iteration, since each needs its own
    window sums. A branch not taken or a loop with no iteration gives zero sums and a zero count.
    """
    info = np.asarray(results[obs.output("size" if obs.kind == "features" else "shape")])
    sums = {k: np.asarray(results[obs.output(k)]) for k in kinds}
    if obs.lead == 0:
        return [(sums, info)]
    if obs.kind == "features":
        total = {k: v.astype(np.float64).reshape(-1, obs.features).sum(axis=0) if v.size
                 else np.zeros(obs.features, np.float64) for k, v in sums.items()}
        return [(total, np.array(int(info.astype(np.int64).sum()), dtype=np.int64))]
    rows = info.reshape(-1, obs.rank) if info.size else np.zeros((0, obs.rank), np.int64)
    parts = []
    for j in range(rows.shape[0]):
        parts.append(({k: v.reshape(-1, *v.shape[obs.lead:])[j] for k, v in sums.items()}, rows[j]))
    if not parts:
        parts.append(({k: _zero(obs, k) for k in kinds}, _zero(obs, "shape")))
    return parts


# ----------------------------------------------------------------------------------------- state observers


def state_reducer_nodes(obs: Any, stats: tuple[str, ...], opset: int, suffix: str = ""
                        ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto]]:
    """Sums of |a| (and a^2) per feature of what a recurrent weight multiplies, and how many values went in.

    ``obs.state`` is tagged. ``("h", initial_h, D, layout, reverse, sequence_lens, direction)``: a = h_(t-1) of one
    direction; obs.tensor is Y ([T, D, B, H], or [B, T, D, H] with layout=1). ``("x", sequence_lens, layout)``:
    a = x_t of the steps each sequence runs (t < len_b); obs.tensor is X [T, B, in]. With sequence_lens the steps
    past a sequence's length are masked out (Where, so padding that holds NaN cannot leak), the forward direction's
    states being initial_h and Y[0..len_b-2], the reverse's Y[1..len_b-1] and initial_h. The outputs are those of a
    features observer (abs, sq: [F]; size: values counted * F), so counting, If branches and Loop bodies treat it
    as one.
    """
    base = f"{PREFIX}_{obs.index}"
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outs: list[onnx.ValueInfoProto] = []
    big = np.iinfo(np.int64).max

    def const(tag: str, value: Any, dtype: Any = np.int64) -> str:
        n = f"{base}_{tag}"
        inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), n))
        return n

    def node(op: str, inputs: list[str], tag: str, **attrs: Any) -> str:
        out = f"{base}_{tag}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def unsqueeze(src: str, axes: list[int], tag: str) -> str:
        if opset >= 13:
            return node("Unsqueeze", [src, const(f"{tag}_axes", axes)], tag)
        return node("Unsqueeze", [src], tag, axes=axes)

    def slice_node(tag: str, src: str, starts: list[int], ends: list[int], axes: list[int]) -> str:
        if opset < 10:
            return node("Slice", [src], tag, starts=starts, ends=ends, axes=axes)
        return node("Slice", [src, const(f"{tag}_starts", starts), const(f"{tag}_ends", ends),
                              const(f"{tag}_axes", axes)], tag)

    def step_masks(like: str, seq: str) -> tuple[str, str, str]:
        """(steps [T, 1], lengths [1, B], lengths [B]) as int64, T read from the time axis 0 of ``like``."""
        t = node("Gather", [node("Shape", [like], "shape"), const("t_axis", 0)], "t", axis=0)
        steps = unsqueeze(node("Range", [const("zero", 0), t, const("one", 1)], "steps"), [1], "steps_col")
        lens = node("Cast", [seq], "lens", to=onnx.TensorProto.INT64)
        return steps, unsqueeze(lens, [0], "lens_row"), lens

    srcs: list[tuple[str, str, list[int]]] = []     # (tensor, mask or "", axes summed)
    if obs.state[0] == "x":
        _, seq, _layout = obs.state
        steps, lens_row, lens = step_masks(obs.tensor, seq)
        srcs.append((obs.tensor, unsqueeze(node("Less", [steps, lens_row], "xvalid"), [2], "xmask"), [0, 1]))
        count = lens
    else:
        _, init_h, _dirs, layout, reverse, seq, d = obs.state
        t_axis, d_axis = (1, 2) if layout else (0, 1)
        yd = slice_node("ydir", obs.tensor, [d], [d + 1], [d_axis])
        h0 = slice_node("h0", init_h, [d], [d + 1], [1 if layout else 0]) if init_h else ""
        if seq:     # layout 0 (dispatch_recurrent refuses sequence_lens with layout=1)
            steps, lens_row, lens = step_masks(yd, seq)
            if reverse:     # states Y[1 .. len-1]
                valid = node("And", [node("Greater", [steps, const("zero_s", 0)], "after0"),
                                     node("Less", [steps, lens_row], "inlen")], "yvalid")
            else:           # states Y[0 .. len-2]
                valid = node("Less", [steps, node("Sub", [lens_row, const("one_s", 1)], "lenm1")], "yvalid")
            srcs.append((yd, unsqueeze(unsqueeze(valid, [1], "yvalid3"), [3], "ymask"), [0, 1, 2]))
            if h0:          # one initial state per sequence that runs at all
                started = node("Greater", [lens, const("zero_b", 0)], "started")
                srcs.append((h0, unsqueeze(unsqueeze(started, [0], "started2"), [2], "h0mask"), [0, 1]))
            count = lens
        else:
            srcs.append((slice_node("yprev", yd, [1] if reverse else [0], [big] if reverse else [-1], [t_axis]), "",
                         [0, 1, 2]))
            if h0:
                srcs.append((h0, "", [0, 1]))
            count = ""
    zero = const("fzero", 0.0, np.float32) if any(m for _, m, _ in srcs) else ""
    for what in stats:
        partial = []
        for j, (src, mask, axes) in enumerate(srcs):
            f32 = node("Cast", [src], f"{what}_{j}_f32", to=onnx.TensorProto.FLOAT)
            mapped = node("Abs", [f32], f"{what}_{j}_map") if what == "abs" else \
                node("Mul", [f32, f32], f"{what}_{j}_map")
            if mask:
                mapped = node("Where", [mask, mapped, zero], f"{what}_{j}_kept")
            red = f"{base}_{what}_{j}_sum"
            nodes.append(_axes_node(red, axes, opset, "ReduceSum", mapped, red, inits))
            partial.append(red)
        out = obs.output(what) + suffix
        if len(partial) == 1:
            nodes.append(helper.make_node("Identity", partial, [out], name=f"{base}_{what}_total"))
        else:
            nodes.append(helper.make_node("Add", partial, [out], name=f"{base}_{what}_total"))
        outs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [obs.features] if suffix else None))
    size = obs.output("size") + suffix
    if count:       # steps run, summed over the batch, times the features
        total = node("ReduceSum", [count], "steps_run", keepdims=0)
        nodes.append(helper.make_node("Mul", [total, const("features", obs.features)], [size], name=f"{base}_size"))
    else:
        nodes.append(helper.make_node("Size", [yd], [size], name=f"{base}_size"))
    outs.append(helper.make_tensor_value_info(size, onnx.TensorProto.INT64, [] if suffix else None))
    return nodes, inits, outs


def reducers_first(graph: onnx.GraphProto) -> None:
    """Reorder a graph's nodes (in place) so that each observer's reducers run right after their input exists.

    Meant for ONNX Runtime's own optimized copy of an observed graph (runtime.session, ``regroup``): its NCHWc
    layout transformer appends the ReorderOutput nodes that bring an observed activation back to NCHW for the
    reducers after every other node, and ONNX Runtime's priority-based order runs the lowest index first, so those
    conversions, and the blocked activations they read, would wait until the end of the pass (ResNet-like nets:
    every observed activation alive at once). Here a reducer (a node with an ``fpsg_`` output) and a ReorderOutput
    or Cast read only by reducers are placed right after the last node they depend on; every other node keeps its
    relative order (a topological sort by position, Kahn's algorithm)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    inputs = [sorted({producer[name] for name in node_reads(node) if name in producer}) for node in nodes]
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, deps in enumerate(inputs):
        for j in deps:
            consumers[j].append(i)
    branch = [any(o.startswith(f"{PREFIX}_") for o in node.output) for node in nodes]
    for i in range(len(nodes) - 1, -1, -1):   # conversions feeding reducers only (a producer's index is lower)
        if nodes[i].op_type in ("ReorderOutput", "Cast") and consumers[i] and all(branch[c] for c in consumers[i]):
            branch[i] = True
    waiting = [len(deps) for deps in inputs]
    key = [(-1, 0) if branch[i] and not waiting[i] else (i, 0) for i in range(len(nodes))]
    ready = [(key[i], i) for i in range(len(nodes)) if not waiting[i]]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            waiting[c] -= 1
            if waiting[c] == 0:
                if branch[c]:   # right after the last of its inputs
                    last = max(key[j] for j in inputs[c])
                    key[c] = (last[0], last[1] + 1)
                heapq.heappush(ready, (key[c], c))
    if len(order) != len(nodes):
        raise ModelError("internal: the optimized observed graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
