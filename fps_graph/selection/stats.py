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
from typing import Any

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
    columns over positions (zero padding included, stride and dilation respected). The positions a tap reads form
    a grid, one strided range per axis (padding reads zeros and is left out), so the sum is taken one axis at a
    time: kernel[0] / stride[0] passes over the map instead of one per tap (a batch of one image of a conv net
    spent more time here than in ONNX Runtime; bench/README.md).
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
    acc = summed
    for i, size in enumerate(spatial):
        axis = i + 1
        taps = []
        for t in range(k[i]):
            first = t * d[i] - pads[i][0]                    # input index of output position 0 for this tap
            lo = max(0, -(-(-first) // s[i])) if first < 0 else 0   # first output position inside the input
            hi = min(outs[i] - 1, (size - 1 - first) // s[i])       # last one
            sl = [slice(None)] * acc.ndim
            if hi < lo:
                shape = list(acc.shape)
                shape[axis] = 1
                taps.append(np.zeros(shape, dtype=np.float64))
                continue
            sl[axis] = slice(first + lo * s[i], first + hi * s[i] + 1, s[i])
            taps.append(acc[tuple(sl)].sum(axis=axis, keepdims=True, dtype=np.float64))
        acc = np.concatenate(taps, axis=axis)
    return acc, int(np.prod(outs))


def conv_transpose_crop(conv: dict, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first kept position, kept size) of a ConvTranspose output per spatial axis, in the coordinates of the full
    output ``q = p * stride + tap * dilation`` (p an input position), as ONNX Runtime computes them: ``output_shape``
    when given (explicit pads are then ignored), else ``auto_pad`` SAME_* (output = input * stride), VALID, or the
    explicit ``pads``. A computed total pad is split as the ONNX spec says (ONNX Runtime 1.31 agrees; older releases
    swapped the two): SAME_UPPER puts the odd one at the end, anything else at the beginning."""
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    adj = conv.get("output_padding") or [0] * len(spatial)
    auto = conv.get("auto_pad", "NOTSET")
    shape = list(conv.get("output_shape") or [])
    n = len(spatial)
    out = []
    for i, size in enumerate(spatial):
        full = (size - 1) * s[i] + adj[i] + (k[i] - 1) * d[i] + 1
        if shape or auto in ("SAME_UPPER", "SAME_LOWER"):
            target = (shape[i] if len(shape) == n else shape[i + 2]) if shape else size * s[i]
            total = max(0, full - target)
            head = total // 2 if auto == "SAME_UPPER" else total - total // 2
            size_out = target if shape else full - total
        elif auto == "VALID":
            head, size_out = 0, full
        else:
            head, tail = int(conv["pads"][i]), int(conv["pads"][i + n])
            size_out = full - head - tail
        if size_out <= 0:
            raise DataError(f"ConvTranspose input of spatial size {tuple(spatial)} gives an empty output")
        out.append((head, size_out))
    return out


def conv_transpose_window_sums(summed: np.ndarray, conv: dict) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose: for every (input channel, kernel tap), the sum of the batch-summed map over the input
    positions whose product with that tap lands in a kept output position; and how many such positions each tap
    has (per sample), shaped like the sums.

    ConvTranspose adds x[c, p] * W[c, o, tap] into output position p * stride + tap * dilation - pad_begin: every
    input position meets every tap, except the products that fall outside the output (cropped by pads, or beyond
    an output_shape). Per axis the kept positions of one tap are an interval of p, so each tap's set is a box.
    This is the adjoint of Conv's im2col: the (input, tap) pairs of the Conv that computes ConvTranspose's input
    gradient, without the zeros that Conv view inserts between input positions (W never multiplies those).
    """
    spatial = summed.shape[1:]
    crop = conv_transpose_crop(conv, tuple(spatial))
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    bounds = []            # per axis, per tap: [lo, hi) of input positions kept
    for i, size in enumerate(spatial):
        head, out = crop[i]
        axis = []
        for t in range(k[i]):
            lo = max(0, -((t * d[i] - head) // s[i]))          # ceil((head - t*d) / s)
            hi = min(size, (head + out - 1 - t * d[i]) // s[i] + 1)
            axis.append((lo, max(lo, hi)))
        bounds.append(axis)
    result = np.zeros((summed.shape[0], *k), dtype=np.float64)
    per_tap = np.zeros(tuple(k), dtype=np.float64)
    sp_axes = tuple(range(1, 1 + len(spatial)))
    for offs in itertools.product(*[range(kk) for kk in k]):
        box = [bounds[i][t] for i, t in enumerate(offs)]
        per_tap[offs] = float(np.prod([hi - lo for lo, hi in box]))
        if per_tap[offs]:
            sl = tuple(slice(lo, hi) for lo, hi in box)
            result[(slice(None), *offs)] = summed[(slice(None), *sl)].sum(axis=sp_axes, dtype=np.float64)
    return result, np.broadcast_to(per_tap, result.shape).copy()


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
        from safetensors import safe_open

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
