"""Fine-tuning results on disk (``delta.safetensors``): sparse deltas and fully trained tensors, torch-free.

Tensors, keyed by PyTorch state_dict name (``:`` never occurs in those names):

* ``<key>:indices`` int32 sorted flat indices into the tensor (row-major, PyTorch layout), ``<key>:delta`` float32
  trained change at those entries and ``<key>:base`` the values training started from (fine-tuned value =
  float32(base + delta), exactly what the PyTorch forward computes);
* ``<key>`` a tensor trained in full (a bias, the head), with ``<key>:base`` its starting value when the tensor
  existed in the base model with the same shape (not for a replaced head).

String metadata (JSON where structured): ``format`` = ``fps-graph-delta``, ``tensors`` (per key: kind sparse/full,
shape, dtype, selected, and the ONNX initializer/layout recorded in the masks file), ``head`` (name, replaced,
old and new number of classes), ``masks_sha256``, ``model_sha256`` (the ONNX model the masks were selected on),
``training`` (settings) and ``fps_graph_version``. Reading needs only NumPy and safetensors; see ``read_delta``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from fps_graph.errors import DataError
from fps_graph.formats.io import decode_metadata, save_safetensors

DELTA_FORMAT = "fps-graph-delta"
DELTA_VERSION = "1"


@dataclass
class SparseEntry:
    """A sparsely trained tensor: flat indices (key layout), trained change and the starting values there."""

    indices: np.ndarray      # int64, sorted
    delta: np.ndarray        # float32
    base: np.ndarray | None  # float32 values at indices before training
    shape: tuple[int, ...]

    def values(self) -> np.ndarray:
        """Fine-tuned values at the indices: float32(base + delta), bit-identical to the PyTorch forward."""
        if self.base is None:
            raise DataError("sparse delta has no base values")
        return (self.base.astype(np.float32) + self.delta.astype(np.float32)).astype(np.float32)


@dataclass
class FullEntry:
    """A tensor trained in full: its fine-tuned value and, when it existed with this shape, its starting value."""

    value: np.ndarray
    base: np.ndarray | None


@dataclass
class DeltaFile:
    """A loaded delta.safetensors."""

    path: str
    sparse: dict[str, SparseEntry]
    full: dict[str, FullEntry]
    tensors: dict[str, dict[str, Any]]
    head: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """Every trained tensor's name."""
        return sorted(set(self.sparse) | set(self.full))


def write_delta(path: str | os.PathLike, sparse: dict[str, SparseEntry], full: dict[str, FullEntry],
                tensors: dict[str, dict[str, Any]], head: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Write a delta file to path (a fresh temporary file; the caller renames it); equal inputs, equal bytes."""
    out: dict[str, np.ndarray] = {}
    for key in sorted(sparse):
        e = sparse[key]
        out[f"{key}:indices"] = np.ascontiguousarray(e.indices, dtype=np.int32)
        out[f"{key}:delta"] = np.ascontiguousarray(e.delta, dtype=np.float32)
        if e.base is not None:
            out[f"{key}:base"] = np.ascontiguousarray(e.base, dtype=np.float32)
    for key in sorted(full):
        e = full[key]
        out[key] = np.ascontiguousarray(e.value)
        if e.base is not None:
            out[f"{key}:base"] = np.ascontiguousarray(e.base)
    meta = {"format": DELTA_FORMAT, "format_version": DELTA_VERSION}
    for k, v in metadata.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    meta["tensors"] = json.dumps(tensors, sort_keys=True)
    meta["head"] = json.dumps(head, sort_keys=True)
    save_safetensors(out, path, metadata=meta)


def read_delta(path: str | os.PathLike) -> DeltaFile:
    """Load and check a delta file."""

    p = str(path)
    if not os.path.isfile(p):
        raise DataError(f"delta file not found: {p}")
    try:
        with safe_open(p, framework="numpy") as f:
            raw = f.metadata() or {}
        arrays = load_file(p)
    except Exception as exc:
        raise DataError(f"cannot read delta file {p}: {exc}") from exc
    if raw.get("format") != DELTA_FORMAT:
        raise DataError(f"{p} is not an fps-graph delta file (written by `fps-graph train`)")
    meta: dict[str, Any] = decode_metadata(raw)
    tensors = meta.get("tensors") or {}
    head = meta.get("head") or {}
    sparse: dict[str, SparseEntry] = {}
    full: dict[str, FullEntry] = {}
    for key, rec in tensors.items():
        shape = tuple(int(d) for d in rec["shape"])
        if rec.get("kind") == "sparse":
            try:
                idx = arrays[f"{key}:indices"].astype(np.int64)
                delta = arrays[f"{key}:delta"].astype(np.float32)
            except KeyError as exc:
                raise DataError(f"{p}: sparse tensor {key!r} lacks its indices or delta") from exc
            base = arrays.get(f"{key}:base")
            n = int(np.prod(shape))
            if idx.shape != delta.shape or (base is not None and base.shape != idx.shape):
                raise DataError(f"{p}: {key!r}: indices, delta and base differ in length")
            if idx.size and (idx.min() < 0 or idx.max() >= n or np.any(np.diff(idx) <= 0)):
                raise DataError(f"{p}: {key!r}: indices are not sorted, unique and inside a tensor of shape "
                                    f"{list(shape)}")
            sparse[key] = SparseEntry(idx, delta, base, shape)
        elif rec.get("kind") == "full":
            if key not in arrays:
                raise DataError(f"{p}: fully trained tensor {key!r} is missing")
            value = arrays[key]
            if tuple(value.shape) != shape:
                raise DataError(f"{p}: {key!r} has shape {list(value.shape)}, the header says {list(shape)}")
            full[key] = FullEntry(value, arrays.get(f"{key}:base"))
        else:
            raise DataError(f"{p}: tensor {key!r} has unknown kind {rec.get('kind')!r}")
    return DeltaFile(p, sparse, full, tensors, head, meta)
