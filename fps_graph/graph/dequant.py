"""Float views of quantized stored weights: the values a node computes with, in the float weight's layout.

A quantized model stores a weight as integers plus scales and zero points; what the node multiplies its input by
is ``(q - zero_point) * scale``. A :class:`QuantizedTensor` registered in an ``OnnxModel`` under a key of its own
(``model.quantized``) reads as that float tensor: ``model.tensor(key)`` dequantizes on demand, so layers, names,
scores and positions treat it like any float constant, and masks are keyed and laid out like the float weight.

Formats (``format``):

* ``linear``: one scale (and zero point) per tensor or per channel, numpy-broadcast against the stored integers,
  or reshaped to ``bshape`` first (``Mul(Cast(int8), scale)``, ``MatMulInteger``/``ConvInteger``,
  ``DynamicQuantizeMatMul``, ``DynamicQuantizeLSTM``); ``perm`` transposes the result into the float layout;
* ``nbits``: com.microsoft ``MatMulNBits``: ``B`` uint8 ``[N, blocks, blob]`` holds ``bits``-bit values, the lowest
  bits first, ``block_size`` per block along K; one scale (and zero point, default 2^(bits-1)) per (n, block); the
  float view is the ``[K, N]`` matrix an ONNX ``MatMul`` would hold (``y = a @ W``).

Only NumPy here: ``graph/model.py`` reads the views, ``graph/layers.py`` and ``graph/quantized.py`` make them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fps_graph.graph.walk import model_scopes, scope_of_key

# suffixes quantizers append to a float weight's name (onnxruntime.quantization: _quantized; MatMulNBits: _Q4...)
NAME_SUFFIXES = ("_quantized", "_Q4", "_Q8", "_Q2", "_Q3", "_Q5", "_Q6", "_Q7", "_int8", "_uint8", "_qweight")


@dataclass(frozen=True)
class QuantizedTensor:
    """A float view of a quantized stored constant (see the module docstring)."""

    source: str                     # the stored integer constant (model-wide key)
    format: str                     # "linear" or "nbits"
    shape: tuple[int, ...]          # shape of the float view
    scale: str                      # key of the scale constant
    zero_point: str = ""            # key of the zero point constant ("" = none: 0, or 2^(bits-1) for nbits)
    how: str = ""                   # the pattern it came from, in words ("MatMulInteger", "Cast x scale", ...)
    bshape: tuple[int, ...] | None = None   # linear: shape scale/zero point are reshaped to before broadcasting
    perm: tuple[int, ...] | None = None     # linear: transpose of the dequantized source into the float layout
    bits: int = 0                   # nbits
    block_size: int = 0             # nbits
    k: int = 0                      # nbits: input features (K)
    n: int = 0                      # nbits: output features (N)

    def stored(self) -> tuple[str, ...]:
        """The stored constants this view is made of."""
        return tuple(k for k in (self.source, self.scale, self.zero_point) if k)

    def dequantize(self, read: Callable[[str], np.ndarray]) -> np.ndarray:
        """The float32 values, ``read(key)`` giving stored constants."""
        if self.format == "nbits":
            return nbits_dequantize(read(self.source), read(self.scale),
                                    read(self.zero_point) if self.zero_point else None,
                                    self.bits, self.block_size, self.k, self.n).T
        q = read(self.source).astype(np.float32)
        scale = _shaped(read(self.scale).astype(np.float32), self.bshape)
        zp = _shaped(read(self.zero_point).astype(np.float32), self.bshape) if self.zero_point else np.float32(0)
        out = (q - zp) * scale
        if out.shape != q.shape:
            raise ValueError(f"scale {scale.shape} / zero point {np.shape(zp)} do not broadcast to {q.shape}")
        out = out.astype(np.float32, copy=False)
        return np.ascontiguousarray(np.transpose(out, self.perm)) if self.perm else out

    def record(self) -> dict[str, Any]:
        """How the float view is made, for the masks header (``layout.quantized``)."""
        rec: dict[str, Any] = {"source": self.source, "format": self.format, "how": self.how, "scale": self.scale,
                               "zero_point": self.zero_point}
        if self.perm:
            rec["transpose"] = list(self.perm)
        if self.format == "nbits":
            rec.update(bits=self.bits, block_size=self.block_size)
        return rec


def _shaped(param: np.ndarray, bshape: tuple[int, ...] | None) -> np.ndarray:
    if bshape is None or param.size == 1:
        return param.reshape(()) if param.size == 1 else param
    return param.reshape(bshape)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` ``bits``-bit unsigned values of each row of a uint8 array, lowest bits first."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.reshape(packed.shape[0], -1)
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (rows[:, :, None] >> shifts[None, None, :]) & np.uint8((1 << bits) - 1)
    return vals.reshape(rows.shape[0], -1)[:, :count]


def nbits_dequantize(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int,
                     k: int, n: int) -> np.ndarray:
    """MatMulNBits' weight as float32 ``[N, K]`` (row n: output feature n over the K inputs)."""
    if 8 % bits:
        raise ValueError(f"MatMulNBits with bits={bits}: only 2, 4 and 8 bits are read")
    blocks = (k + block_size - 1) // block_size
    q = unpack_bits(b.reshape(n, -1), bits, blocks * block_size).astype(np.float32)   # [N, blocks*bs]
    s = np.asarray(scales, dtype=np.float32).reshape(n, blocks)
    if zero_points is None:
        zp = np.full((n, blocks), float(1 << (bits - 1)), np.float32)
    elif zero_points.dtype == np.uint8:
        zp = unpack_bits(zero_points.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zp = np.asarray(zero_points, dtype=np.float32).reshape(n, blocks)
    w = (q.reshape(n, blocks, block_size) - zp[:, :, None]) * s[:, :, None]
    return np.ascontiguousarray(w.reshape(n, blocks * block_size)[:, :k], dtype=np.float32)


def float_name(source: str, taken: Callable[[str], bool]) -> str:
    """The key of a float view: the stored name without a quantizer's suffix when that name is free, else
    ``<source>.dequantized``."""
    for suffix in NAME_SUFFIXES:
        if source.endswith(suffix) and len(source) > len(suffix):
            name = source[: -len(suffix)]
            if not taken(name):
                return name
    name, i = f"{source}.dequantized", 1
    while taken(name):
        name, i = f"{source}.dequantized_{i}", i + 1
    return name


def register_view(model: Any, q: QuantizedTensor, hint: str = "") -> str:
    """Register a float view in an OnnxModel (``model.quantized``) and return its key; the same view registered
    twice (a weight read by several nodes) keeps one key. The key is ``hint`` (the name the graph gives the float
    weight, e.g. the output of ``Mul(Cast(q), scale)``) when no constant has it, else ``float_name``. A view of a
    constant stored in an If/Loop/Scan body is keyed in that body's scope (graph.walk)."""
    for key, have in model.quantized.items():
        if have == q:
            return key
    model_scopes(model)
    path = scope_of_key(model, q.source)
    hinted = (f"{path}::{hint}" if path else hint) if hint else ""
    key = hinted if hinted and not model.is_constant(hinted) else float_name(q.source, lambda n: model.is_constant(n))
    local = model.__dict__["_fpsg_local"]
    if path:
        local[key] = (path, key[len(path) + 2:] if key.startswith(path + "::") else key)
    model.quantized[key] = q
    return key


__all__ = ["QuantizedTensor", "nbits_dequantize", "unpack_bits", "float_name", "register_view", "NAME_SUFFIXES"]
