"""Streaming calibration data through the observed graph and accumulating per-layer statistics."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from fps_graph.errors import DataError, RuntimeFailure
from fps_graph.graph.observe import Observer, augment, observer_parts, plan_observers, reducers_first
from fps_graph.graph.layers import Layer
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.versions import ort_errors
from fps_graph.graph.walk import subgraphs
from fps_graph.runtime.config import RuntimeConfig, runtime_of
from fps_graph.runtime.micro import MicroBatcher, merge_in_order
from fps_graph.runtime.session import create_session, ort_message
from fps_graph.runtime.shards import sum_shard
from fps_graph.formats.stats import Stats
from fps_graph.runtime.windows import conv_col_window_sums, conv_transpose_window_sums, conv_window_sums

Progress = Callable[[int], None]   # called with the number of samples just processed


@dataclass
class CalibrationInfo:
    """What a calibration run did."""

    provider: str
    seconds: float
    samples: int
    observers: int
    cluster: dict | None = None     # a distributed run's report (runtime.ray): workers, shards, start-up, memory
    micro_batch: int = 0            # samples per ONNX Runtime run when batches were sliced (runtime.micro); 0: whole
    runtime_seconds: float = 0.0    # of ``seconds``: inside ONNX Runtime's run (local runs; 0 for a Ray run)
    host_seconds: float = 0.0       # of ``seconds``: adding the graph's outputs up on the host (conv window sums ...)


def _accumulate_features(st: Stats, layers: list[Layer], kinds: tuple[str, ...],
                         sums: dict[str, np.ndarray], count: float) -> None:
    for layer in layers:
        for kind in kinds:   # a pointwise conv's [C] sums take its [C, 1, 1] statistic shape
            st.add(layer.node, kind, sums[kind].astype(np.float64).reshape(layer.feature_shape))
        st.add_count(layer.node, count)


def _accumulate_map(st: Stats, obs: Observer, layers: list[Layer], kinds: tuple[str, ...],
                    maps: dict[str, np.ndarray], shape: np.ndarray) -> None:
    batch = int(shape[0])
    for layer in layers:
        positions = 0
        if batch == 0:   # an If branch not taken: no values (the map is empty)
            for kind in kinds:
                st.add(layer.node, kind, np.zeros(layer.feature_shape, dtype=np.float64))
            # ConvTranspose keeps one count per tap (formats/stats.py): zeros of that shape, so files stay checkable
            st.add_count(layer.node, np.zeros(layer.feature_shape) if layer.op == "ConvTranspose" else 0)
            continue
        for kind in kinds:
            m = maps[kind]   # float32; the window sums add it up in float64 (runtime/windows.py)
            if obs.kind == "cols":
                m = m[0]     # [1, C, ...]: the graph kept the batch axis (observe._col_nodes)
            if m.shape[0] != layer.feature_shape[0]:
                raise DataError(f"layer {layer.node}: input has {m.shape[0]} channels, weight expects "
                                    f"{layer.feature_shape[0]}")
            if layer.op == "ConvTranspose":   # each tap meets its own number of input positions
                win, positions = conv_transpose_window_sums(m, layer.conv)
            elif obs.kind == "cols":
                win, positions = conv_col_window_sums(m, tuple(shape), layer.conv, obs.cols)
            else:
                win, positions = conv_window_sums(m, layer.conv)
            st.add(layer.node, kind, win)
        st.add_count(layer.node, batch * positions)


def host_reduce(obs: Observer, raw: np.ndarray, kinds: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The reductions the graph would do, in float64 NumPy on a raw activation (the oracle)."""
    x = np.asarray(raw, dtype=np.float64)
    if obs.kind == "features":
        if obs.axis == -1:
            x = x.reshape(-1, obs.features)
            axis = 0
        elif obs.axis == 1:   # a pointwise conv's input [N, C, *spatial]
            axis = (0, *range(2, x.ndim))
        else:
            axis = 1
        shape_info = np.array(raw.size, dtype=np.int64)
    else:
        axis = 0
        shape_info = np.array(raw.shape, dtype=np.int64)
    out = {}
    if "abs" in kinds:
        out["abs"] = np.abs(x).sum(axis=axis)
    if "sq" in kinds:
        out["sq"] = np.square(x).sum(axis=axis)
    return out, shape_info


class BatchStats:
    """One ONNX Runtime session on the observed graph; calling it on a batch returns that batch's float64 sums.

    The per-batch step of calibration, split from the loop so that any driver can reuse it: the local loop in
    ``collect_stats``, or one actor per worker in a distributed run (the constructor takes plain, picklable
    arguments; the session is built here, once). Partial sums are merged with ``Stats.merge`` in batch order.
    """

    def __init__(self, model: OnnxModel, layers: list[Layer], *, kinds: tuple[str, ...] = ("abs",),
                 runtime: RuntimeConfig | None = None, **loose: Any):
        runtime = runtime_of(runtime, loose, "BatchStats")   # loose knobs (reduce=...): the deprecated spelling
        self.runtime = runtime
        self.layers = layers
        self.kinds = tuple(kinds)
        self.reduce = reduce = runtime.reduce
        self.model_sha256 = model.sha256
        # Conv inputs reduced along their last axis in the graph (cols), except for the host oracle and opsets
        # without Slice's inputs form
        self.observers, of_layer = plan_observers(layers, cols=reduce == "graph" and model.opset >= 10)
        self.users: dict[int, list[Layer]] = {}
        for layer in layers:
            self.users.setdefault(of_layer[layer.node].index, []).append(layer)
        self.order = [layer.node for layer in layers]
        # A Conv input observed inside the network lives in ORT's NCHWc layout (opt level "all", CPU); the NCHWc
        # transformer appends the ReorderOutput nodes that bring it back for the reducers after every other node,
        # so ORT's priority-based order runs them at the end of the pass and every such activation stays alive
        # until then (ResNet-50 b32: 2.8 GB against 0.7 GB for plain inference; bench/README.md). Turning NCHWc off
        # costs time instead (its convs are ~1.5x faster here). So such graphs are run from ORT's own optimized
        # graph with each reducer moved right after its activation (session.create_session, regroup); graphs with
        # control flow, whose optimized copy ORT may not read back, and anything ORT fails on, run without NCHWc.
        graph_inputs = {i.name for i in model.graph.input}
        inner_convs = any(o.tensor not in graph_inputs and any(layer.op == "Conv" for layer in self.users[o.index])
                          for o in self.observers)
        flow = any(subgraphs(node) for node in model.graph.node)
        nchwc = {"disabled_optimizers": ("NchwcTransformer",)} if inner_convs and flow else \
            {"regroup": reducers_first, "regroup_fallback": ("NchwcTransformer",)} if inner_convs else {}
        # the observed model is passed without a name, so create_session can free it before ORT loads the file
        self.session = create_session(augment(model.proto, self.observers, mode=reduce, stats=self.kinds),
                                      runtime.provider, base_dir=model.base_dir,
                                      external=model.has_external_data(), opt_level=runtime.opt_level,
                                      threads=runtime.threads, consume=True, **nchwc)
        self.provider = self.session.provider
        self.feed_names = [i.name for i in self.session.session.get_inputs()]
        self.out_names = [o.name for o in self.session.session.get_outputs()]
        self.micro = MicroBatcher(model, self.observers, self.kinds, reduce, self.session.session.get_inputs(),
                                  runtime.micro_batch, runtime.max_memory_mb)
        self.runtime_seconds = 0.0     # time inside ONNX Runtime's run, and adding its outputs up (CalibrationInfo)
        self.host_seconds = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> Stats:
        """The float64 sums and counts of one batch (``num_samples`` = its first input's leading size)."""
        n = int(next(iter(batch.values())).shape[0])
        parts = self.micro.split(batch, n)
        if parts is not None:   # micro-batches: sums add up, a fraction of the activation memory (runtime.micro)
            return merge_in_order([self(part) for part in parts])
        feeds = {name: batch[name] for name in self.feed_names}
        t0 = time.perf_counter()
        try:
            results = dict(zip(self.out_names, self.session.session.run(self.out_names, feeds)))
        except ort_errors() as exc:
            raise RuntimeFailure(f"ONNX Runtime failed on a batch: {ort_message(exc)}") from exc
        t1 = time.perf_counter()
        self.runtime_seconds += t1 - t0
        st = Stats(model_sha256=self.model_sha256, kinds=self.kinds)
        for obs in self.observers:
            if self.reduce == "host" and not obs.state:
                parts = [host_reduce(obs, results[obs.output("raw")], self.kinds)]
            else:   # one part, or one per Loop/Scan iteration (graph.observe)
                parts = observer_parts(obs, results, self.kinds)
            for sums, info in parts:
                if obs.kind == "features":
                    _accumulate_features(st, self.users[obs.index], self.kinds, sums, float(info) / obs.features)
                else:
                    _accumulate_map(st, obs, self.users[obs.index], self.kinds, sums, info)
        st.num_samples = n
        self.host_seconds += time.perf_counter() - t1
        return st

    def close(self) -> None:
        """Release the session (and its temporary weight file, if any)."""
        self.session.close()


def check_finite(partial: Stats, order: list[str], first_sample: int) -> None:
    """Refuse a batch whose sums hold NaN or Inf, naming the first such layer and the sample range."""
    bad = partial.first_nonfinite(order)
    if bad is not None:
        raise DataError(f"non-finite activations (NaN or Inf) reach layer {bad} (first in graph order) within "
                            f"samples {first_sample}..{first_sample + partial.num_samples - 1}")


def collect_stats(model: OnnxModel, layers: list[Layer], batches: Iterable[dict[str, np.ndarray]], *,
                  kinds: tuple[str, ...] = ("abs",), runtime: RuntimeConfig | None = None,
                  progress: Progress | None = None, shard_batches: int | None = None,
                  **loose: Any) -> tuple[Stats, CalibrationInfo]:
    """Run every batch through the observed graph once and return float64 sums and counts per layer.

    ``runtime`` says how ONNX Runtime runs (``RuntimeConfig``; the loose ``reduce=``, ``provider=``, ... keywords
    still work for one release, with a DeprecationWarning).

    The batches are summed in shards of ``shard_batches`` (None: one shard), each from zero, and the shard sums
    are added in order: the grouping a distributed run uses too, so both give the same bytes (runtime.shards).
    """
    step = BatchStats(model, layers, kinds=kinds, runtime=runtime_of(runtime, loose, "collect_stats"))
    st = Stats(model_sha256=model.sha256, kinds=tuple(kinds))
    start = time.perf_counter()
    feed = iter(batches)
    try:
        while True:
            shard = sum_shard(step, itertools.islice(feed, shard_batches), Stats(model_sha256=model.sha256,
                              kinds=tuple(kinds)), lambda partial, first: check_finite(partial, step.order, first),
                              progress, st.num_samples)
            if shard.num_samples == 0:
                break
            st = st.merge(shard)
    finally:
        step.close()
    if st.num_samples == 0:
        raise DataError("no calibration samples were read")
    return st, CalibrationInfo(step.provider, time.perf_counter() - start, st.num_samples, len(step.observers),
                               micro_batch=step.micro.slice_size(), runtime_seconds=step.runtime_seconds,
                               host_seconds=step.host_seconds)
