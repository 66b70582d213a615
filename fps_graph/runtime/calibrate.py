"""Streaming calibration data through the observed graph and accumulating per-layer statistics."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from fps_graph.errors import FpsGraphError
from fps_graph.graph.observe import Observer, augment, plan_observers
from fps_graph.graph.layers import Layer
from fps_graph.graph.model import OnnxModel
from fps_graph.runtime.session import create_session
from fps_graph.selection.stats import Stats, conv_window_sums

Progress = Callable[[int], None]   # called with the number of samples just processed


@dataclass
class CalibrationInfo:
    """What a calibration run did."""

    provider: str
    seconds: float
    samples: int
    observers: int


def _accumulate_features(st: Stats, layers: list[Layer], kinds: tuple[str, ...],
                         sums: dict[str, np.ndarray], count: float) -> None:
    for layer in layers:
        for kind in kinds:
            st.add(layer.node, kind, sums[kind].astype(np.float64))
        st.add_count(layer.node, count)


def _accumulate_map(st: Stats, layers: list[Layer], kinds: tuple[str, ...], maps: dict[str, np.ndarray],
                    batch: int) -> None:
    for layer in layers:
        positions = 0
        for kind in kinds:
            m = maps[kind].astype(np.float64)
            if m.shape[0] != layer.feature_shape[0]:
                raise FpsGraphError(f"layer {layer.node}: input has {m.shape[0]} channels, weight expects "
                                    f"{layer.feature_shape[0]}")
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


def collect_stats(model: OnnxModel, layers: list[Layer], batches: Iterable[dict[str, np.ndarray]], *,
                  kinds: tuple[str, ...] = ("abs",), reduce: str = "graph", provider: str = "auto",
                  opt_level: str = "all", threads: int | None = None,
                  progress: Progress | None = None) -> tuple[Stats, CalibrationInfo]:
    """Run every batch through the observed graph once and return float64 sums and counts per layer."""
    if reduce not in ("graph", "host"):
        raise FpsGraphError(f"unknown --reduce {reduce!r} (use graph or host)")
    observers, of_layer = plan_observers(layers)
    users: dict[int, list[Layer]] = {}
    for layer in layers:
        users.setdefault(of_layer[layer.node].index, []).append(layer)
    # A Conv input observed inside the network lives in ORT's NCHWc layout (opt level "all", CPU); the NCHWc
    # transformer appends the ReorderOutput nodes that bring it back for the reducers last, so they run at the end
    # of the pass and every such activation stays alive until then (ResNet-50 b32: 2.8 GB against 0.7 GB for
    # plain inference; bench/README.md). Keep those graphs in NCHW.
    graph_inputs = {i.name for i in model.graph.input}
    disabled = ("NchwcTransformer",) if any(o.kind == "map" and o.tensor not in graph_inputs
                                            for o in observers) else ()
    # the observed model is passed without a name here, so create_session can free it before ORT loads the file
    sess = create_session(augment(model.proto, observers, mode=reduce, stats=kinds), provider,
                          base_dir=model.base_dir, external=model.has_external_data(), opt_level=opt_level,
                          threads=threads, consume=True, disabled_optimizers=disabled)
    feed_names = [i.name for i in sess.session.get_inputs()]
    out_names = [o.name for o in sess.session.get_outputs()]
    st = Stats(model_sha256=model.sha256, kinds=tuple(kinds))
    order = [layer.node for layer in layers]
    start = time.perf_counter()
    try:
        for batch in batches:
            n = int(next(iter(batch.values())).shape[0])
            feeds = {name: batch[name] for name in feed_names}
            try:
                results = dict(zip(out_names, sess.session.run(out_names, feeds)))
            except Exception as exc:
                raise FpsGraphError(f"ONNX Runtime failed on a batch: {str(exc).splitlines()[0]}") from None
            for obs in observers:
                if reduce == "host":
                    sums, info = host_reduce(obs, results[obs.output("raw")], kinds)
                else:
                    sums = {k: results[obs.output(k)] for k in kinds}
                    info = results[obs.output("size" if obs.kind == "features" else "shape")]
                if obs.kind == "features":
                    _accumulate_features(st, users[obs.index], kinds, sums, float(info) / obs.features)
                else:
                    _accumulate_map(st, users[obs.index], kinds, sums, int(info[0]))
            st.num_samples += n
            bad = st.first_nonfinite(order)
            if bad is not None:
                raise FpsGraphError(f"non-finite activations (NaN or Inf) reach layer {bad} "
                                    f"(first in graph order) within samples {st.num_samples - n}..{st.num_samples - 1}")
            if progress is not None:
                progress(n)
    finally:
        sess.close()
    if st.num_samples == 0:
        raise FpsGraphError("no calibration samples were read")
    return st, CalibrationInfo(sess.provider, time.perf_counter() - start, st.num_samples, len(observers))
