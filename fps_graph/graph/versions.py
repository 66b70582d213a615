"""Models stamped newer than ONNX Runtime reads: lowered in memory when they use nothing newer, else said in one line.

A newer `onnx` package stamps every model it saves with its own IR version (onnx 1.23: IR 14) and, through
`helper.make_model`, its newest opset (28), whatever the model uses. ONNX Runtime refuses both by number alone
(1.31: "max supported IR version: 13", "official support ... till opset 26"). The numbers only promise features:

* IR version: each version adds data types or proto fields (IR_FEATURES below). A model that uses none of those
  added after the runtime's version means the same at that version, so its ``ir_version`` is lowered.
* Opset: a node's meaning is its operator schema at the model's opset. When every node of the default domain
  resolves to the same schema version at the runtime's opset (no operator changed in between), the import is
  lowered to that opset.

Only the in-memory model changes (the file is never written); `apply` writes a model with the lowered numbers,
which the runtime can load. What the runtime reads is probed once per process with a one-node model, so a newer
runtime needs no table update. Nothing is probed for models at or below IR 10 / opset 21 (every supported
runtime reads those), so ordinary exports never import ONNX Runtime here.
"""
from __future__ import annotations

import functools
import re
from typing import Iterator

import onnx
from onnx import TensorProto

__all__ = ["IR_FEATURES", "ort_errors", "runtime_limits", "newer_ir_features", "changed_ops", "fit_runtime"]

PROBE_IR, PROBE_OPSET = 10, 21   # at or below these, nothing is probed or lowered


@functools.lru_cache(maxsize=None)
def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (pybind11 classes that derive from Exception directly: Fail,
    InvalidArgument, InvalidGraph, ...) plus the builtin ones its Python layer raises; ``except ort_errors()``
    catches what ORT raises and nothing else."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (*own, RuntimeError, ValueError, TypeError)

# The data types each IR version added (onnx.proto's Version comments).
_TYPE_IR = {TensorProto.FLOAT8E4M3FN: 9, TensorProto.FLOAT8E4M3FNUZ: 9, TensorProto.FLOAT8E5M2: 9,
            TensorProto.FLOAT8E5M2FNUZ: 9, TensorProto.UINT4: 10, TensorProto.INT4: 10}
for _name, _ir in (("FLOAT4E2M1", 11), ("FLOAT8E8M0", 12), ("UINT2", 13), ("INT2", 13), ("FLOAT6E2M3", 14),
                   ("FLOAT6E3M2", 14)):
    if hasattr(TensorProto, _name):
        _TYPE_IR[getattr(TensorProto, _name)] = _ir
IR_FEATURES = {9: "float8 types", 10: "int4/uint4 types, function overloads", 11: "float4e2m1, multi-device configs",
               12: "float8e8m0", 13: "int2/uint2 types", 14: "float6 types, opaque types outside ONNX-ML"}
_TYPE_ATTRS = ("to", "dtype", "output_dtype")   # int attributes that name a data type (Cast, RandomNormal, ...)


@functools.lru_cache(maxsize=1)
def runtime_limits() -> tuple[int, int] | None:
    """(highest IR version, highest default-domain opset) the installed ONNX Runtime loads, or None if unknown."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    ir, opset = onnx.IR_VERSION, onnx.defs.onnx_opset_version()
    for _ in range(4):
        g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                                   [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
        m.ir_version = ir
        so = ort.SessionOptions()
        so.log_severity_level = 4
        try:
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return ir, opset
        except ort_errors() as exc:
            text = str(exc)
        found_ir = re.search(r"max supported IR version: (\d+)", text)
        found_opset = re.search(r"is till opset (\d+)", text)
        if found_ir and int(found_ir.group(1)) < ir:
            ir = int(found_ir.group(1))
        elif found_opset and int(found_opset.group(1)) < opset:
            opset = int(found_opset.group(1))
        else:
            return None
    return None


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph and every subgraph in its nodes' attributes, recursively."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _type_uses(tp: onnx.TypeProto) -> Iterator[tuple[int | str, str]]:
    """(data type or 'opaque', where) for a value type, through sequences, maps and optionals."""
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(tp, kind).elem_type, kind
    elif kind in ("sequence_type", "optional_type"):
        yield from _type_uses(getattr(tp, kind).elem_type)
    elif kind == "map_type":
        yield tp.map_type.key_type, "map key"
        yield from _type_uses(tp.map_type.value_type)
    elif kind == "opaque_type":
        yield "opaque", "opaque type"


def newer_ir_features(model: onnx.ModelProto, ir: int) -> list[str]:
    """What the model uses that came after IR version `ir` (data types, overloads, device configs), in words."""
    found: list[str] = []

    def dtype(t: int, where: str) -> None:
        if _TYPE_IR.get(t, 0) > ir:
            found.append(f"{TensorProto.DataType.Name(t)} in {where}")

    nodes, values, tensors = [], [], []
    for g in _graphs(model.graph):
        nodes.extend(g.node)
        values.extend([*g.input, *g.output, *g.value_info])
        tensors.extend(g.initializer)
        tensors.extend(s.values for s in g.sparse_initializer)
    for f in model.functions:
        nodes.extend(f.node)
        values.extend(getattr(f, "value_info", ()))
        if ir < 10 and getattr(f, "overload", ""):
            found.append(f"function overload {f.name}:{f.overload}")
    for t in tensors:
        dtype(t.data_type, f"initializer {t.name!r}")
    for v in values:
        for t, _ in _type_uses(v.type):
            if t == "opaque":
                if ir < 14:
                    found.append(f"an opaque type in {v.name!r}")
            else:
                dtype(t, f"value {v.name!r}")
    for n in nodes:
        if ir < 10 and getattr(n, "overload", ""):
            found.append(f"node overload {n.name or n.op_type}")
        if ir < 11 and len(getattr(n, "device_configurations", ())):
            found.append(f"device configuration of node {n.name or n.op_type}")
        for a in n.attribute:
            if a.type == onnx.AttributeProto.INT and a.name in _TYPE_ATTRS:
                dtype(int(a.i), f"attribute {a.name} of node {n.name or n.op_type}")
            elif a.type == onnx.AttributeProto.TENSOR:
                dtype(a.t.data_type, f"node {n.name or n.op_type}")
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    dtype(t.data_type, f"node {n.name or n.op_type}")
            elif a.type == onnx.AttributeProto.TYPE_PROTO:
                for t, _ in _type_uses(a.tp):
                    if t != "opaque":
                        dtype(t, f"attribute {a.name} of node {n.name or n.op_type}")
    if ir < 11 and len(getattr(model, "configuration", ())):
        found.append("multi-device configuration")
    return found


def _default_opset(imports) -> int | None:
    return next((int(i.version) for i in imports if i.domain in ("", "ai.onnx")), None)


def changed_ops(model: onnx.ModelProto, target: int) -> list[str]:
    """Default-domain operators whose schema at the model's opset differs from the one at `target` (or that do not
    exist there): the reasons the opset cannot be lowered."""
    changed: set[str] = set()
    scopes = [(model.opset_import, [n for g in _graphs(model.graph) for n in g.node])]
    scopes += [(f.opset_import, list(f.node)) for f in model.functions]
    for imports, nodes in scopes:
        have = _default_opset(imports)
        if have is None or have <= target:
            continue
        for op in sorted({n.op_type for n in nodes if n.domain in ("", "ai.onnx")}):
            try:
                same = onnx.defs.get_schema(op, have, "").since_version == \
                    onnx.defs.get_schema(op, target, "").since_version
            except onnx.defs.SchemaError:
                same = False
            if not same:
                changed.add(op)
    return sorted(changed)


def fit_runtime(model: onnx.ModelProto) -> tuple[list[str], str | None]:
    """Lower the model's IR version and default-domain opset in place to what ONNX Runtime loads, where that keeps
    its meaning. Returns (notes on what was lowered, the reason it cannot be loaded or None)."""
    opset = _default_opset(model.opset_import) or 0
    func_opsets = [_default_opset(f.opset_import) or 0 for f in model.functions]
    if model.ir_version <= PROBE_IR and max([opset, *func_opsets]) <= PROBE_OPSET:
        return [], None
    limits = runtime_limits()
    if limits is None:
        return [], None
    max_ir, max_opset = limits
    notes: list[str] = []
    problems: list[str] = []
    if model.ir_version > max_ir:
        newer = newer_ir_features(model, max_ir)
        if newer:
            problems.append(f"it uses ONNX IR {model.ir_version} features that ONNX Runtime (IR <= {max_ir}) lacks: "
                            f"{', '.join(newer[:3])}{' ...' if len(newer) > 3 else ''}")
        else:
            notes.append(f"IR version {model.ir_version} read as {max_ir} (the model uses nothing newer)")
    if max([opset, *func_opsets]) > max_opset:
        changed = changed_ops(model, max_opset)
        if changed:
            problems.append(f"it uses opset {opset}, ONNX Runtime reads up to {max_opset}, and these operators "
                            f"changed in between: {', '.join(changed[:5])}")
        else:
            notes.append(f"opset {opset} read as {max_opset} (no operator it uses changed in between)")
    if problems:
        return [], ("ONNX Runtime cannot load this model: " + "; ".join(problems) +
                    "; upgrade onnxruntime, or export the model for an older ONNX (e.g. fps-graph export --opset "
                    f"{max_opset}, or onnx.version_converter)")
    if model.ir_version > max_ir:
        model.ir_version = max_ir
    for imports in [model.opset_import, *[f.opset_import for f in model.functions]]:
        for imp in imports:
            if imp.domain in ("", "ai.onnx") and imp.version > max_opset:
                imp.version = max_opset
    return notes, None
