"""Recurrent layers (ONNX LSTM, GRU, RNN) as scored layers, in the layout the PyTorch module uses.

An ONNX recurrent node stores ``W [dirs, gates*H, in]``, ``R [dirs, gates*H, H]`` and ``B [dirs, 2*gates*H]``
with its gates in the order i,o,f,c (LSTM) or z,r,h (GRU); PyTorch keeps one tensor per layer and direction
(``weight_ih_l0``, ``weight_hh_l0``, ``_reverse`` for the backward direction) with its gates in the order i,f,g,o
(LSTM) or r,z,n (GRU). Each (node, W or R, direction) becomes one scored layer whose weight is a *derived* tensor
(``OnnxModel.derived``): the stored rows of that direction gathered into PyTorch's gate order, so masks are keyed
and laid out exactly like the PyTorch parameter, and ``apply`` scatters a trained delta back through the same
positions. Weights that reach the node through layout-only ops (Slice/Concat/Unsqueeze/... of one constant, as
the TorchScript exporter writes an ``nn.LSTMCell``) are traced back to the stored constant, position by position.

Statistics (FPS: E|a| of the activation each weight multiplies):

* ``W`` multiplies x_t: E|x_t| over every time step and sample (the ordinary features observer on X);
* ``R`` multiplies h_{t-1}: for the forward direction the states before steps 0..T-1 are ``initial_h`` (zeros when
  absent) and Y[0..T-2]; the reverse direction runs from T-1 down to 0, so its states are ``initial_h`` and
  Y[1..T-1]. A "state" observer slices Y by direction and time in the graph and adds the ``initial_h`` sums.

With ``sequence_lens`` only the steps a sequence runs count: W's x_t for t < len_b; R's states for those steps,
``initial_h`` then Y[0..len_b-2] (forward) or Y[1..len_b-1] then ``initial_h`` (reverse: it starts at step len_b-1),
so Y's zero padding never enters (masked in the graph; counts are sum(len_b)).

Refused with a reason (listed as skipped): ``sequence_lens`` with ``layout=1`` or before opset 11, GRU
``linear_before_reset=0`` for R (its candidate rows multiply
r_t * h_{t-1}, which is no graph tensor), a missing Y output for R, peepholes and biases (not scored).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from fps_graph.graph.layers import Layer, Skipped, _attr, _scope_of, skipped_weight
from fps_graph.graph.model import ONNX_ERRORS, SHAPE_ERRORS, DerivedTensor, OnnxModel, _constant_value
from fps_graph.graph.names import folded_from, looks_generated

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# PyTorch's gate blocks, as positions of ONNX's gate blocks: LSTM i,f,g,o from i,o,f,c; GRU r,z,n from z,r,h
TORCH_BLOCKS = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
GATE_ORDER = {"LSTM": ("iofc", "ifgo"), "GRU": ("zrh", "rzn"), "RNN": ("h", "h")}
_LAYOUT_OPS = ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Slice", "Concat",
               "Gather", "Split")
_TORCH_NAME = re.compile(r"(^|\.)weight_(ih|hh)_l(\d+)(_reverse)?$")


def torch_rows(op: str, hidden: int) -> np.ndarray:
    """For each row of the PyTorch weight, the row of the ONNX weight (one direction) that holds it."""
    return np.concatenate([np.arange(b * hidden, (b + 1) * hidden) for b in TORCH_BLOCKS[op]]).astype(np.int64)


@dataclass
class RecurrentLayer(Layer):
    """W or R of one direction of a recurrent node; its weight is a derived tensor [gates*H, fan_in] whose rows
    are in PyTorch's gate order, so that canonical layout == derived layout == PyTorch layout."""

    canonical_is_op = True             # (class attribute) selection/positions: no transpose to undo
    part: str = "ih"                   # "ih" (W, reads X) or "hh" (R, reads h_{t-1})
    direction: int = 0
    state: tuple = ()                  # hh: (initial_h or "", num_directions, layout, reverse)
    seq: str = ""                      # the node's sequence_lens input: only steps t < len_b count
    layout: int = 0

    @property
    def canonical_shape(self) -> tuple[int, int]:
        """[gates*H, fan_in], the derived tensor's own shape."""
        return (int(self.op_shape[0]), int(self.op_shape[1]))

    def to_canonical(self, op_array: np.ndarray) -> np.ndarray:
        """The derived tensor is already [out, fan_in]."""
        return op_array

    def stat_to_canonical(self, stat: np.ndarray) -> np.ndarray:
        """One statistic per input column, shared by every row."""
        return stat.reshape(1, -1)

    @property
    def axis_text(self) -> str:
        """The layout in words (inspect): PyTorch's, gates reordered from ONNX's."""
        onnx_order, torch_order = GATE_ORDER[self.op]
        what = "x_t" if self.part == "ih" else "h_(t-1)"
        return f"[gates*H, in] gates {torch_order} (ONNX {onnx_order}); input {what}"

    def observer_key(self) -> tuple:
        """W: the features observer of X (shared by both directions; with sequence_lens, one that counts only the
        steps t < len_b); R: a state observer per direction. Observer states are tagged "x" and "h"."""
        if self.part == "ih":
            base = (self.activation, "features", -1, self.canonical_shape[1], self.graph)
            return base if not self.seq else (*base, ("x", self.seq, self.layout))
        return (self.activation, "features", -1, self.canonical_shape[1], self.graph,
                ("h", *self.state, self.seq, self.direction))


# --------------------------------------------------------------------------------- tracing weights to storage


_SMALL_OPS = ("Add", "Sub", "Mul", "Div", "Gather", "Concat", "Unsqueeze", "Squeeze", "Cast", "Slice", "Reshape",
              "Identity", "Neg", "Range", "Min", "Max", "ConstantOfShape")


def _const(model: OnnxModel, scope: Any, name: str, depth: int = 0) -> np.ndarray | None:
    """Value of a small integer input (shapes, axes, slice bounds), folded from constants and static dimensions
    where it is computed (dynamo exports without constant folding compute slice bounds from Shape of a zero state);
    None when it depends on run-time values."""
    if not name or depth > 24:
        return None
    key = scope.const_key(name)
    if key is not None:
        return model.tensor(key)
    node = scope.producer(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        return _constant_value(node)
    if node.op_type == "Shape":
        dims = _static_shapes(model).get(node.input[0]) if scope.parent is None else None
        if dims is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        part = dims[start:end] if end is not None else dims[start:]
        return np.array(part, dtype=np.int64) if all(isinstance(d, int) for d in part) else None
    if node.op_type not in _SMALL_OPS:
        return None
    values = [_const(model, scope, i, depth + 1) if i else None for i in node.input]
    if any(v is None for v, i in zip(values, node.input) if i) or any(v.size > 4096 for v in values if v is not None):
        return None
    from onnx.reference import ReferenceEvaluator

    feeds = {f"i{k}": v for k, v in enumerate(values) if v is not None}
    inputs = [f"i{k}" if i else "" for k, i in enumerate(node.input)]
    single = helper.make_node(node.op_type, inputs, ["out"], **{a.name: helper.get_attribute_value(a)
                                                               for a in node.attribute})
    try:
        graph = helper.make_graph([single], "fold", [helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for n, v in feeds.items()],
            [helper.make_tensor_value_info("out", onnx.TensorProto.UNDEFINED, None)])
        folded = helper.make_model(graph, opset_imports=[helper.make_opsetid("", model.opset)])
        return np.asarray(ReferenceEvaluator(folded).run(None, feeds)[0])
    except (*ONNX_ERRORS, ValueError, TypeError, RuntimeError, NotImplementedError, KeyError, IndexError):
        # an op the reference evaluator cannot run here: treat the value as computed
        return None


def _static_shapes(model: OnnxModel) -> dict[str, list]:
    """Inferred shapes of main-graph values (ints for static dims), computed once, on a copy without weights."""
    cached = model.__dict__.get("_fpsg_static_shapes")
    if cached is not None:
        return cached
    proto = model.proto
    copy = onnx.ModelProto()
    copy.ir_version = proto.ir_version
    copy.opset_import.extend(proto.opset_import)
    g = copy.graph
    g.node.extend(n for n in proto.graph.node if not any(a.type in (onnx.AttributeProto.GRAPH,
                                                                      onnx.AttributeProto.GRAPHS) for a in n.attribute))
    g.input.extend(proto.graph.input)
    have = {i.name for i in proto.graph.input}
    for t in proto.graph.initializer:
        if t.name not in have:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    out: dict[str, list] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                out[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                                for d in t.shape.dim]   # -1: dynamic (PaddlePaddle)
    except SHAPE_ERRORS:   # no static shapes: Shape nodes stay unknown (their value is treated as computed)
        pass
    model.__dict__["_fpsg_static_shapes"] = out
    return out


_SHIFT = 40   # a traced position is (index of its stored constant) << _SHIFT | (flat position in that constant)


def trace_positions(model: OnnxModel, scope: Any, name: str, depth: int = 0
                    ) -> tuple[tuple[str, ...], np.ndarray] | None:
    """(stored constants, codes shaped like ``name``) for a tensor computed from constants by layout-only ops
    (Slice, Concat, Gather, Reshape, Transpose, ...): each code is ``source index << 40 | flat position``, so a
    W stacked from ``weight_ih_l0`` and ``weight_ih_l0_reverse`` (exports without constant folding) is followed
    to both. None when any value is computed."""
    key = scope.const_key(name)
    if key is not None:
        shape = model.tensor_shape(key)
        return (key,), np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    node = scope.producer(name)
    if node is None or depth > 64 or node.domain not in ("", "ai.onnx") or node.op_type not in _LAYOUT_OPS:
        return None
    op = node.op_type
    if op == "Concat":
        parts = [trace_positions(model, scope, i, depth + 1) for i in node.input]
        if any(p is None for p in parts):
            return None
        sources: list[str] = []
        arrays = []
        for srcs, codes in parts:
            remap = np.array([sources.index(x) if x in sources else (sources.append(x) or len(sources) - 1)
                              for x in srcs], dtype=np.int64)
            arrays.append((remap[codes >> _SHIFT] << _SHIFT) | (codes & ((1 << _SHIFT) - 1)))
        try:
            return tuple(sources), np.concatenate(arrays, axis=int(_attr(node, "axis", 0)))
        except ValueError:
            return None
    base = trace_positions(model, scope, node.input[0], depth + 1)
    if base is None:
        return None
    srcs, idx = base
    try:
        out = _layout_op(model, scope, node, idx, name)
    except (ValueError, IndexError, TypeError):
        return None
    return None if out is None else (srcs, out)


def one_source(traced: tuple[tuple[str, ...], np.ndarray], part: np.ndarray) -> tuple[str, np.ndarray] | None:
    """(stored constant, flat positions) of a slice of traced codes that all come from one constant, else None."""
    which = np.unique(part >> _SHIFT)
    if which.size != 1:
        return None
    return traced[0][int(which[0])], part & ((1 << _SHIFT) - 1)


def _layout_op(model: OnnxModel, scope: Any, node: onnx.NodeProto, idx: np.ndarray, name: str
               ) -> np.ndarray | None:
    """One layout op applied to an array of positions (numpy semantics of the ONNX op)."""
    op = node.op_type
    ins = list(node.input) + [""] * 5
    if op in ("Identity", "Cast"):
        return idx
    if op in ("Unsqueeze", "Squeeze"):
        axes = _attr(node, "axes")
        if axes is None and ins[1]:
            v = _const(model, scope, ins[1])
            if v is None:
                return None
            axes = [int(a) for a in v.reshape(-1)]
        if op == "Squeeze":
            return np.squeeze(idx, axis=None if axes is None else tuple(a % idx.ndim for a in axes))
        rank = idx.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            idx = np.expand_dims(idx, a)
        return idx
    if op == "Reshape":
        v = _const(model, scope, ins[1])
        if v is None:
            return None
        target = [int(t) for t in v.reshape(-1)]
        if not int(_attr(node, "allowzero", 0)):
            target = [idx.shape[i] if t == 0 else t for i, t in enumerate(target)]
        return idx.reshape(target)
    if op == "Flatten":
        axis = int(_attr(node, "axis", 1)) % (idx.ndim + 1) if idx.ndim else 0
        return idx.reshape(int(np.prod(idx.shape[:axis])), -1)
    if op == "Transpose":
        perm = _attr(node, "perm")
        return np.transpose(idx, None if perm is None else list(perm))
    if op == "Slice":
        starts, ends = _const(model, scope, ins[1]), _const(model, scope, ins[2])
        if starts is None or ends is None:
            return None
        axes = _const(model, scope, ins[3]) if ins[3] else np.arange(len(starts.reshape(-1)))
        steps = _const(model, scope, ins[4]) if ins[4] else np.ones(len(starts.reshape(-1)), dtype=np.int64)
        if axes is None or steps is None:
            return None
        sl = [slice(None)] * idx.ndim
        for s, e, a, st in zip(starts.reshape(-1), ends.reshape(-1), axes.reshape(-1), steps.reshape(-1)):
            sl[int(a) % idx.ndim] = slice(int(s), int(e), int(st))
        return idx[tuple(sl)]
    if op == "Gather":
        ind = _const(model, scope, ins[1])
        if ind is None:
            return None
        return np.take(idx, ind.astype(np.int64), axis=int(_attr(node, "axis", 0)))
    if op == "Split":
        axis = int(_attr(node, "axis", 0)) % idx.ndim
        sizes = _attr(node, "split")
        if sizes is None and ins[1]:
            v = _const(model, scope, ins[1])
            if v is None:
                return None
            sizes = [int(s) for s in v.reshape(-1)]
        n = len(node.output)
        if sizes is None:
            chunk = -(-idx.shape[axis] // n)
            sizes = [min(chunk, idx.shape[axis] - i * chunk) for i in range(n)]
        bounds = np.cumsum([0, *sizes])
        k = list(node.output).index(name)
        return np.take(idx, np.arange(bounds[k], bounds[k + 1]), axis=axis)
    return None


# -------------------------------------------------------------------------------------------------- naming


def _module_prefix(node: onnx.NodeProto, scope: Any) -> tuple[str, int] | None:
    """(module path, layer number) of a node exported from torch.nn.LSTM/GRU/RNN, from its legacy '/a/b/LSTM_1'
    name or dynamo scope metadata: the k-th node of this op under one module is its layer k; None if unknown."""
    has_meta = any(p.key == "pkg.torch.onnx.name_scopes" for p in node.metadata_props)
    if not (node.name.startswith("/") or has_meta):
        return None
    path = _scope_of(node)
    k = 0
    for other in scope.graph.node:
        if other is node:
            return path, k
        if other.op_type == node.op_type and (other.name.startswith("/") or has_meta) and _scope_of(other) == path:
            k += 1
    return None


def _folded_name(model: OnnxModel, stored: str, part: str, reverse_suffix: bool) -> str | None:
    """dynamo's record of the PyTorch parameter a folded W/R came from (``folded_from`` metadata)."""
    cands = [c for c in folded_from(model).get(stored, []) if not looks_generated(c)]
    hits = [c for c in cands if (m := _TORCH_NAME.search(c)) and m.group(2) == part
            and bool(m.group(4)) == reverse_suffix]
    return hits[0] if len(hits) == 1 else None


def _key_names(model: OnnxModel, scope: Any, node: onnx.NodeProto, name: str, stored: str, part: str,
               direction: int, dirs: int) -> tuple[str, str]:
    """(PyTorch-style name of the weight, how it was found): dynamo metadata, the legacy node path, or the node."""
    suffix = "_reverse" if dirs == 2 and direction == 1 else ""
    local = stored.split("::")[-1]
    m = _TORCH_NAME.search(local)
    if m and m.group(2) == part and bool(m.group(4)) == bool(suffix):   # exported unfolded: the parameter itself
        return local, "initializer-name"
    folded = _folded_name(model, stored, part, bool(suffix))
    if folded:
        return folded, "folded-from"
    mod = _module_prefix(node, scope)
    if mod is not None:
        path, k = mod
        base = f"weight_{part}_l{k}{suffix}"
        return (f"{path}.{base}" if path else base), "node-scope"
    m = re.search(r"weight_(ih|hh)(_l\d+)?$", local)
    if m and m.group(1) == part and dirs == 1:       # an LSTMCell/GRUCell parameter, sliced into gates
        return local, "initializer-name"
    return f"{name}.weight_{part}{suffix}", "onnx-node"


def _register(model: OnnxModel, key: str, node_name: str, source: str, index: np.ndarray, layout: dict,
              how: str) -> str:
    """Register a derived tensor under key (made unique if the model already has that name); return its name.

    When the positions are the whole stored tensor in order (an unfolded export, an LSTMCell's weight), the stored
    tensor is the PyTorch tensor itself: no derived tensor, its own name."""
    shape = model.tensor_shape(source)
    if tuple(index.shape) == tuple(shape) and np.array_equal(index.reshape(-1), np.arange(index.size)):
        return source
    for name, d in model.derived.items():   # the same weights read by another node (a module called twice): one tensor
        if d.source == source and d.index.shape == index.shape and np.array_equal(d.index, index):
            return name
    final = key
    if model.is_constant(final) and not (final in model.derived and model.derived[final].source == source
                                         and np.array_equal(model.derived[final].index, index)):
        final = f"{key}@{node_name}"
    model.derived[final] = DerivedTensor(source, np.ascontiguousarray(index), layout, how)
    return final


# ------------------------------------------------------------------------------------------------ dispatch


def dispatch_recurrent(model: OnnxModel, scope: Any, node: onnx.NodeProto, name: str
                       ) -> tuple[list[Layer], list[Skipped]] | None:
    """Scored layers (W and R per direction) of an LSTM/GRU/RNN node and what is skipped; None for other ops."""
    op = node.op_type
    if op not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
        return None
    ins = list(node.input) + [""] * 8
    x, w_in, r_in, b_in, seq, init_h = ins[:6]
    y = node.output[0] if node.output else ""
    direction = _attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    dirs = 2 if direction == "bidirectional" else 1
    layout = int(_attr(node, "layout", 0))
    skipped: list[Skipped] = []
    w = trace_positions(model, scope, w_in)
    r = trace_positions(model, scope, r_in)
    if w is None or w[1].ndim != 3 or w[1].shape[0] != dirs or r is None or r[1].ndim != 3:
        what = "W" if w is None or w[1].ndim != 3 else "R"
        skipped.append(Skipped(name, op, f"{what} is computed at run time (not a layout-only view of one constant)"))
        return [], skipped
    gates = GATES[op]
    hidden = int(_attr(node, "hidden_size", 0) or r[1].shape[-1])
    if w[1].shape[1] != gates * hidden or r[1].shape[1:] != (gates * hidden, hidden):
        skipped.append(Skipped(name, op, f"W {list(w[1].shape)} / R {list(r[1].shape)} do not match {gates} gates of "
                                         f"hidden size {hidden}"))
        return [], skipped
    if seq and layout:
        skipped.append(Skipped(name, op, f"sequence_lens input {seq!r} with layout=1 (batch-first): ONNX Runtime's "
                                         "CPU kernels refuse batch-first recurrent nodes, so this cannot be checked; "
                                         "not scored"))
        return [], skipped
    if seq and model.opset < 11:
        skipped.append(Skipped(name, op, f"sequence_lens input {seq!r} in opset {model.opset}: masking the steps "
                                         "past each length needs Range (opset 11); not scored"))
        return [], skipped
    if x and scope.const_key(x) is not None:
        skipped.append(Skipped(name, op, f"input X {x!r} is a constant"))
        return [], skipped
    rows = torch_rows(op, hidden)
    order = {"onnx": GATE_ORDER[op][0], "torch": GATE_ORDER[op][1], "blocks": list(TORCH_BLOCKS[op])}
    bias = trace_positions(model, scope, b_in) if b_in else None
    layers: list[Layer] = []
    for part, traced, act in (("ih", w, x), ("hh", r, y)):
        for d in range(dirs):
            reverse = direction == "reverse" or d == 1
            found = one_source(traced, traced[1][d][rows])
            if found is None:
                skipped.append(Skipped(name, op, f"{'W' if part == 'ih' else 'R'}[{d}] mixes values of several "
                                                 "stored tensors; not scored"))
                continue
            src, index = found
            key, how = _key_names(model, scope, node, name, src, part, d, dirs)
            if part == "hh" and op == "GRU" and not int(_attr(node, "linear_before_reset", 0)):
                skipped.append(Skipped(name, op, f"{key}: GRU with linear_before_reset=0 applies R's candidate rows "
                                                 "to r_t*h_{t-1}, which is no graph tensor; not scored"))
                continue
            if part == "hh" and not y:
                skipped.append(Skipped(name, op, f"{key}: the node's output sequence Y is not produced, so h_(t-1) "
                                                 "cannot be observed; not scored"))
                continue
            lay = {"recurrent": {"op": op, "node": name, "part": part, "direction": d, "source": src,
                                 "source_shape": list(model.tensor_shape(src)), "gate_order": order}}
            dname = _register(model, key, name, src, index, lay, how)
            if bias is not None and bias[1].shape == (dirs, 2 * gates * hidden):
                half = bias[1][d][: gates * hidden] if part == "ih" else bias[1][d][gates * hidden:]
                bfound = one_source(bias, half[rows])
                if bfound is not None:
                    blay = {"recurrent": dict(lay["recurrent"], source=bfound[0],
                                              source_shape=list(model.tensor_shape(bfound[0])))}
                    _register(model, re.sub(r"weight_(ih|hh)", r"bias_\1", dname), name, bfound[0], bfound[1], blay,
                              how)
            shape = (gates * hidden, int(index.shape[1]))
            state = (init_h, dirs, layout, reverse) if part == "hh" else ()
            layers.append(RecurrentLayer(node=f"{name}:{key}", op=op, activation=act, weight=dname, chain=[],
                                         stored_shape=shape, op_shape=shape, feature_axis=-1, part=part,
                                         direction=d, state=state, seq=seq, layout=layout))
    if bias is not None:
        for b in bias[0]:
            skipped.append(skipped_weight(model, b, name, op, "recurrent biases are not scored (train trains the "
                                                               "biases of masked layers in full)"))
    if op == "LSTM" and ins[7]:
        skipped.append(Skipped(name, op, f"peephole weights {ins[7]!r}: not scored"))
    return layers, skipped


def scored_sources(model: OnnxModel, layers: list[Layer]) -> set[str]:
    """Stored constants behind derived weights and biases (so they are not listed as unscored)."""
    nodes = {l.node.split(":")[0] for l in layers if isinstance(l, RecurrentLayer)}
    return {d.source for d in model.derived.values() if d.layout.get("recurrent", {}).get("node") in nodes}


def zero_state_notes(layers: list[Layer], stats: Any, keys: dict[str, str] | None = None) -> list[str]:
    """Warnings for recurrent weights R whose every observed h_(t-1) was zero (one step per sample from a zero
    initial state, as silero-vad chunks with a fresh state): all their FPS scores tie at zero."""
    notes = []
    seen: set[str] = set()
    for layer in layers:
        if not isinstance(layer, RecurrentLayer) or layer.part != "hh" or layer.weight in seen:
            continue
        group = [l for l in layers if l.weight == layer.weight]
        seen.add(layer.weight)
        sums = [stats.sums.get(l.node, {}).get("abs") for l in group]
        if any(stats.counts.get(l.node, 0) for l in group) and all(s is None or not np.any(s) for s in sums):
            notes.append(f"{(keys or {}).get(layer.weight, layer.weight)}: every h_(t-1) it multiplied was zero (a zero initial state and one step "
                         "per sample?), so its scores all tie; feed a state taken from running the model on data "
                         "(--static), or --exclude it")
    return notes


__all__ = ["RECURRENT_OPS", "RecurrentLayer", "dispatch_recurrent", "scored_sources",
           "torch_rows", "trace_positions", "zero_state_notes"]
