"""The weight inventory: every weight-like constant of a model, scored or named as skipped, and the share scored.

A weight-like constant (``layers.is_weight_like``: >= 2 dimensions, float of any width or quantized integers) is
an initializer or a Constant node output of any graph, If/Loop/Scan bodies included. Each one is either behind a
scored layer (stored directly, behind a recurrent derived tensor, or behind a dequantized view, graph/quantized.py)
or named by a :class:`~fps_graph.graph.layers.Skipped` record with its key, shape, dtype and reason. Layer discovery
names those read by compute ops (``layers._name_unscored``); :func:`name_the_rest` names the rest (constants only
Shape-like ops or graph outputs read), so that nothing goes unnamed.

Quantization parameters (scales, zero points) are part of the weight they dequantize, not weights of their own.
Value counts are weight values, not bytes: a packed int4 tensor holds two per byte.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fps_graph.graph.layers import Layer, Skipped, is_weight_like, skipped_weight
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.walk import iter_nodes, model_scopes

# inputs (by position) that hold quantization parameters, per op type (any domain)
PARAM_INPUTS = {
    "DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2), "DynamicQuantizeLinear": (),
    "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
    "MatMulNBits": (2, 3, 4), "MatMulIntegerToFloat": (2, 3, 4, 5), "DynamicQuantizeMatMul": (2, 3),
    "DynamicQuantizeLSTM": (8, 9, 10, 11),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7), "QLinearConv": (1, 2, 4, 5, 6, 7), "GatherBlockQuantized": (2, 3),
}
SHARE_WARNING = 0.5      # select warns when less than this share of the model's weight values is scored


@dataclass(frozen=True)
class Inventory:
    """How many of the model's weight values are scored, and which kinds of weight are not."""

    total_values: int
    scored_values: int
    unscored_by_kind: dict[str, int] = field(default_factory=dict)   # reading op -> weight values not scored

    @property
    def share(self) -> float:
        """Scored weight values / all weight values (1.0 for a model with no weights)."""
        return self.scored_values / self.total_values if self.total_values else 1.0

    def largest_unscored(self, n: int = 3) -> list[tuple[str, int]]:
        """The n kinds with the most unscored values, largest first (ties by name)."""
        return sorted(self.unscored_by_kind.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def warning(self) -> str | None:
        """One line when less than half of the weight values are scored, naming the largest unscored kinds."""
        if self.total_values == 0 or self.share >= SHARE_WARNING:
            return None
        kinds = ", ".join(f"{k} {100 * v / self.total_values:.1f}%" for k, v in self.largest_unscored())
        return (f"only {100 * self.share:.1f}% of the model's {self.total_values:,} weight values are scored; "
                f"the largest unscored kinds: {kinds} (inspect lists each weight and why)")

    def to_json(self) -> dict[str, Any]:
        """Record for inspect --json, the masks header and benchmarks."""
        return {"total_values": int(self.total_values), "scored_values": int(self.scored_values),
                "share": round(self.share, 6),
                "unscored_by_kind": {k: int(v) for k, v in self.largest_unscored(len(self.unscored_by_kind))}}


def _params(model: OnnxModel) -> set[str]:
    """Keys of constants that are quantization parameters (scales, zero points) of some node."""
    out: set[str] = set()
    for scope, node, _ in iter_nodes(model_scopes(model)):
        for pos in PARAM_INPUTS.get(node.op_type, ()):
            if pos < len(node.input) and node.input[pos]:
                key = scope.const_key(node.input[pos])
                if key is not None:
                    out.add(key)
    return out


def weight_constants(model: OnnxModel) -> list[str]:
    """Model-wide keys of every weight-like stored constant (not quantization parameters), in storage order."""
    model_scopes(model)                       # registers the constants stored in bodies
    params = _params(model) | {k for q in model.quantized.values() for k in (q.scale, q.zero_point) if k}
    keys = [k for k in [*model.initializers, *model.constant_nodes] if k not in params]
    return [k for k in keys if is_weight_like(model.tensor_shape(k), model.tensor_dtype(k))]


def storage_of(model: OnnxModel, layer: Layer) -> set[str]:
    """The stored constants behind a scored layer's weight: itself, a derived tensor's source, a dequantized
    view's source and parameters, and the scale/zero point of a DequantizeLinear on its way."""
    keys: set[str] = set()
    w = layer.weight
    if w in model.derived:
        w = model.derived[w].source
    if w in model.quantized:
        keys |= set(model.quantized[w].stored())
    else:
        keys.add(w)
    for step in layer.chain:
        keys |= {step[k] for k in ("scale", "zero_point") if step.get(k)}
    return keys


def values_of(model: OnnxModel, key: str) -> int:
    """Weight values a stored constant holds (a packed int4 tensor behind a dequantized view: the view's size)."""
    for q in model.quantized.values():
        if q.source == key:
            return int(np.prod(q.shape))
    return int(np.prod(model.tensor_shape(key)))


def name_the_rest(model: OnnxModel, layers: list[Layer], skipped: list[Skipped]) -> list[Skipped]:
    """A record for every weight-like constant that is neither scored nor named yet (read only by Shape-like
    ops, a graph output, or nothing)."""
    scored = set().union(*(storage_of(model, layer) for layer in layers)) if layers else set()
    named = set(_named_kinds(model, skipped))
    readers: dict[str, tuple[str, str]] = {}
    for scope, node, local in iter_nodes(model_scopes(model)):
        for inp in node.input:
            key = scope.const_key(inp) if inp else None
            if key is not None and key not in readers:
                op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                readers[key] = (scope.qualify(local), op)
    out = []
    for key in weight_constants(model):
        if key in scored or key in named:
            continue
        node, op = readers.get(key, ("", ""))
        why = (f"no scored op reads it (its first reader is {op}); not scored" if op
               else "read by no node (a graph output or unused); not scored")
        out.append(skipped_weight(model, key, node, op or "none", why, values=values_of(model, key)))
    return out


def _named_kinds(model: OnnxModel, skipped: list[Skipped]) -> dict[str, str]:
    """Stored key -> the op of its first record; a record of a dequantized view names the constants behind it."""
    kind: dict[str, str] = {}
    for s in skipped:
        if not s.weight:
            continue
        keys = model.quantized[s.weight].stored() if s.weight in model.quantized else (s.weight,)
        for key in keys:
            kind.setdefault(key, s.op)
    return kind


def inventory(model: OnnxModel, layers: list[Layer], skipped: list[Skipped]) -> Inventory:
    """The scored share of the model's weight values, and the unscored values per kind (the reading op)."""
    keys = weight_constants(model)
    scored = set().union(*(storage_of(model, layer) for layer in layers)) if layers else set()
    kind = _named_kinds(model, skipped)
    total = scored_values = 0
    unscored: dict[str, int] = {}
    for key in keys:
        n = values_of(model, key)
        total += n
        if key in scored:
            scored_values += n
        else:
            k = kind.get(key, "other")
            unscored[k] = unscored.get(k, 0) + n
    return Inventory(total, scored_values, unscored)


__all__ = ["Inventory", "inventory", "name_the_rest", "storage_of", "weight_constants", "values_of",
           "PARAM_INPUTS", "SHARE_WARNING"]


def primary_storage(model: OnnxModel, layer: Layer) -> str:
    """The stored constant that holds a layer's weight values (a derived or dequantized view's source)."""
    w = layer.weight
    if w in model.derived:
        w = model.derived[w].source
    q = model.quantized.get(w)
    return q.source if q is not None else w


def layer_record(model: OnnxModel, layer: Layer, reason: str) -> Skipped:
    """A weight record for a layer taken out of the selection (``--include``/``--exclude``, an If branch the data
    never took): its stored weight, named with shape and dtype."""
    key = primary_storage(model, layer)
    return skipped_weight(model, key, layer.node, layer.op, reason, values=values_of(model, key))


__all__ += ["primary_storage", "layer_record"]
