"""Per-input-feature activation statistics: float64 sums and counts, exact im2col windows for Conv, save/merge.

For every scored layer (keyed by node name) we keep

* ``abs``: sum of |x_i| over every sample and position where feature i meets the weight,
* ``sq``:  sum of x_i**2 over the same,
* ``count``: how many values went into each sum,

so that E|x_i| = abs / count (FPS) and sqrt(E x_i^2) = sqrt(sq / count) (Wanda). Sums from data shards add up
exactly, which is how ``--stats-in`` merges files.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field

import numpy as np

from fps_graph.errors import FpsGraphError, DataError
from fps_graph.formats.io import save_safetensors
from fps_graph.graph.layers import Layer

STATS_FORMAT = "fps-graph-stats"
STATS_VERSION = "1"


def conv_pads(conv: dict, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """(begin, end) zero padding per spatial axis, auto_pad resolved against the actual input size."""
    auto = conv.get("auto_pad", "NOTSET")
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    n = len(spatial)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(n):
            out = -(-spatial[i] // s[i])
            total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return pads
    if auto == "VALID":
        return [(0, 0)] * n
    p = conv["pads"]
    return [(int(p[i]), int(p[i + n])) for i in range(n)]


def conv_window_sums(summed: np.ndarray, conv: dict) -> tuple[np.ndarray, int]:
    """Sum over output positions of each kernel tap's input, from the batch-summed map [C, *spatial].

    Returns ([C, *kernel] sums, number of output positions). This equals summing torch.nn.functional.unfold's
    columns over positions (zero padding included, stride and dilation respected).
    """
    spatial = summed.shape[1:]
    pads = conv_pads(conv, spatial)
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    outs = []
    for i, size in enumerate(spatial):
        o = (size + pads[i][0] + pads[i][1] - d[i] * (k[i] - 1) - 1) // s[i] + 1
        if o <= 0:
            raise DataError(f"conv input of spatial size {tuple(spatial)} is smaller than its kernel {tuple(k)}")
        outs.append(o)
    padded = np.pad(summed, [(0, 0)] + [tuple(p) for p in pads])
    result = np.empty((summed.shape[0], *k), dtype=np.float64)
    sp_axes = tuple(range(1, 1 + len(spatial)))
    for offs in itertools.product(*[range(kk) for kk in k]):
        sl = tuple(slice(o * d[i], o * d[i] + (outs[i] - 1) * s[i] + 1, s[i]) for i, o in enumerate(offs))
        result[(slice(None), *offs)] = padded[(slice(None), *sl)].sum(axis=sp_axes, dtype=np.float64)
    return result, int(np.prod(outs))


@dataclass
class Stats:
    """Accumulated sums and counts per scored layer, plus where they came from."""

    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # node -> {"abs", "sq"} float64
    counts: dict[str, float] = field(default_factory=dict)                  # node -> number of values
    num_samples: int = 0
    model_sha256: str = ""
    kinds: tuple[str, ...] = ("abs",)

    def add(self, node: str, kind: str, values: np.ndarray) -> None:
        """Add float64 sums for one layer and one statistic."""
        slot = self.sums.setdefault(node, {})
        if kind in slot:
            slot[kind] += values
        else:
            slot[kind] = np.array(values, dtype=np.float64)

    def add_count(self, node: str, n: float) -> None:
        """Add to the number of values behind a layer's sums."""
        self.counts[node] = self.counts.get(node, 0.0) + float(n)

    def mean(self, node: str, stat: str) -> np.ndarray:
        """E|x| ('mean-abs') or sqrt(E x^2) ('l2') per input feature of one layer."""
        kind = {"mean-abs": "abs", "l2": "sq"}[stat]
        if node not in self.sums or kind not in self.sums[node]:
            raise DataError(f"no {stat} statistics for layer {node}")
        cnt = self.counts.get(node, 0.0)
        if cnt <= 0:
            raise DataError(f"layer {node} saw no data")
        m = self.sums[node][kind] / cnt
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
                    kinds=tuple(k for k in self.kinds if k in other.kinds))
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
            tensors[f"{node}::count"] = np.array([self.counts.get(node, 0.0)], dtype=np.float64)
        meta = {"format": STATS_FORMAT, "format_version": STATS_VERSION, "num_samples": str(self.num_samples),
                "model_sha256": self.model_sha256, "kinds": json.dumps(list(self.kinds))}
        save_safetensors(tensors, path, meta)

    @staticmethod
    def load(path: str | os.PathLike) -> "Stats":
        """Read a statistics file written by save()."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise DataError(f"statistics file not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != STATS_FORMAT:
                    raise DataError(f"{path} is not an fps-graph statistics file")
                st = Stats(num_samples=int(meta["num_samples"]), model_sha256=meta.get("model_sha256", ""),
                           kinds=tuple(json.loads(meta.get("kinds", '["abs"]'))))
                for key in f.keys():
                    node, kind = key.rsplit("::", 1)
                    arr = f.get_tensor(key)
                    if kind == "count":
                        st.counts[node] = float(arr[0])
                    else:
                        st.sums.setdefault(node, {})[kind] = arr.astype(np.float64)
        except FpsGraphError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read statistics file {path}: {exc}") from exc
        return st

    def check_layers(self, layers: list[Layer], source: str) -> None:
        """Refuse statistics that lack a scored layer or whose shapes differ from the model's."""
        for layer in layers:
            slot = self.sums.get(layer.node)
            if slot is None:
                raise DataError(f"{source}: no statistics for layer {layer.node}")
            for kind, arr in slot.items():
                if tuple(arr.shape) != tuple(layer.feature_shape):
                    raise DataError(f"{source}: statistics of layer {layer.node} have shape {tuple(arr.shape)},"
                                        f" the model expects {tuple(layer.feature_shape)}")


def load_merged(paths: list[str]) -> Stats:
    """Load several statistics files and sum them."""
    total: Stats | None = None
    for p in paths:
        st = Stats.load(p)
        total = st if total is None else total.merge(st)
    if total is None:
        raise DataError("no statistics files given")
    return total
