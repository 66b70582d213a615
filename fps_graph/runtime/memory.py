"""How many samples fit a memory budget: the activation memory of one run, estimated from the graph itself.

Statistics are sums, so a batch can be run in micro-batches (runtime.calibrate.BatchStats) with a fraction of the
activation memory. The micro-batch comes from the model's activation bytes per sample, found by shape inference on
a weightless copy of a graph (concrete input shapes: those of the batch, one and two samples) and a walk over the
nodes in graph order that frees each tensor after its last reader, as ONNX Runtime's allocation planner does with
the priority-based order (runtime.session). Three limits, each deterministic (no clock, no RSS), so the
micro-batch, and therefore every sum and mask, is the same on every rerun:

* ``plain`` (the default): the observed graph's activations never exceed those of plain inference of the same batch
  (the unmodified model, estimated the same way);
* ``auto`` (``--max-memory auto``): also at most ``AUTO_SHARE`` of the weight bytes (at least ``AUTO_MIN_MB``) of
  activations with the arena's slack: near the floor of weights + runtime + one micro-batch, with micro-batches still
  large enough to keep the kernels busy;
* a budget in MB (``--max-memory MB``): weights + runtime + activations with slack within it, else an error.
"""
from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import helper

from fps_graph.errors import OptionError
from fps_graph.graph.model import SHAPE_ERRORS
from fps_graph.graph.observe import _node_inputs

MB = 1 << 20
KEEP_BYTES = 4096          # initializers up to this size keep their values (shape constants for shape inference)
RUNTIME_MB = 150           # Python, NumPy, onnx and ONNX Runtime themselves plus a session's fixed buffers
ARENA_SLACK = 3.0          # resident bytes per estimated activation byte: ORT's arena grows in rounded-up chunks and
                           # keeps them, kernels add scratch; ViT-B/16, micro-batches of 8/16/32: 120/208/394 MB above
                           # the session's RSS against 39/68/127 MB estimated
                           # (bench/results/vit-b16_b32_n64_arena-micro-cpu.md)
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}   # ONNX Runtime aliases their output
PLAIN_SLACK = 64 << 10     # bytes the observed graph may need beyond plain inference before a batch is sliced
AUTO = "auto"              # --max-memory auto
AUTO_SHARE = 0.25          # auto: activations (with slack) up to this share of the weight bytes ...
AUTO_MIN_MB = 64           # ... or this many MB, whichever is more (small models keep whole batches)


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except KeyError:   # a type NumPy has no dtype for (undefined, or newer than this onnx): count 4 bytes
        return 4


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod([int(d) for d in t.dims], dtype=np.int64)) * _itemsize(t.data_type)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers (embedded or external), from their shapes."""
    return int(sum(_tensor_bytes(t) for t in model.graph.initializer))


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its weights: large initializers become typed graph inputs of the same shape."""
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g, src = out.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    names = {i.name for i in src.input}
    for t in src.initializer:
        if _tensor_bytes(t) <= KEEP_BYTES and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in names:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, [int(d) for d in t.dims]))
    return out


@dataclass(frozen=True)
class Footprint:
    """Activation bytes of one run: fixed + per_sample * samples."""

    fixed: int
    per_sample: int

    def samples_within(self, budget: int) -> int:
        """The most samples whose run fits the budget (0 when not even one does)."""
        if self.per_sample <= 0:
            return 1 << 30
        return max(0, (budget - self.fixed) // self.per_sample)


class ActivationEstimate:
    """Peak live activation bytes of one run of a (weightless) observed graph, for given input shapes."""

    def __init__(self, observed_skeleton: onnx.ModelProto, weights: set[str]):
        self.model = observed_skeleton
        self.weights = weights   # inputs of the skeleton that stand for initializers (held by the runtime)

    def peak_bytes(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Peak bytes of the tensors alive at once, walking the nodes in graph order (inputs included)."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for vi in m.graph.input:
            if vi.name in shapes:
                dims = vi.type.tensor_type.shape.dim
                want = shapes[vi.name]
                del dims[:]
                for d in want:
                    dims.add().dim_value = int(d)
        try:
            m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        except SHAPE_ERRORS:   # partial knowledge is still useful; unknown sizes fall back below
            pass
        g = m.graph
        size: dict[str, int] = {}
        elem: dict[str, int] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            tt = vi.type.tensor_type
            elem[vi.name] = tt.elem_type
            if not tt.HasField("shape") or any(not d.HasField("dim_value") or d.dim_value < 0 for d in tt.shape.dim):
                continue
            size[vi.name] = int(np.prod([d.dim_value for d in tt.shape.dim], dtype=np.int64)) * _itemsize(tt.elem_type)
        constants = {t.name for t in g.initializer} | self.weights
        # A view (Reshape, Squeeze, ... and a Cast to the type it already has, which ORT removes) shares its
        # input's buffer: it costs nothing and keeps that buffer alive until the view's own last reader.
        root: dict[str, str] = {}
        for node in g.node:
            src = node.input[0] if node.input else ""
            if src and src not in constants and (node.op_type in VIEW_OPS or (
                    node.op_type == "Cast" and elem.get(src) and elem.get(src) == elem.get(node.output[0]))):
                root[node.output[0]] = root.get(src, src)
        last: dict[str, int] = {}
        for i, node in enumerate(g.node):
            for name in _node_inputs(node):
                last[root.get(name, name)] = i
        outputs = {root.get(o.name, o.name) for o in g.output}
        live = {vi.name: size.get(vi.name, 0) for vi in g.input if vi.name not in constants}
        peak = current = sum(live.values())
        for i, node in enumerate(g.node):
            ins = [n for n in node.input if n and n not in constants]
            guess = max((size.get(n, 0) for n in ins), default=0)   # unknown output: as big as its largest input
            for out in node.output:
                if out and out not in live and out not in root:
                    live[out] = size.get(out, guess)
                    current += live[out]
            peak = max(peak, current)
            for name in list(_node_inputs(node)) + list(node.output):
                name = root.get(name, name)
                if name in live and last.get(name, -1) <= i and name not in outputs:
                    current -= live.pop(name)
        return int(peak)

    def footprint(self, shapes: Mapping[str, tuple[int, ...]], sample_inputs: set[str]) -> Footprint:
        """Fixed and per-sample activation bytes, from runs of one and two samples of these shapes."""
        def at(n: int) -> int:
            return self.peak_bytes({k: ((n, *s[1:]) if k in sample_inputs else s) for k, s in shapes.items()})

        one, two = at(1), at(2)
        per = max(two - one, 1)
        return Footprint(fixed=max(one - per, 0), per_sample=per)


def even_slices(n: int, most: int) -> int:
    """Samples per slice when n samples may run at most ``most`` at a time: as few slices as that allows, of equal
    size (the last one smaller), so 32 at most 28 gives 16 + 16, not 28 + 4."""
    most = max(1, min(n, most))
    slices = -(-n // most)
    return -(-n // slices)


def within_plain(observed: Footprint, plain: Footprint, n: int) -> int:
    """The most samples whose observed run needs no more activation bytes than plain inference of n samples (a few
    KB more, ``PLAIN_SLACK``, are noise: a toy model's batch is not sliced for its reducers' outputs)."""
    return max(1, observed.samples_within(plain.fixed + plain.per_sample * n + PLAIN_SLACK))


def auto_cap(weights: int) -> int:
    """Activation bytes (before the arena's slack) that ``--max-memory auto`` allows for one run."""
    return int(max(AUTO_SHARE * weights, AUTO_MIN_MB * MB) / ARENA_SLACK)


def micro_batch_for(budget_mb: float, weights: int, footprint: Footprint) -> int:
    """Samples per run that keep weights + runtime + activations (with arena slack) within budget_mb."""
    avail = budget_mb * MB - weights - RUNTIME_MB * MB
    fit = footprint.samples_within(int(avail / ARENA_SLACK)) if avail > 0 else 0
    if fit < 1:
        need = (weights + RUNTIME_MB * MB + ARENA_SLACK * (footprint.fixed + footprint.per_sample)) / MB
        raise OptionError(f"--max-memory {budget_mb:g} MB is too small for this model: its weights ({weights / MB:.0f}"
                            f" MB), the runtime (~{RUNTIME_MB} MB) and one sample's activations "
                            f"(~{ARENA_SLACK * (footprint.fixed + footprint.per_sample) / MB:.0f} MB) need about "
                            f"{math.ceil(need)} MB; raise it (or drop --max-memory)")
    return int(fit)


def check_max_memory(value: float | str | None) -> None:
    """Refuse a budget that is not a positive, finite number of MB or ``"auto"``."""
    if value is None or value == AUTO:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise OptionError(f"--max-memory must be a positive number of MB or 'auto' (got {value!r})")


def status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB; None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """High-water resident memory of this process image, in MB.

    Linux: ``VmHWM``, which starts again at exec. ``ru_maxrss`` does not: a process started by fork + exec from a
    big parent reports the parent's peak (a 13 MB child of a 400 MB parent reads 413 MB), so a benchmark driver that
    exported a model would inflate every child's figure. Elsewhere ``ru_maxrss`` is the best there is.
    """
    hwm = status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 ** 2)
