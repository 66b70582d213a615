"""Per-input-feature activation statistics: float64 sums and counts per scored layer, the stats file, merging.

For every scored layer (keyed by node name) we keep

* ``abs``: sum of |x_i| over every sample and position where feature i meets the weight,
* ``sq``:  sum of x_i**2 over the same,
* ``count``: how many values went into each sum,

so that E|x_i| = abs / count (FPS) and sqrt(E x_i^2) = sqrt(sq / count) (Wanda). Sums from data shards add up
exactly, which is how ``--stats-in`` merges files.

This module sits in formats/, below both runtime/ (which fills a ``Stats``) and selection/ (which reads one), so
neither imports the other for it. It knows layers only by duck type (``node``, ``feature_shape``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
from safetensors import safe_open

from fps_graph.errors import DataError, FpsGraphError
from fps_graph.formats.io import save_safetensors

STATS_FORMAT = "fps-graph-stats"
STATS_VERSION = "1"

__all__ = ["Stats", "load_merged", "STATS_FORMAT", "STATS_VERSION"]


class LayerLike(Protocol):
    """What ``Stats.check_layers`` reads of a scored layer (``graph.layers.Layer`` has it)."""

    node: str
    op: str
    feature_shape: tuple[int, ...]


@dataclass
class Stats:
    """Accumulated sums and counts per scored layer, plus where they came from."""

    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # node -> {"abs", "sq"} float64
    # node -> number of values: one number, or (ConvTranspose, whose taps touch different numbers of input
    # positions) a float64 array shaped like the sums
    counts: dict[str, float | np.ndarray] = field(default_factory=dict)
    num_samples: int = 0
    model_sha256: str = ""
    kinds: tuple[str, ...] = ("abs",)
    data: dict[str, Any] = field(default_factory=dict)   # how the data was prepared (Source.record()); saved too

    def add(self, node: str, kind: str, values: np.ndarray) -> None:
        """Add float64 sums for one layer and one statistic."""
        slot = self.sums.setdefault(node, {})
        if kind in slot:
            slot[kind] += values
        else:
            slot[kind] = np.array(values, dtype=np.float64)

    def add_count(self, node: str, n: float | np.ndarray) -> None:
        """Add to the number of values behind a layer's sums (a number, or an array shaped like the sums)."""
        if np.ndim(n) == 0:
            n = float(n)
        else:
            n = np.asarray(n, dtype=np.float64)
        self.counts[node] = self.counts.get(node, 0.0) + n

    def reached(self, node: str) -> bool:
        """True when some value went into the layer's sums (its If branch ran, its taps touched an input)."""
        return bool(np.any(np.asarray(self.counts.get(node, 0.0)) > 0))

    def mean(self, node: str, stat: str) -> np.ndarray:
        """E|x| ('mean-abs') or sqrt(E x^2) ('l2') per input feature of one layer."""
        kind = {"mean-abs": "abs", "l2": "sq"}[stat]
        if node not in self.sums or kind not in self.sums[node]:
            raise DataError(f"no {stat} statistics for layer {node}")
        if not self.reached(node):
            raise DataError(f"layer {node} saw no data")
        cnt = self.counts[node]
        if np.ndim(cnt) == 0:
            m = self.sums[node][kind] / cnt
        else:   # a ConvTranspose tap that touched no input (all its products cropped away) multiplied nothing: 0
            sums = self.sums[node][kind]
            m = np.divide(sums, cnt, out=np.zeros_like(sums), where=cnt > 0)
        return np.sqrt(m) if kind == "sq" else m

    def first_nonfinite(self, order: list[str]) -> str | None:
        """The first layer (in the given order) whose sums hold NaN or Inf."""
        for node in order:
            for arr in self.sums.get(node, {}).values():
                if not np.all(np.isfinite(arr)):
                    return node
        return None

    def merge(self, other: "Stats") -> "Stats":
        """Sum two Stats from the same model (data shards)."""
        if self.model_sha256 and other.model_sha256 and self.model_sha256 != other.model_sha256:
            raise DataError("statistics files come from different models (sha256 differs)")
        out = Stats(num_samples=self.num_samples + other.num_samples,
                    model_sha256=self.model_sha256 or other.model_sha256,
                    kinds=tuple(k for k in self.kinds if k in other.kinds),
                    data=dict(self.data or other.data))   # shards of one run share their preparation
        for src in (self, other):
            for node, slot in src.sums.items():
                for kind, arr in slot.items():
                    if kind in out.kinds:
                        out.add(node, kind, arr)
            for node, n in src.counts.items():
                out.add_count(node, n)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write sums and counts as safetensors (float64), with the model hash in the metadata."""
        tensors = {}
        for node, slot in self.sums.items():
            for kind, arr in slot.items():
                tensors[f"{node}::{kind}"] = np.ascontiguousarray(arr, dtype=np.float64)
            count = self.counts.get(node, 0.0)     # one number as [1]; per-value counts in the sums' shape
            tensors[f"{node}::count"] = np.array([count] if np.ndim(count) == 0 else count, dtype=np.float64)
        meta = {"format": STATS_FORMAT, "format_version": STATS_VERSION, "num_samples": str(self.num_samples),
                "model_sha256": self.model_sha256, "kinds": json.dumps(list(self.kinds))}
        if self.data:
            meta["data"] = json.dumps(self.data, sort_keys=True)
        save_safetensors(tensors, path, meta)

    @staticmethod
    def load(path: str | os.PathLike) -> "Stats":
        """Read a statistics file written by save()."""

        if not os.path.isfile(path):
            raise DataError(f"statistics file not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != STATS_FORMAT:
                    raise DataError(f"{path} is not an fps-graph statistics file")
                st = Stats(num_samples=int(meta["num_samples"]), model_sha256=meta.get("model_sha256", ""),
                           kinds=tuple(json.loads(meta.get("kinds", '["abs"]'))),
                           data=json.loads(meta["data"]) if meta.get("data") else {})
                for key in f.keys():
                    node, kind = key.rsplit("::", 1)
                    arr = f.get_tensor(key)
                    if kind == "count":
                        st.counts[node] = float(arr[0]) if arr.shape == (1,) else arr.astype(np.float64)
                    else:
                        st.sums.setdefault(node, {})[kind] = arr.astype(np.float64)
        except FpsGraphError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read statistics file {path}: {exc}") from exc
        return st

    def check_layers(self, layers: Sequence[LayerLike], source: str) -> None:
        """Refuse statistics that lack a scored layer or whose shapes differ from the model's."""
        for layer in layers:
            slot = self.sums.get(layer.node)
            if slot is None:
                raise DataError(f"{source}: no statistics for layer {layer.node}")
            for kind, arr in slot.items():
                if tuple(arr.shape) != tuple(layer.feature_shape):
                    raise DataError(f"{source}: statistics of layer {layer.node} have shape {tuple(arr.shape)},"
                                        f" the model expects {tuple(layer.feature_shape)}")
            count = self.counts.get(layer.node, 0.0)
            per_value = layer.op == "ConvTranspose"      # each tap has its own count (conv_transpose_window_sums)
            if np.ndim(count) != (len(layer.feature_shape) if per_value else 0) or (
                    per_value and tuple(np.shape(count)) != tuple(layer.feature_shape)):
                raise DataError(f"{source}: the value counts of layer {layer.node} have shape "
                                f"{tuple(np.shape(count))}, the model expects "
                                f"{tuple(layer.feature_shape) if per_value else '()'} (a file from another version?)")


def load_merged(paths: list[str]) -> Stats:
    """Load several statistics files and sum them."""
    total: Stats | None = None
    for p in paths:
        st = Stats.load(p)
        total = st if total is None else total.merge(st)
    if total is None:
        raise DataError("no statistics files given")
    return total
