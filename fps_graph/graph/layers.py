"""Finding the selectable layers of an ONNX graph: MatMul/Gemm/Conv/ConvTranspose nodes whose weight is a constant.

A weight may reach its node through Transpose, Cast, Identity, Reshape, Squeeze/Unsqueeze or DequantizeLinear;
the chain is recorded so that weight values and element positions can be carried from the stored tensor to the
layout the node uses, and from there to the "canonical" [out_features, fan_in] matrix in which FPS and GPS rank
the input connections of every output neuron (conv kernels flattened to [out, in/groups * kh * kw]; ConvTranspose
kernels [in, out/groups, *k] to [out, in/groups * prod(k)], see ConvTransposeLayer).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from fps_graph.errors import ModelError
from fps_graph.graph.dequant import QuantizedTensor, register_view
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.walk import BODY_OPS, LOOP_OPS, Scope, iter_nodes, model_scopes, node_names

SCORED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
MAP_OPS = ("Conv", "ConvTranspose")        # observed as activation maps, windows taken on the host
PASS_THROUGH = ("Transpose", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "DequantizeLinear", "Flatten")
# quantized ops scored by graph/quantized.py, and the domains they come in
QUANTIZED_OPS = {
    "MatMulInteger": ("", "ai.onnx"), "ConvInteger": ("", "ai.onnx"),
    "DynamicQuantizeMatMul": ("com.microsoft",), "MatMulIntegerToFloat": ("com.microsoft",),
    "MatMulNBits": ("com.microsoft",), "DynamicQuantizeLSTM": ("com.microsoft",),
}
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class Layer:
    """One scored node: which activation it reads, which stored constant is its weight, and how they line up."""

    node: str                 # node name (generated as "<op>_<index>" when the graph has none)
    op: str                   # MatMul, Gemm or Conv
    activation: str           # name of the input tensor that the weight multiplies
    weight: str               # stored constant (initializer or Constant node output)
    chain: list[dict[str, Any]]   # transforms from the stored tensor to the node's weight input, in order
    stored_shape: tuple[int, ...]
    op_shape: tuple[int, ...]     # shape of the weight as the node sees it
    feature_axis: int          # axis of the activation that holds the input features (MatMul/Gemm)
    trans_b: bool = False      # Gemm only
    conv: dict[str, Any] = field(default_factory=dict)   # Conv only: strides, pads, dilations, group, auto_pad
    scope: str = ""            # module path taken from node metadata or name, when there is one
    graph: str = ""            # path of the (sub)graph holding the node ("" = main graph; see graph.walk)
    loops: int = 0             # enclosing Loop/Scan bodies (the node runs once per iteration of each)
    node_op: str = ""          # the node's own op when it differs from ``op`` (MatMulInteger, com.microsoft.MatMulNBits)

    @property
    def out_features(self) -> int:
        """Number of output neurons."""
        return self.canonical_shape[0]

    @property
    def fan_in(self) -> int:
        """Number of input connections per output neuron."""
        return self.canonical_shape[1]

    @property
    def canonical_shape(self) -> tuple[int, int]:
        """[out_features, fan_in]."""
        if self.op == "Conv":
            return (self.op_shape[0], int(np.prod(self.op_shape[1:])))
        if self.op == "Gemm" and self.trans_b:
            return (self.op_shape[0], self.op_shape[1])
        return (self.op_shape[1], self.op_shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of the per-input-feature statistic: [in] for MatMul/Gemm, [C, *kernel] for Conv."""
        if self.op == "Conv":
            group = self.conv["group"]
            return (self.op_shape[1] * group, *self.op_shape[2:])
        return (self.canonical_shape[1],)

    def to_op(self, stored: np.ndarray) -> np.ndarray:
        """Carry a stored-layout array (values or element positions) through the chain to the node's layout."""
        return apply_chain(stored, self.chain)

    def to_canonical(self, op_array: np.ndarray) -> np.ndarray:
        """Rearrange a node-layout weight array to [out_features, fan_in]."""
        if self.op == "Conv":
            return op_array.reshape(op_array.shape[0], -1)
        if self.op == "Gemm" and self.trans_b:
            return op_array
        return op_array.T

    def canonical_index(self) -> np.ndarray:
        """[out, fan_in] array of flat positions in the stored tensor (row-major)."""
        n = int(np.prod(self.stored_shape))
        idx = np.arange(n, dtype=np.int64).reshape(self.stored_shape)
        return np.ascontiguousarray(self.to_canonical(self.to_op(idx)))

    def canonical_weight(self, model: OnnxModel) -> np.ndarray:
        """The weight as the node computes with it (dequantized, cast), as [out, fan_in] float64."""
        stored = model.tensor(self.weight)
        return np.ascontiguousarray(self.to_canonical(apply_chain(stored, self.chain, values=True, model=model)),
                                    dtype=np.float64)

    def stat_to_canonical(self, stat: np.ndarray) -> np.ndarray:
        """Broadcast a per-input-feature statistic to [out or 1, fan_in] (conv groups respected)."""
        if self.op != "Conv":
            return stat.reshape(1, -1)
        group = self.conv["group"]
        out = self.op_shape[0]
        rows = stat.reshape(group, -1)      # [group, C/group * prod(kernel)]
        if group == 1:
            return rows
        return np.repeat(rows, out // group, axis=0)


@dataclass
class ConvTransposeLayer(Layer):
    """A ConvTranspose node. ONNX and PyTorch store its weight as W [in, out/group, *kernel]: input channel c
    (of group g) adds x[c, p] * W[c, o, tap] into output channel g * out/group + o for every tap. Its canonical
    [out_features, fan_in] view, in which the input connections of each output neuron are ranked like a Conv's,
    is [out, in/group * prod(kernel)]: row = output channel, columns = (input channel of its group, tap) in
    row-major order. The per-input statistic is [in, *kernel] (runtime/windows.py: conv_transpose_window_sums)."""

    @property
    def group(self) -> int:
        """Number of groups."""
        return int(self.conv["group"])

    @property
    def canonical_shape(self) -> tuple[int, int]:
        """[out, in/group * prod(kernel)]."""
        c, m = self.op_shape[0], self.op_shape[1] * self.group
        return (int(m), int(c // self.group * int(np.prod(self.op_shape[2:]))))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """[in, *kernel]: one statistic per input channel and tap."""
        return (int(self.op_shape[0]), *map(int, self.op_shape[2:]))

    def to_canonical(self, op_array: np.ndarray) -> np.ndarray:
        """[in, out/g, *k] -> [g, in/g, out/g, *k] -> [g, out/g, in/g, *k] -> [out, in/g * prod(k)]."""
        g = self.group
        c, mg = op_array.shape[0], op_array.shape[1]
        a = op_array.reshape(g, c // g, mg, -1).transpose(0, 2, 1, 3)
        return a.reshape(g * mg, -1)

    def op_coords(self, pos: np.ndarray) -> list[np.ndarray]:
        """Coordinates in the node's weight layout of flat canonical positions (inverse of to_canonical)."""
        g = self.group
        c, mg = int(self.op_shape[0]), int(self.op_shape[1])
        kernel = tuple(int(k) for k in self.op_shape[2:])
        taps = int(np.prod(kernel))
        row, col = np.divmod(pos, self.canonical_shape[1])
        grp, o = np.divmod(row, mg)
        cl, tap = np.divmod(col, taps)
        return [grp * (c // g) + cl, o, *np.unravel_index(tap, kernel)]

    def stat_to_canonical(self, stat: np.ndarray) -> np.ndarray:
        """[in, *kernel] -> [1 or out, in/group * prod(kernel)] (each group's rows share their inputs)."""
        rows = stat.reshape(self.group, -1)
        if self.group == 1:
            return rows
        return np.repeat(rows, self.canonical_shape[0] // self.group, axis=0)

    @property
    def axis_text(self) -> str:
        """The layout in words (inspect)."""
        g = f"/{self.group}" if self.group > 1 else ""
        return f"[in, out{g}, *kernel]; rows = output channels, input channel axis 0 (adjoint of im2col)"

    def observer_key(self) -> tuple:
        """The activation map, like a Conv (a Conv reading the same tensor shares it)."""
        return (self.activation, "map", 0, 0, self.graph)


@dataclass(frozen=True)
class Skipped:
    """Something not scored, and why: a node (``weight`` empty, e.g. a MatMul of two run-time values) or a stored
    weight-like constant (``weight`` set: its model-wide key, shape, dtype and value count; see graph/inventory.py).

    One record type for every "not scored" list: ``inspect``, the masks header (``skipped``), the ``select``
    summary. Build weight records with :func:`skipped_weight`, which reads shape and dtype from the model.
    """

    node: str                         # qualified node name (the reader of the weight, when there is one)
    op: str                           # that node's op type (``domain.op`` outside the default domain)
    reason: str                       # why, in words; says what to do where something can be done
    weight: str = ""                  # model-wide key of the stored constant ("" for a node-only record)
    shape: tuple[int, ...] = ()       # its stored shape
    dtype: str = ""                   # its stored dtype (numpy name: float32, int8, uint8, ...)
    values: int = 0                   # weight values it holds (packed int4 counts two per byte)

    def to_json(self) -> dict[str, Any]:
        """The record as inspect --json and the masks header write it."""
        return {"node": self.node, "op": self.op, "reason": self.reason, "weight": self.weight,
                "shape": list(self.shape), "dtype": self.dtype, "values": int(self.values)}

    def describe(self) -> str:
        """One line for people: ``node (op): weight [shape] dtype: reason``."""
        what = f"{self.weight} {list(self.shape)} {self.dtype}: " if self.weight else ""
        return f"{self.node} ({self.op}): {what}{self.reason}"


def skipped_weight(model: OnnxModel, key: str, node: str, op: str, reason: str, values: int | None = None
                   ) -> Skipped:
    """A weight record: ``key``'s shape and dtype read from the model (values: its element count unless given)."""
    shape = tuple(int(d) for d in model.tensor_shape(key))
    n = int(np.prod(shape)) if values is None else int(values)
    return Skipped(node, op, reason, weight=key, shape=shape, dtype=np.dtype(model.tensor_dtype(key)).name, values=n)


QUANTIZED_DTYPES = ("int8", "uint8", "int4", "uint4", "int16", "uint16")


def is_weight_like(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """A constant of >= 2 dimensions holding floats (any width, bf16 and float8 included) or quantized integers."""
    if len(shape) < 2:
        return False
    name = np.dtype(dtype).name
    return np.dtype(dtype).kind in "fc" or "float" in name or name in QUANTIZED_DTYPES


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def apply_chain(arr: np.ndarray, chain: list[dict[str, Any]], values: bool = False,
                model: OnnxModel | None = None) -> np.ndarray:
    """Apply recorded pass-through ops; with values=False only the layout changes (positions), not the numbers."""
    for step in chain:
        op = step["op"]
        if op == "Transpose":
            perm = step["perm"] or list(range(arr.ndim))[::-1]
            arr = np.transpose(arr, perm)
        elif op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            arr = arr.reshape(step["shape"])
        elif op == "Cast" and values:
            arr = arr.astype(step["dtype"])
        elif op == "DequantizeLinear" and values:
            assert model is not None
            scale = model.tensor(step["scale"]).astype(np.float32)
            zp = model.tensor(step["zero_point"]).astype(np.float32) if step["zero_point"] else np.float32(0)
            axis = step["axis"] % arr.ndim if arr.ndim else 0
            if step.get("block_size"):      # blocked (opset 21): one scale per block of block_size along axis
                bs = int(step["block_size"])
                scale = np.repeat(scale, bs, axis=axis).take(range(arr.shape[axis]), axis=axis)
                if np.ndim(zp):
                    zp = np.repeat(zp, bs, axis=axis).take(range(arr.shape[axis]), axis=axis)
            elif scale.ndim == 1 and scale.size > 1:
                shape = [1] * arr.ndim
                shape[axis] = -1
                scale = scale.reshape(shape)
                if np.ndim(zp) == 1:
                    zp = zp.reshape(shape)
            arr = (arr.astype(np.float32) - zp) * scale
    return arr


def _resolve_weight(model: OnnxModel, name: str, scope: Scope) -> tuple[str, list[dict[str, Any]]] | None:
    """Follow pass-through ops back from a node input to a stored constant; None if it is computed at run time.

    Names are looked up the way ONNX scoping does (a body reads tensors of its enclosing graphs); the constant is
    returned under its model-wide key (see graph.walk).
    """
    chain: list[dict[str, Any]] = []

    def const(n: str) -> str | None:
        return scope.const_key(n) if n else None

    for _ in range(16):
        key = const(name)
        if key is not None:
            shape = model.tensor_shape(key)
            return key, _finish_chain(list(reversed(chain)), shape)
        node = scope.producer(name)
        if node is not None and node.op_type == "Mul" and node.domain in ("", "ai.onnx"):
            view = cast_scale_view(model, scope, node)       # Mul(Cast(int8), scale): a quantized weight
            if view is not None:
                return view, _finish_chain(list(reversed(chain)), model.tensor_shape(view))
        if node is None or node.op_type not in PASS_THROUGH or node.domain not in ("", "ai.onnx"):
            return None
        step: dict[str, Any] = {"op": node.op_type}
        if node.op_type == "Transpose":
            perm = _attr(node, "perm")
            step["perm"] = list(perm) if perm is not None else None
        elif node.op_type == "Cast":
            step["dtype"] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
        elif node.op_type == "Reshape":
            if len(node.input) < 2 or const(node.input[1]) is None:
                return None
            step["target"] = [int(v) for v in model.tensor(const(node.input[1])).reshape(-1)]
            step["allowzero"] = int(_attr(node, "allowzero", 0))
        elif node.op_type in ("Squeeze", "Unsqueeze"):
            axes = _attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                if const(node.input[1]) is None:
                    return None
                axes = [int(v) for v in model.tensor(const(node.input[1])).reshape(-1)]
            step["axes"] = list(axes) if axes is not None else None
        elif node.op_type == "Flatten":
            step["axis"] = int(_attr(node, "axis", 1))
        elif node.op_type == "DequantizeLinear":
            if not all(const(n) is not None for n in node.input[1:] if n):
                return None
            step["scale"] = const(node.input[1])
            step["zero_point"] = const(node.input[2]) if len(node.input) > 2 and node.input[2] else ""
            step["axis"] = int(_attr(node, "axis", 1))
            step["block_size"] = int(_attr(node, "block_size", 0) or 0)
        chain.append(step)
        name = node.input[0]
    return None


def _plain_const(model: OnnxModel, scope: Scope, name: str) -> str | None:
    """The stored constant a name refers to directly (or through Identity), else None."""
    resolved = _resolve_weight(model, name, scope) if name else None
    if resolved is None or any(step["op"] != "Identity" for step in resolved[1]):
        return None
    return resolved[0]


def cast_scale_view(model: OnnxModel, scope: Scope, node: onnx.NodeProto) -> str | None:
    """The float view of ``Mul(Cast(q), scale)`` / ``Mul(Sub(Cast(q), zero_point), scale)`` (either operand order)
    made of constants only, q an integer constant; None for any other Mul."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for wq, s in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        scale = _plain_const(model, scope, s)
        if scale is None or np.dtype(model.tensor_dtype(scale)).kind != "f":
            continue
        prod = scope.producer(wq)
        zero_point = ""
        if prod is not None and prod.op_type == "Sub" and prod.domain in ("", "ai.onnx"):
            zp = _resolve_weight(model, prod.input[1], scope)
            if zp is None or any(step["op"] not in ("Identity", "Cast") for step in zp[1]):
                continue
            zero_point = zp[0]
            prod = scope.producer(prod.input[0])
        if prod is None or prod.op_type != "Cast" or _attr(prod, "to") not in _FLOAT:
            continue
        source = _plain_const(model, scope, prod.input[0])
        if source is None or np.dtype(model.tensor_dtype(source)).kind not in "iu":
            continue
        shape = tuple(model.tensor_shape(source))
        try:
            if np.broadcast_shapes(shape, *(tuple(model.tensor_shape(k)) for k in (scale, zero_point) if k)) != shape:
                continue
        except ValueError:
            continue
        q = QuantizedTensor(source=source, format="linear", shape=shape, scale=scale, zero_point=zero_point,
                            how="Cast x scale")
        return register_view(model, q, hint=node.output[0])
    return None


def _finish_chain(chain: list[dict[str, Any]], shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Turn reshape-like steps into explicit target shapes, following the tensor's shape through the chain."""
    out = []
    cur = tuple(shape)
    for step in chain:
        step = dict(step)
        op = step["op"]
        if op == "Transpose":
            perm = step["perm"] or list(range(len(cur)))[::-1]
            step["perm"] = list(perm)
            cur = tuple(cur[p] for p in perm)
        elif op == "Reshape":
            target = list(step.pop("target"))
            allowzero = step.pop("allowzero")
            if not allowzero:
                target = [cur[i] if v == 0 else v for i, v in enumerate(target)]
            if -1 in target:
                known = int(np.prod([v for v in target if v != -1]))
                target[target.index(-1)] = int(np.prod(cur)) // max(known, 1)
            step["shape"] = target
            cur = tuple(target)
        elif op == "Squeeze":
            axes = step.pop("axes")
            axes = [a % len(cur) for a in axes] if axes is not None else [i for i, d in enumerate(cur) if d == 1]
            cur = tuple(d for i, d in enumerate(cur) if i not in axes)
            step["shape"] = list(cur)
        elif op == "Unsqueeze":
            added = step.pop("axes")   # popped first: the generator below must not read it back from step
            axes = sorted(a % (len(cur) + len(added)) for a in added)
            new = list(cur)
            for a in axes:
                new.insert(a, 1)
            cur = tuple(new)
            step["shape"] = list(cur)
        elif op == "Flatten":
            axis = step.pop("axis") % (len(cur) + 1) if cur else 0
            cur = (int(np.prod(cur[:axis])), int(np.prod(cur[axis:])))
            step["shape"] = list(cur)
        out.append(step)
    return out


def _op_shape(stored_shape: tuple[int, ...], chain: list[dict[str, Any]]) -> tuple[int, ...]:
    probe = np.empty(stored_shape, dtype=np.uint8)
    return tuple(apply_chain(probe, chain).shape)


def _scope_of(node: onnx.NodeProto) -> str:
    """Module path of a node from exporter metadata (dynamo name_scopes) or its legacy '/a/b.0/c/Op' name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in eval_list(p.value) if s]
            except ValueError:
                scopes = []
            if len(scopes) >= 2:
                return scopes[-2]
            return ""
    name = node.name
    if name.startswith("/") and name.count("/") >= 2:
        parts = [s for s in name.split("/")[1:-1] if s]
        path: list[str] = []
        for seg in parts:
            if path and seg.startswith(path[-1] + "."):
                path[-1] = seg
            else:
                path.append(seg)
        return ".".join(path)
    return ""


def eval_list(text: str) -> list[str]:
    """Parse a Python-literal list of strings as exporters write them in metadata."""

    value = ast.literal_eval(text)
    if not isinstance(value, list):
        raise ValueError(text)
    return [str(v) for v in value]


def _body_refusal(scope: Scope, op: str, opset: int) -> str | None:
    """Why a scored op inside this (sub)graph cannot be observed exactly, or None when it can."""
    ops = scope.ops
    for outer in ops:
        if outer not in BODY_OPS:
            return f"inside a {outer} body; only If, Loop and Scan bodies are observed"
    if "Scan" in ops and opset < 9:
        return "inside a Scan body of opset < 9 (batch-axis Scan); re-export with opset >= 9"
    if op in MAP_OPS:
        for i, outer in enumerate(ops):
            if outer == "If" and any(o in LOOP_OPS for o in ops[:i]):
                return (f"{op} inside an If branch within a Loop/Scan body: the branch not taken cannot yield an "
                        "activation map of the same shape in every iteration")
    return None


def find_layers(model: OnnxModel) -> tuple[list[Layer], list[Skipped]]:
    """All scored layers of the model, in graph order (bodies of If/Loop/Scan nodes right after their node), and
    every candidate that was skipped (with reasons), including unscored constant tensors (see _unscored)."""
    scopes = model_scopes(model)
    opset = model.opset
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    for scope, node, local in iter_nodes(scopes):
        name = scope.qualify(local)
        op = node.op_type
        if op in QUANTIZED_OPS and node.domain in QUANTIZED_OPS[op]:   # graph/quantized.py
            from fps_graph.graph.quantized import dispatch_quantized

            refusal = _body_refusal(scope, "Conv" if op == "ConvInteger" else op, opset)
            found, why = dispatch_quantized(model, scope, node, name) if refusal is None else (
                [], [Skipped(name, op, refusal)])
            for layer in found:
                layer.graph, layer.loops = scope.path, scope.loops
            layers.extend(found)
            skipped.extend(why)
            continue
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in ("QLinearConv", "QLinearMatMul"):
            skipped.append(Skipped(name, op, f"op {op} is not supported for scoring"))
            continue
        if op in ("LSTM", "GRU", "RNN"):              # graph/recurrent.py: W and R per direction, or reasons
            from fps_graph.graph.recurrent import dispatch_recurrent

            refusal = _body_refusal(scope, op, opset)
            found, why = dispatch_recurrent(model, scope, node, name) if refusal is None else (
                [], [Skipped(name, op, refusal)])
            for layer in found:
                layer.graph, layer.loops = scope.path, scope.loops
            layers.extend(found)
            skipped.extend(why)
            continue
        if op not in SCORED_OPS:
            continue
        refusal = _body_refusal(scope, op, opset)
        layer = None
        if refusal is not None:
            skipped.append(Skipped(name, op, refusal))
        else:
            layer = _layer_of(model, scope, node, name, skipped)
        if layer is not None:
            layer.scope = _scope_of(node)
            layer.graph = scope.path
            layer.loops = scope.loops
            layers.append(layer)
    from fps_graph.graph.recurrent import scored_sources

    scored = {layer.weight for layer in layers} | scored_sources(model, layers)
    for key in list(scored):                 # the stored constants behind derived and dequantized views
        key = model.derived[key].source if key in model.derived else key
        if key in model.quantized:
            scored |= set(model.quantized[key].stored())
    _name_unscored(model, scopes, scored, skipped)
    return layers, skipped


def _layer_of(model: OnnxModel, scope: Scope, node: onnx.NodeProto, name: str,
              skipped: list[Skipped]) -> Layer | None:
    """The Layer of one MatMul/Gemm/Conv node, or None (with the reason added to skipped)."""
    op = node.op_type
    if len(node.input) < 2:
        skipped.append(Skipped(name, op, "node has fewer than two inputs"))
        return None
    act, wname = node.input[0], node.input[1]
    resolved = _resolve_weight(model, wname, scope)
    if resolved is None:
        if _resolve_weight(model, act, scope) is not None and op == "MatMul":
            skipped.append(Skipped(name, op, f"constant is the left operand ({act}); only x @ W is scored"))
        else:
            skipped.append(Skipped(name, op, f"weight input {wname!r} is computed at run time, not a constant"))
        return None
    if _resolve_weight(model, act, scope) is not None:
        skipped.append(Skipped(name, op, f"activation input {act!r} is a constant too"))
        return None
    stored, chain = resolved
    stored_shape = model.tensor_shape(stored)
    try:
        op_shape = _op_shape(stored_shape, chain)
    except ValueError as exc:
        raise ModelError(f"node {name}: cannot follow the weight {stored!r} through {chain}: {exc}") from exc
    before = len(skipped)
    layer = _make_layer(node, name, act, stored, chain, stored_shape, op_shape, skipped)
    if layer is None and len(skipped) > before and not skipped[-1].weight:   # name the weight (1-D/3-D MatMul...)
        last = skipped.pop()
        skipped.append(skipped_weight(model, stored, last.node, last.op, last.reason))
    return layer


# Why a constant read by an op that is never scored is not selectable (the "no silent omissions" list).
_UNSCORED_REASONS = {
    "Gather": "read by Gather (an embedding or position table): rows are picked by index, not multiplied by an "
              "input activation; not scored",
    "GatherElements": "read by GatherElements (a lookup table), not multiplied by an input activation; not scored",
    "GatherND": "read by GatherND (a lookup table), not multiplied by an input activation; not scored",
    "LSTM": "recurrent-layer weight (LSTM): not scored by this version",
    "GRU": "recurrent-layer weight (GRU): not scored by this version",
    "RNN": "recurrent-layer weight (RNN): not scored by this version",
    "Einsum": "read by Einsum, which is not scored (only MatMul, Gemm and Conv are)",
}
_NOT_COMPUTE = ("Shape", "Size", "Constant") + PASS_THROUGH


def _dequantizes(model: OnnxModel, scope: Scope, node: onnx.NodeProto) -> bool:
    """True for the Mul (and the zero-point Sub before it) of a ``Mul(Cast(q), scale)`` weight."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Mul":
        return cast_scale_view(model, scope, node) is not None
    if node.op_type == "Sub" and len(node.input) == 2:
        q = _resolve_weight(model, node.input[0], scope)
        zp = _resolve_weight(model, node.input[1], scope)
        return (q is not None and zp is not None and any(st["op"] == "Cast" for st in q[1])
                and np.dtype(model.tensor_dtype(q[0])).kind in "iu")
    return False


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _name_unscored(model: OnnxModel, scopes: list[Scope], scored: set[str], skipped: list[Skipped]) -> None:
    """Name every weight-like constant (``is_weight_like``) that feeds a compute op without being a scored
    weight, so that nothing selectable-looking is left out silently: once, at its first reader (a node already
    listed as skipped names each of its constants).

    A node already listed without a weight (a QLinearConv, a refused LSTM) gets its first such constant filled
    into that record, and any further one as a record with the same reason; other nodes get a record whose
    reason names the op. Constants no compute op reads are named by graph/inventory.py.
    """
    by_node: dict[str, list[int]] = {}
    for i, s in enumerate(skipped):
        by_node.setdefault(s.node, []).append(i)
    named = {s.weight for s in skipped if s.weight}      # a table read by several nodes is named once
    for scope, node, local in iter_nodes(scopes):
        if node.op_type in _NOT_COMPUTE and node.domain in ("", "ai.onnx"):
            continue
        if _dequantizes(model, scope, node):      # part of a quantized weight; its reader names the weight
            continue
        name = scope.qualify(local)
        seen: set[str] = set()
        for inp in node.input:
            if not inp:
                continue
            resolved = _resolve_weight(model, inp, scope)
            if resolved is None:
                continue
            key, chain = resolved
            if key in scored or key in seen:
                continue
            seen.add(key)
            shape = model.tensor_shape(key)
            dequantized = any(st["op"] == "DequantizeLinear" for st in chain)
            if not (is_weight_like(shape, model.tensor_dtype(key)) or (dequantized and len(shape) >= 2)):
                continue
            own = by_node.get(name, [])
            if any(skipped[i].weight == key for i in own):
                continue
            op = _op_name(node)
            blank = next((i for i in own if not skipped[i].weight), None)
            if blank is not None:          # the node's own entry says why; it now names the weight too
                rec = skipped[blank]
                skipped[blank] = skipped_weight(model, key, rec.node, rec.op, rec.reason)
                named.add(key)
                continue
            if key in named and not own:
                continue
            named.add(key)
            reason = skipped[own[0]].reason if own else _UNSCORED_REASONS.get(
                op, f"a constant input of {op}, which is not scored (only MatMul, Gemm and Conv weights are)")
            skipped.append(skipped_weight(model, key, name, op, reason))
            by_node.setdefault(name, []).append(len(skipped) - 1)


def _make_layer(node: onnx.NodeProto, name: str, act: str, stored: str, chain: list[dict[str, Any]],
                stored_shape: tuple[int, ...], op_shape: tuple[int, ...], skipped: list[Skipped],
                op: str | None = None) -> Layer | None:
    """Build a Layer for a node whose weight resolved, or record why it cannot be scored (``op``: the float op
    the node computes, when it is another one: MatMul for MatMulInteger, Conv for ConvInteger)."""
    op = op or node.op_type
    base = dict(node=name, op=op, activation=act, weight=stored, chain=chain, stored_shape=tuple(stored_shape),
                op_shape=tuple(op_shape))
    if op == "MatMul":
        if len(op_shape) != 2:
            skipped.append(Skipped(name, op, f"weight has {len(op_shape)} dimensions; only 2-D MatMul weights are scored"))
            return None
        return Layer(feature_axis=-1, **base)
    if op == "Gemm":
        if len(op_shape) != 2:
            skipped.append(Skipped(name, op, "Gemm weight is not 2-D"))
            return None
        trans_a = bool(_attr(node, "transA", 0))
        return Layer(feature_axis=0 if trans_a else 1, trans_b=bool(_attr(node, "transB", 0)), **base)
    # Conv, ConvTranspose
    if len(op_shape) < 3:
        skipped.append(Skipped(name, op, f"{op} weight has fewer than 3 dimensions"))
        return None
    nsp = len(op_shape) - 2
    kernel = list(op_shape[2:])
    conv = {
        "group": int(_attr(node, "group", 1)),
        "strides": list(_attr(node, "strides", None) or [1] * nsp),
        "dilations": list(_attr(node, "dilations", None) or [1] * nsp),
        "pads": list(_attr(node, "pads", None) or [0] * (2 * nsp)),
        "auto_pad": (_attr(node, "auto_pad", b"NOTSET") or b"NOTSET"),
        "kernel": kernel,
    }
    if isinstance(conv["auto_pad"], bytes):
        conv["auto_pad"] = conv["auto_pad"].decode()
    declared = _attr(node, "kernel_shape", None)
    if declared is not None and list(declared) != kernel:
        skipped.append(Skipped(name, op, f"kernel_shape {list(declared)} differs from the weight's {kernel}"))
        return None
    if op == "ConvTranspose":
        conv["output_padding"] = list(_attr(node, "output_padding", None) or [0] * nsp)
        conv["output_shape"] = list(_attr(node, "output_shape", None) or [])
        if op_shape[0] % conv["group"]:
            skipped.append(Skipped(name, op, "input channels not divisible by group"))
            return None
        return ConvTransposeLayer(feature_axis=1, conv=conv, **base)
    if op_shape[0] % conv["group"]:
        skipped.append(Skipped(name, op, "output channels not divisible by group"))
        return None
    return Layer(feature_axis=1, conv=conv, **base)
