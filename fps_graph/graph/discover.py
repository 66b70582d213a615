"""Finding the scored layers of a model: every MatMul, Gemm, Conv and ConvTranspose with a constant weight, the
recurrent layers (graph/recurrent.py) and the quantized ones (graph/quantized.py), and every constant that looks like a
weight but is not scored, with the reason.

The dispatch sits above the per-kind modules, which build on the primitives of graph/layers.py, so none of them
imports another to find its layers.
"""
from __future__ import annotations

from fps_graph.graph.layers import (QUANTIZED_OPS, SCORED_OPS, Layer, Skipped, _body_refusal, _layer_of,
                                    _name_unscored, _scope_of)
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.quantized import dispatch_quantized
from fps_graph.graph.recurrent import dispatch_recurrent, scored_sources
from fps_graph.graph.walk import iter_nodes, model_scopes

__all__ = ["find_layers"]


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
    scored = {layer.weight for layer in layers} | scored_sources(model, layers)
    for key in list(scored):                 # the stored constants behind derived and dequantized views
        key = model.derived[key].source if key in model.derived else key
        if key in model.quantized:
            scored |= set(model.quantized[key].stored())
    _name_unscored(model, scopes, scored, skipped)
    return layers, skipped
