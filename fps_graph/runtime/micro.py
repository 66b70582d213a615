"""Micro-batching inside one calibration step: a batch is run as consecutive slices and their sums are added.

The statistics are sums over samples, so a batch of 32 run as 4 x 8 gives the same sums up to float32 rounding in
the in-graph reductions (each slice is reduced on its own, then the float64 partial sums are added in slice order)
with about a quarter of the activation memory. The slice size is fixed (``micro_batch``), or chosen from the graph's
activation estimate: never above plain inference of the same batch by default, within a memory budget or near the
floor with ``max_memory_mb`` (MB or ``"auto"``; see runtime.memory). All are deterministic, so reruns give the same
bytes.

Only inputs with a free leading (sample) dimension are sliced. A model fed a static input (no sample axis, e.g. a
recurrent state or a sample rate) is run whole: slicing it would need the static input's own batch axis.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fps_graph.errors import OptionError
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.observe import Observer, augment
from fps_graph.runtime.memory import (AUTO, ActivationEstimate, Footprint, _tensor_bytes, auto_cap,
                                     check_max_memory, even_slices, micro_batch_for, skeleton, within_plain)
from fps_graph.formats.stats import Stats


def check_micro(micro_batch: int | None, max_memory_mb: float | str | None) -> None:
    """Refuse a micro-batch that is not a positive integer, a bad budget, or both given at once."""
    if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, (int, np.integer))
                                    or micro_batch < 1):
        raise OptionError(f"micro-batch must be a positive number of samples (got {micro_batch!r})")
    check_max_memory(max_memory_mb)
    if micro_batch is not None and max_memory_mb is not None:
        raise OptionError("give a micro-batch size or a memory budget, not both")


def merge_in_order(parts: Sequence[Stats]) -> Stats:
    """The partial sums added in slice order, starting from the first."""
    total = parts[0]
    for p in parts[1:]:
        total = total.merge(p)
    return total


class MicroBatcher:
    """Decides how a batch is sliced: by a fixed size, else by the graph's activation estimate (runtime.memory).

    With in-graph reduction a batch is sliced so that the observed graph never needs more activation memory than
    plain inference of the same batch (the default), and further to fit ``max_memory_mb`` (MB, or ``"auto"``).
    Host reduction returns every observed activation whole, so it is sliced only by an explicit size or budget.
    """

    def __init__(self, model: OnnxModel | None, observers: list[Observer], kinds: tuple[str, ...], reduce: str,
                 session_inputs: Sequence[Any], micro_batch: int | None = None,
                 max_memory_mb: float | str | None = None):
        self.micro_batch = micro_batch
        self.max_memory_mb = max_memory_mb
        self.sample_inputs = {i.name for i in session_inputs if i.shape and not isinstance(i.shape[0], int)}
        self.static_inputs = [i.name for i in session_inputs if i.name not in self.sample_inputs]
        self.chosen: list[int] = []        # slice size used for each batch (for the run's summary)
        self.sliced = False
        self._footprints: dict[tuple, tuple[Footprint, Footprint | None]] = {}
        self._estimate: ActivationEstimate | None = None
        self._plain: ActivationEstimate | None = None
        self.weights = 0
        self.estimated = model is not None and micro_batch is None and not self.static_inputs and (
            reduce == "graph" or max_memory_mb is not None)
        if self.estimated:
            skel = skeleton(model.proto)
            inits = {t.name: t for t in model.graph.initializer}
            observed = augment(skel, observers, mode=reduce, stats=kinds)
            used = {i.name for i in observed.graph.input if i.name in inits}
            self.weights = int(sum(_tensor_bytes(inits[n]) for n in used))
            self._estimate = ActivationEstimate(observed, used)
            if reduce == "graph":   # plain inference of the unmodified model: the default's ceiling
                self._plain = ActivationEstimate(skel, set(inits) & {i.name for i in skel.graph.input})

    @property
    def active(self) -> bool:
        """Whether batches may be sliced at all."""
        return (self.micro_batch is not None or self.estimated) and not self.static_inputs

    def footprints(self, batch: dict[str, np.ndarray]) -> tuple[Footprint, Footprint | None]:
        """Activation bytes (fixed + per sample) of the observed graph and of plain inference, for batches shaped
        like this one; estimated once per shape."""
        assert self._estimate is not None
        key = tuple(sorted((k, tuple(v.shape[1:])) for k, v in batch.items() if k in self.sample_inputs))
        if key not in self._footprints:
            shapes = {k: tuple(int(d) for d in v.shape) for k, v in batch.items()}
            plain = self._plain.footprint(shapes, self.sample_inputs) if self._plain is not None else None
            self._footprints[key] = (self._estimate.footprint(shapes, self.sample_inputs), plain)
        return self._footprints[key]

    def footprint(self, batch: dict[str, np.ndarray]) -> Footprint:
        """The observed graph's activation bytes for batches shaped like this one."""
        return self.footprints(batch)[0]

    def size(self, batch: dict[str, np.ndarray], n: int) -> int:
        """Samples per slice for this batch (n: run it whole)."""
        if not self.active or n <= 1:   # one sample cannot be sliced: no estimate needed
            return n
        if self.micro_batch is not None:
            return min(n, int(self.micro_batch))
        observed, plain = self.footprints(batch)
        most = n
        if plain is not None:
            most = min(most, within_plain(observed, plain, n))
        if self.max_memory_mb == AUTO:
            most = min(most, max(1, observed.samples_within(auto_cap(self.weights))))
        elif self.max_memory_mb is not None:
            most = min(most, micro_batch_for(float(self.max_memory_mb), self.weights, observed))
        return even_slices(n, most)

    def slice_size(self) -> int:
        """The largest number of samples run at once when batches were sliced, else 0."""
        return max(self.chosen) if self.active and self.sliced else 0

    def split(self, batch: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]] | None:
        """The batch's slices in order, or None when it runs whole."""
        m = self.size(batch, n)
        self.chosen.append(m)
        if m >= n:
            return None
        self.sliced = True
        return [{k: (v[i:i + m] if k in self.sample_inputs else v) for k, v in batch.items()}
                for i in range(0, n, m)]
