"""Quantized layers as scored layers: the float activation entering them is observed, the weight is dequantized.

ONNX Runtime's quantizers leave the float input of a quantized layer in the graph (dynamic quantization rounds it
to 8 bits at run time, weight-only quantization multiplies it as it is), so FPS's statistic E|x| is observed on
that float tensor, as for a float layer, and |W| is taken from the dequantized weight (graph/dequant.py). The
weight becomes a float view registered in the model under its float name (``W1`` for ``W1_quantized``,
``...MatMul.weight`` for ``...MatMul.weight_Q4``), so masks are keyed and laid out like the float weight:

| op | activation observed | float view of the weight |
| --- | --- | --- |
| ``MatMulInteger`` | the input of the ``DynamicQuantizeLinear`` feeding A | ``(B - b_zero_point) * b_scale`` ``[K, N]``; b_scale from the ``Cast -> Mul(a_scale * b_scale)`` after the node |
| ``ConvInteger`` | the same, for x | ``(w - w_zero_point) * w_scale`` ``[M, C/group, *kernel]`` |
| com.microsoft ``DynamicQuantizeMatMul`` | A | ``(B - b_zero_point) * b_scale`` |
| com.microsoft ``MatMulIntegerToFloat`` | the input of the ``DynamicQuantizeLinear`` feeding A | ``(B - b_zero_point) * b_scale`` |
| com.microsoft ``MatMulNBits`` | A | the int4 (2/8-bit) blocks dequantized, ``[K, N]`` as an ONNX MatMul holds it |
| com.microsoft ``DynamicQuantizeLSTM`` | X, and h_(t-1) from Y (graph/recurrent.py) | ``W``/``R`` ``[dirs, in, 4H]`` dequantized and transposed to the ONNX LSTM layout |

``Mul(Cast(int8), scale)`` chains (with an optional ``Sub`` of a zero point) feeding an ordinary MatMul/Gemm/Conv
are followed in ``layers._resolve_weight`` (see :func:`cast_scale_view`). A quantized weight is scored, never
written: ``apply`` refuses it (graph/apply.py says what to do instead).
"""
from __future__ import annotations

import numpy as np
import onnx

from fps_graph.graph.dequant import QuantizedTensor, register_view
from fps_graph.graph.layers import (_FLOAT, QUANTIZED_OPS, Layer, Skipped, _attr, _make_layer, _plain_const,
                                    _scope_of, cast_scale_view, skipped_weight)
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.recurrent import dispatch_recurrent
from fps_graph.graph.walk import Scope



def is_quantized_op(node: onnx.NodeProto) -> bool:
    """True for the ops this module scores."""
    return node.domain in QUANTIZED_OPS.get(node.op_type, ())


def _consumers(scope: Scope) -> dict[str, list[onnx.NodeProto]]:
    cached = scope.__dict__.get("_fpsg_consumers")
    if cached is None:
        cached = {}
        for node in scope.graph.node:
            for i in node.input:
                if i:
                    cached.setdefault(i, []).append(node)
        scope.__dict__["_fpsg_consumers"] = cached
    return cached


def _float_input(scope: Scope, name: str) -> tuple[str, onnx.NodeProto] | None:
    """The float tensor a DynamicQuantizeLinear turned into this uint8 input, and that node."""
    node = scope.producer(name)
    if node is None or node.op_type != "DynamicQuantizeLinear" or not node.output or node.output[0] != name:
        return None
    return node.input[0], node


def _output_scale(model: OnnxModel, scope: Scope, node: onnx.NodeProto, dql: onnx.NodeProto) -> str | None:
    """The weight scale of a MatMulInteger/ConvInteger: its int32 output -> Cast(float) -> Mul(., a_scale * w_scale)
    as ONNX Runtime's dynamic quantizer writes it; the constant factor of that product."""
    uses = _consumers(scope).get(node.output[0], [])
    if len(uses) == 1 and uses[0].op_type == "Add":        # the int32 bias, quantized with a_scale * w_scale
        uses = _consumers(scope).get(uses[0].output[0], [])
    if len(uses) != 1 or uses[0].op_type != "Cast" or _attr(uses[0], "to") not in _FLOAT:
        return None
    muls = _consumers(scope).get(uses[0].output[0], [])
    if len(muls) != 1 or muls[0].op_type != "Mul":
        return None
    other = [i for i in muls[0].input if i != uses[0].output[0]]
    if len(other) != 1:
        return None
    prod = scope.producer(other[0])
    if prod is None or prod.op_type != "Mul" or len(dql.output) < 2 or dql.output[1] not in prod.input:
        return None
    rest = [i for i in prod.input if i != dql.output[1]]
    return _plain_const(model, scope, rest[0]) if len(rest) == 1 else None


def _linear_view(model: OnnxModel, source: str, scale: str, zero_point: str | None, channels: list[tuple[int, ...]],
                 how: str, perm: tuple[int, ...] | None = None) -> tuple[str | None, str]:
    """Register ``(source - zero_point) * scale``: parameters of one value, or per channel with one of the
    ``channels`` broadcast shapes (the first whose size fits); (key, why not)."""
    shape = tuple(int(d) for d in model.tensor_shape(source))
    if np.dtype(model.tensor_dtype(source)).kind not in "iu":
        return None, f"weight {source} is not stored as integers"
    sizes = {int(np.prod(model.tensor_shape(k))) for k in (scale, zero_point) if k} - {1}
    bshape = None
    if len(sizes) > 1:
        return None, f"scale and zero point of {source} have different sizes"
    if sizes:
        per = sizes.pop()
        bshape = next((b for b in channels if int(np.prod(b)) == per), None)
        if bshape is None:
            return None, f"scale of {source} has {per} values, which fit no channel axis of {list(shape)}"
    view_shape = tuple(shape[p] for p in perm) if perm else shape
    q = QuantizedTensor(source=source, format="linear", shape=view_shape, scale=scale, zero_point=zero_point or "",
                        how=how, bshape=bshape, perm=perm)
    return register_view(model, q), ""


def _per_column(model: OnnxModel, w: str) -> list[tuple[int, ...]]:
    k, n = model.tensor_shape(w)
    return [(1, int(n))]


def _matmul_layer(model: OnnxModel, node: onnx.NodeProto, name: str, act: str, key: str,
                  skipped: list[Skipped], op: str = "MatMul") -> Layer | None:
    shape = tuple(model.tensor_shape(key))
    layer = _make_layer(node, name, act, key, [], shape, shape, skipped, op=op)
    if layer is not None:
        layer.node_op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        layer.scope = _scope_of(node)
    return layer


def dispatch_quantized(model: OnnxModel, scope: Scope, node: onnx.NodeProto, name: str
                       ) -> tuple[list[Layer], list[Skipped]]:
    """Scored layers of one quantized node (see the module table), or why it is skipped."""
    op = node.op_type
    label = op if node.domain in ("", "ai.onnx") else f"{node.domain}.{op}"
    ins = list(node.input) + [""] * 12
    skipped: list[Skipped] = []

    def refuse(reason: str, weight: str | None = None) -> tuple[list[Layer], list[Skipped]]:
        key = _plain_const(model, scope, weight) if weight else None
        rec = skipped_weight(model, key, name, label, reason) if key else Skipped(name, label, reason)
        return [], [rec]

    if op == "DynamicQuantizeLSTM":
        return _dynamic_lstm(model, scope, node, name)
    if op == "MatMulNBits":
        b, scales, zps, g_idx = (_plain_const(model, scope, ins[i]) for i in (1, 2, 3, 4))
        if b is None or scales is None or (ins[3] and zps is None):
            return refuse("weight, scales or zero points are computed at run time, not constants", ins[1])
        if ins[4] and g_idx is not None:
            k = int(_attr(node, "K"))
            bs = int(_attr(node, "block_size"))
            if not np.array_equal(model.tensor(g_idx).reshape(-1), np.arange(k) // bs):
                return refuse("g_idx reorders the blocks (act-order); not read by this version", ins[1])
        k, n = int(_attr(node, "K")), int(_attr(node, "N"))
        bits, bs = int(_attr(node, "bits", 4)), int(_attr(node, "block_size"))
        if 8 % bits:
            return refuse(f"{bits}-bit blocks are not read by this version (2, 4 and 8 bits are)", ins[1])
        q = QuantizedTensor(source=b, format="nbits", shape=(k, n), scale=scales, zero_point=zps or "",
                            how="MatMulNBits", bits=bits, block_size=bs, k=k, n=n)
        layer = _matmul_layer(model, node, name, ins[0], register_view(model, q), skipped)
        return ([layer] if layer else []), skipped
    if op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        act, b = ins[0], _plain_const(model, scope, ins[1])
        scale_in, zp_in = (ins[2], ins[3]) if op == "DynamicQuantizeMatMul" else (ins[3], ins[5])
        if op == "MatMulIntegerToFloat":
            found = _float_input(scope, act)
            if found is None:
                return refuse("input A does not come from a DynamicQuantizeLinear, so its float values are not "
                              "in the graph", ins[1])
            act = found[0]
        scale, zp = _plain_const(model, scope, scale_in), _plain_const(model, scope, zp_in)
        if b is None or scale is None or (zp_in and zp is None):
            return refuse("weight, scale or zero point is computed at run time, not a constant", ins[1])
        if len(model.tensor_shape(b)) != 2:
            return refuse(f"weight has {len(model.tensor_shape(b))} dimensions; only 2-D weights are scored", ins[1])
        key, why = _linear_view(model, b, scale, zp, _per_column(model, b), op)
        if key is None:
            return refuse(why, ins[1])
        layer = _matmul_layer(model, node, name, act, key, skipped)
        return ([layer] if layer else []), skipped
    # MatMulInteger, ConvInteger (default domain)
    found = _float_input(scope, ins[0])
    if found is None:
        return refuse("input is not quantized by a DynamicQuantizeLinear (static quantization), so the float "
                      "activation entering the layer is not in the graph", ins[1])
    act, dql = found
    w, zp = _plain_const(model, scope, ins[1]), _plain_const(model, scope, ins[3])
    if w is None or (ins[3] and zp is None):
        return refuse("weight or its zero point is computed at run time, not a constant", ins[1])
    scale = _output_scale(model, scope, node, dql)
    if scale is None:
        return refuse("the weight scale was not found (expected the output -> Cast -> Mul(a_scale * w_scale) that "
                      "ONNX Runtime's dynamic quantizer writes)", ins[1])
    if op == "MatMulInteger":
        if len(model.tensor_shape(w)) != 2:
            return refuse(f"weight has {len(model.tensor_shape(w))} dimensions; only 2-D weights are scored", ins[1])
        key, why = _linear_view(model, w, scale, zp, _per_column(model, w), op)
        if key is None:
            return refuse(why, ins[1])
        layer = _matmul_layer(model, node, name, act, key, skipped)
        return ([layer] if layer else []), skipped
    shape = model.tensor_shape(w)
    key, why = _linear_view(model, w, scale, zp, [(int(shape[0]),) + (1,) * (len(shape) - 1)], op)
    if key is None:
        return refuse(why, ins[1])
    layer = _matmul_layer(model, node, name, act, key, skipped, op="Conv")
    return ([layer] if layer else []), skipped


def _dynamic_lstm(model: OnnxModel, scope: Scope, node: onnx.NodeProto, name: str
                  ) -> tuple[list[Layer], list[Skipped]]:
    """DynamicQuantizeLSTM as the ONNX LSTM it computes: W/R ``[dirs, in, 4H]`` int8 dequantized and transposed
    to ``[dirs, 4H, in]``, then scored by graph/recurrent.py like an LSTM node (same outputs, same observers)."""
    ins = list(node.input) + [""] * 12
    label = f"{node.domain}.{node.op_type}"
    views = []
    for w_in, s_in, z_in in ((ins[1], ins[8], ins[9]), (ins[2], ins[10], ins[11])):
        w, s, z = (_plain_const(model, scope, i) for i in (w_in, s_in, z_in))
        if w is None or s is None or (z_in and z is None) or len(model.tensor_shape(w)) != 3:
            return [], [Skipped(name, label, "W/R, their scales or zero points are not constants of shape "
                                             "[dirs, in, 4H]")]
        dirs, _, gates = model.tensor_shape(w)
        key, why = _linear_view(model, w, s, z, [(dirs, 1, gates), (dirs, 1, 1)], "DynamicQuantizeLSTM",
                                perm=(0, 2, 1))
        if key is None:
            return [], [skipped_weight(model, w, name, label, why)]
        local = f"\x00fpsg_dequantized:{key}"        # a name no graph uses: it resolves only for this dispatch
        scope.consts[local] = key
        views.append(local)
    lstm = onnx.NodeProto()
    lstm.CopyFrom(node)
    lstm.op_type, lstm.domain = "LSTM", ""
    del lstm.input[:]
    lstm.input.extend([ins[0], views[0], views[1], *ins[3:8]])
    while lstm.input and not lstm.input[-1]:
        del lstm.input[-1]
    layers, skipped = dispatch_recurrent(model, scope, lstm, name)
    for layer in layers:
        layer.node_op = label
    return layers, [Skipped(s.node, label, s.reason, s.weight, s.shape, s.dtype, s.values) for s in skipped]


__all__ = ["QUANTIZED_OPS", "is_quantized_op", "dispatch_quantized", "cast_scale_view"]
