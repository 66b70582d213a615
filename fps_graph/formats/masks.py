"""Selection masks on disk: safetensors with one entry per weight, keyed by its PyTorch name where known.

Sparse form (default): int32 sorted flat indices into the key tensor, row-major, in that tensor's own layout.
Dense form (``--dense``): a bool tensor of the key tensor's shape. The header metadata (all strings, JSON where
structured) says how the selection was made and, for every key, its ONNX initializer and layout; see
``MASKS_FORMAT`` and docs/masks.md. ``data`` records how `select` prepared its calibration data
(``Source.record()``: ``kind`` image/array/text/none, ``inputs``; images add ``size`` [H, W], ``layout``,
``channels``, ``mean``, ``std``, ``crop_pct``; text adds ``tokenizer``, ``max_length``, ``text_field``), so that
`train` can prepare its data the same way. Reading needs only NumPy and safetensors (no torch).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from fps_graph.errors import DataError
from fps_graph.formats.io import decode_metadata, save_safetensors

MASKS_FORMAT = "fps-graph-masks"
MASKS_VERSION = "2"            # 2: optional per-entry input scales (``<key>::input_scale``); 1 is read as well
SCALE_SUFFIX = "::input_scale"


def write_masks(path: str | os.PathLike, indices: dict[str, np.ndarray], tensors: dict[str, dict[str, Any]],
                metadata: dict[str, Any], dense: bool = False,
                scales: dict[str, np.ndarray] | None = None) -> None:
    """Write masks (sorted flat indices per key) with their metadata; path must be a fresh temp file.

    scales: per key, the activation statistic of each selected entry's input feature, aligned with the sorted
    indices (in either layout: a dense mask's True entries in row-major order are the sorted indices); written as
    float32 tensors ``<key>::input_scale``, which training turns into per-entry step sizes."""
    out: dict[str, np.ndarray] = {}
    for key, sc in (scales or {}).items():
        sc = np.asarray(sc, dtype=np.float32).reshape(-1)
        if sc.size != np.asarray(indices[key]).size:
            raise ValueError(f"{key}: {sc.size} input scales for {np.asarray(indices[key]).size} selected entries")
        out[key + SCALE_SUFFIX] = sc
    for key in sorted(indices):
        idx = np.asarray(indices[key], dtype=np.int64)
        shape = tuple(tensors[key]["shape"])
        if dense:
            m = np.zeros(int(np.prod(shape)), dtype=bool)
            m[idx] = True
            out[key] = m.reshape(shape)
        else:
            out[key] = idx.astype(np.int32)
    meta = {"format": MASKS_FORMAT, "format_version": MASKS_VERSION, "layout": "dense" if dense else "indices"}
    for k, v in metadata.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    meta["tensors"] = json.dumps(tensors, sort_keys=True)
    save_safetensors(out, path, meta)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The header metadata of a masks file, JSON values decoded."""

    if not os.path.isfile(path):
        raise DataError(f"masks file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise DataError(f"cannot read masks file {path}: {exc}") from exc
    if raw.get("format") != MASKS_FORMAT:
        raise DataError(f"{path} is not an fps-graph masks file")
    meta: dict[str, Any] = decode_metadata(raw)
    return meta


def load_indices(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Sorted int64 flat indices per key, from either layout."""

    meta = read_metadata(path)
    arrays = load_file(str(path))
    out = {}
    for key, arr in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        out[key] = np.flatnonzero(arr.reshape(-1)) if arr.dtype == bool else arr.astype(np.int64)
    del meta
    return out


def load_input_scales(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per key, the float32 input statistic of each selected entry (aligned with the sorted indices); empty for
    masks written without statistics (random, magnitude) or before format version 2."""
    read_metadata(path)
    with safe_open(str(path), framework="numpy") as f:
        return {k[:-len(SCALE_SUFFIX)]: f.get_tensor(k).astype(np.float32) for k in f.keys()
                if k.endswith(SCALE_SUFFIX)}


def load_masks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Dense bool masks (True = selected, trainable) of each key tensor's shape, from either layout."""

    meta = read_metadata(path)
    tensors = meta.get("tensors", {})
    out = {}
    for key, arr in load_file(str(path)).items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if arr.dtype == bool:
            out[key] = arr
            continue
        if key not in tensors:
            raise DataError(f"{path}: no shape recorded for {key!r}")
        shape = tuple(tensors[key]["shape"])
        m = np.zeros(int(np.prod(shape)), dtype=bool)
        m[arr.astype(np.int64)] = True
        out[key] = m.reshape(shape)
    return out


def data_record(path: str | os.PathLike) -> dict[str, Any]:
    """How `select` prepared its data (the ``data`` metadata entry); ``{"kind": "none"}`` when it read none (saved
    statistics, a data-free score) or the file predates the record."""
    rec = read_metadata(path).get("data")
    return rec if isinstance(rec, dict) and rec.get("kind") else {"kind": "none"}
