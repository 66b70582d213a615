"""Loading ONNX models safely, and reading their constant tensors (initializers, Constant nodes) as NumPy."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fps_graph.errors import ModelError

# onnx's C++ exceptions derive from Exception directly: shape inference and the checker raise these
ONNX_ERRORS: tuple[type[Exception], ...] = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError)
# what onnx.shape_inference.infer_shapes raises on a model it cannot follow (best-effort callers fall back)
SHAPE_ERRORS: tuple[type[Exception], ...] = (*ONNX_ERRORS, RuntimeError, ValueError, TypeError)
from fps_graph.formats.io import sha256_file
from fps_graph.graph.versions import fit_runtime


@dataclass(frozen=True)
class DerivedTensor:
    """A constant that is a gather of a stored one: ``stored.reshape(-1)[index]`` (graph/recurrent.py registers
    one per recurrent weight and direction, its gate blocks in PyTorch's order). ``apply`` writes it back there."""

    source: str               # the stored constant (initializer or Constant node, model-wide key)
    index: np.ndarray         # flat positions in the source, shaped like the derived tensor
    layout: dict              # how it was derived; recorded in masks files
    how: str = ""             # where its name came from (names.py ``how``)


@dataclass
class OnnxModel:
    """An ONNX model whose external weights stay on disk until a tensor is asked for."""

    path: Path
    proto: onnx.ModelProto
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constant_nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    derived: dict[str, DerivedTensor] = field(default_factory=dict)
    # float views of quantized stored weights (graph/dequant.QuantizedTensor), read dequantized
    quantized: dict[str, Any] = field(default_factory=dict)
    _sha256: str | None = None
    version_notes: list[str] = field(default_factory=list)   # IR version / opset lowered in memory (graph/versions)
    runtime_problem: str | None = None                         # why ONNX Runtime cannot load it, if it cannot

    @property
    def graph(self) -> onnx.GraphProto:
        """The main graph."""
        return self.proto.graph

    @property
    def base_dir(self) -> Path:
        """Folder that external data locations are relative to."""
        return self.path.parent

    @property
    def sha256(self) -> str:
        """sha256 of the model file (external data files are not included)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    @property
    def opset(self) -> int:
        """Opset version of the default ONNX domain."""
        for imp in self.proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 1

    def has_external_data(self) -> bool:
        """True when any initializer keeps its bytes in an external file."""
        return any(_is_external(t) for t in self.initializers.values())

    def is_constant(self, name: str) -> bool:
        """True for a tensor that is an initializer (not overridable by an input) or a Constant node output."""
        return (name in self.initializers or name in self.constant_nodes or name in self.derived
                or name in self.quantized)

    def tensor(self, name: str) -> np.ndarray:
        """The value of a constant tensor as a NumPy array (reads external data on demand)."""
        if name in self.initializers:
            try:
                mapped = _mapped(self.initializers[name], self.base_dir)
                if mapped is not None:
                    return mapped
                return numpy_helper.to_array(self.initializers[name], base_dir=str(self.base_dir))
            except (OSError, ValueError) as exc:
                raise ModelError(f"{self.path}: cannot read initializer {name!r}: {exc}") from exc
        if name in self.constant_nodes:
            return _constant_value(self.constant_nodes[name])
        if name in self.derived:
            d = self.derived[name]
            return self.tensor(d.source).reshape(-1)[d.index]
        if name in self.quantized:
            try:
                return self.quantized[name].dequantize(self.tensor)
            except ValueError as exc:
                raise ModelError(f"{self.path}: cannot dequantize {self.quantized[name].source!r}: {exc}") from exc
        raise ModelError(f"{self.path}: {name!r} is not a constant tensor")

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a constant tensor without reading its data."""
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        if name in self.derived:
            return tuple(self.derived[name].index.shape)
        if name in self.quantized:
            return tuple(self.quantized[name].shape)
        return tuple(self.tensor(name).shape)

    def tensor_dtype(self, name: str) -> np.dtype:
        """NumPy dtype of a constant tensor without reading its data where possible."""
        if name in self.initializers:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.initializers[name].data_type))
        if name in self.derived:
            return self.tensor_dtype(self.derived[name].source)
        if name in self.quantized:
            return np.dtype(np.float32)
        return self.tensor(name).dtype


def _is_external(t: onnx.TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


# element types whose external bytes are plain little-endian NumPy values (no packing, no string)
_MAPPABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
             onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
             onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64}


def _mapped(t: onnx.TensorProto, base_dir: Path) -> np.ndarray | None:
    """An external tensor as a read-only memory map of its file (no copy: the pages come from the page cache, where
    ONNX Runtime's own read of the file left them), or None where the bytes need decoding (then read normally).

    Scoring a 1.1B decoder read its 4.1 GB of weights again through onnx's loader, which copies them into the proto
    and again into an array (issue 19); a map touches only the rows being scored, and a block's pages are dropped
    when the map goes.
    """
    if not _is_external(t) or t.data_type not in _MAPPABLE or np.little_endian is False:
        return None
    info = {e.key: e.value for e in t.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in t.dims)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = int(info.get("offset", 0) or 0)
    if "length" in info and int(info["length"]) != nbytes:
        return None
    path = base_dir / info["location"]
    if nbytes == 0 or offset + nbytes > path.stat().st_size:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    """Value of a Constant node, whichever attribute holds it."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    raise ModelError(f"Constant node {node.name!r} has no value this tool can read")


def _check_external_locations(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that points outside the model's folder or is missing."""
    base = path.parent.resolve()
    for t in model.graph.initializer:
        if not _is_external(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or (base != target and base not in target.parents):
            raise ModelError(
                f"{path}: external data of initializer {t.name!r} points outside the model's folder: {loc!r}"
            )
        if not target.is_file():
            raise ModelError(f"{path}: external data file of initializer {t.name!r} is missing: {loc}")


def load_model(path: str | os.PathLike) -> OnnxModel:
    """Load an ONNX model file, keeping external data on disk; raise ModelError for anything unreadable."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelError(f"model path is a folder, not an ONNX file: {p}")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelError(f"cannot read model file {p}: {exc.strerror or exc}") from exc
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{p} is not a valid ONNX model (cannot parse; truncated or not ONNX?)") from exc
    del data
    if proto.ir_version <= 0 or not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelError(f"{p} is not a valid ONNX model (no graph or no nodes)")
    _check_external_locations(proto, p)
    model = OnnxModel(path=p, proto=proto)
    # a newer onnx stamps a newer IR version / opset than ONNX Runtime reads: lower them when that keeps the meaning
    model.version_notes, model.runtime_problem = fit_runtime(proto)
    graph_inputs = {i.name for i in proto.graph.input}
    for t in proto.graph.initializer:
        # An initializer that is also a graph input can be overridden at run time, but in practice (IR < 4
        # exporters) it is a weight; treat it as constant.
        model.initializers[t.name] = t
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            model.constant_nodes[node.output[0]] = node
    del graph_inputs
    return model


def data_inputs(model: OnnxModel) -> list[onnx.ValueInfoProto]:
    """Graph inputs that must be fed (those that are not initializers)."""
    return [i for i in model.graph.input if i.name not in model.initializers]


def input_shape(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    """Declared shape of an input: ints for fixed dims, names or None for dynamic ones.

    A dimension declared as -1 or 0 (PaddlePaddle and some converters write -1 for "any") is dynamic: ONNX
    Runtime reads it that way too, and no input can have a non-positive size along a batch axis it is fed.
    """
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return ()
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:   # paddle2onnx writes -1 for a dynamic batch: not fixed
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def input_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    """NumPy dtype of an input."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
