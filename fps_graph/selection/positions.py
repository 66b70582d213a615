"""Carrying selected positions between layouts by arithmetic on their coordinates: O(selected), not O(weight).

A selection is a few positions per output neuron in the canonical [out_features, fan_in] layout; masks are written
as flat positions in the key tensor's own layout (the state_dict tensor, possibly the stored ONNX tensor
transposed). Building an index array of every weight's full size to look the positions up (arange, transpose,
inverse permutation) cost 43 s of a 123 s run on a 1.1B decoder (issue 12); here only the selected positions are
unravelled, moved back through the recorded layout chain (Transpose, Reshape-like steps) and ravelled again.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fps_graph.graph.layers import Layer

_RESHAPES = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


def _unravel(flat: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    """Row-major coordinates of flat positions (an empty shape has the single position 0)."""
    if len(shape) == 0:
        return []
    return list(np.unravel_index(flat, tuple(int(d) for d in shape)))


def _ravel(coords: Sequence[np.ndarray], shape: Sequence[int], like: np.ndarray) -> np.ndarray:
    """Row-major flat positions of coordinates."""
    if len(shape) == 0:
        return np.zeros_like(like, dtype=np.int64)
    return np.ravel_multi_index(tuple(coords), tuple(int(d) for d in shape)).astype(np.int64, copy=False)


def _chain_shapes(layer: Layer) -> list[tuple[int, ...]]:
    """The weight's shape before each step of its chain, and after the last one (the node's layout)."""
    shapes = [tuple(int(d) for d in layer.stored_shape)]
    for step in layer.chain:
        cur = shapes[-1]
        if step["op"] == "Transpose":
            perm = step["perm"] or list(range(len(cur)))[::-1]
            shapes.append(tuple(cur[p] for p in perm))
        elif step["op"] in _RESHAPES:
            shapes.append(tuple(int(d) for d in step["shape"]))
        else:
            shapes.append(cur)
    return shapes


def canonical_to_op(layer: Layer, pos: np.ndarray) -> list[np.ndarray]:
    """Coordinates in the node's weight layout of flat canonical positions (inverse of Layer.to_canonical)."""
    op_shape = tuple(int(d) for d in layer.op_shape)
    if hasattr(layer, "op_coords"):                        # ConvTranspose: groups interleave (graph.layers)
        return layer.op_coords(pos)
    if layer.op == "Conv" or (layer.op == "Gemm" and layer.trans_b) or getattr(layer, "canonical_is_op", False):
        return _unravel(pos, op_shape)                     # canonical = op reshaped: same flat order
    return _unravel(pos, op_shape[::-1])[::-1]             # canonical = op.T: reversed axes


def canonical_to_stored(layer: Layer, pos: np.ndarray) -> np.ndarray:
    """Flat positions in the stored tensor of flat canonical positions; equals canonical_index().reshape(-1)[pos]."""
    pos = np.asarray(pos, dtype=np.int64).reshape(-1)
    shapes = _chain_shapes(layer)
    coords = canonical_to_op(layer, pos)
    for step, before, after in zip(reversed(layer.chain), reversed(shapes[:-1]), reversed(shapes[1:])):
        if step["op"] == "Transpose":
            perm = step["perm"] or list(range(len(before)))[::-1]
            back: list[np.ndarray] = [np.empty(0)] * len(perm)
            for j, p in enumerate(perm):                   # after[j] is before[perm[j]]
                back[p] = coords[j]
            coords = back
        elif step["op"] in _RESHAPES:
            coords = _unravel(_ravel(coords, after, pos), before)
    return _ravel(coords, shapes[0], pos)


def stored_to_key(stored_pos: np.ndarray, stored_shape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    """Flat positions in the key tensor (the stored tensor transposed by perm, if any) of stored flat positions."""
    if perm is None:
        return np.asarray(stored_pos, dtype=np.int64)
    coords = _unravel(stored_pos, stored_shape)
    key_shape = [int(stored_shape[p]) for p in perm]
    return _ravel([coords[p] for p in perm], key_shape, stored_pos)


def canonical_to_key(layer: Layer, pos: np.ndarray, perm: Sequence[int] | None) -> np.ndarray:
    """Sorted flat positions in the key tensor's layout of flat canonical positions."""
    return np.sort(stored_to_key(canonical_to_stored(layer, pos), layer.stored_shape, perm))
