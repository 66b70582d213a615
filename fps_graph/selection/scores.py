"""Scores of every input connection of a weight, in its canonical [out_features, fan_in] layout.

* fps:       |W| * E|x_i|                       (FPS v1)
* wanda:     |W| * sqrt(E x_i^2)                (Wanda's l2 statistic)
* magnitude: |W|
* random:    uniform [0, 1), seeded per weight
* gd-fps:    |W| * E_data|x_i| / (E_anchor|x_i| + eps)   (our reading of FPS v2 / GD-FPS: "relative activation
             growth against a pre-training anchor"; the paper's exact formula is not public)

A weight read by several scored nodes (tied weights) pools the sums and counts of all its consumers per element.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from fps_graph.errors import FpsGraphError
from fps_graph.graph.layers import Layer
from fps_graph.graph.model import OnnxModel
from fps_graph.selection.stats import Stats

SCORES = ("fps", "wanda", "magnitude", "random", "gd-fps")
STATS = ("mean-abs", "l2")


def default_stat(score: str) -> str | None:
    """The activation statistic a score uses by default (None: no activations needed)."""
    return {"fps": "mean-abs", "wanda": "l2", "gd-fps": "mean-abs"}.get(score)


@dataclass
class WeightGroup:
    """One stored weight and the scored nodes that read it (the first one defines the canonical layout)."""

    weight: str
    layers: list[Layer]

    @property
    def primary(self) -> Layer:
        """The first consumer in graph order."""
        return self.layers[0]

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.primary.stored_shape))


def group_by_weight(layers: list[Layer]) -> list[WeightGroup]:
    """Weights in order of first use, each with its consumers."""
    groups: dict[str, WeightGroup] = {}
    for layer in layers:
        groups.setdefault(layer.weight, WeightGroup(layer.weight, [])).layers.append(layer)
    return list(groups.values())


def _pooled_mean(group: WeightGroup, stats: Stats, stat: str) -> np.ndarray:
    """Per-connection statistic in the primary's canonical layout, pooled over all consumers."""
    kind = {"mean-abs": "abs", "l2": "sq"}[stat]
    if len(group.layers) == 1:
        return group.primary.stat_to_canonical(stats.mean(group.primary.node, stat))
    n = group.size
    sums = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.float64)
    for layer in group.layers:
        stats.mean(layer.node, stat)   # raises if missing
        idx = layer.canonical_index()
        s = np.broadcast_to(layer.stat_to_canonical(stats.sums[layer.node][kind]), idx.shape)
        sums[idx.reshape(-1)] += s.reshape(-1)
        counts[idx.reshape(-1)] += stats.counts[layer.node]
    pidx = group.primary.canonical_index()
    mean = sums[pidx] / np.maximum(counts[pidx], 1e-300)
    return np.sqrt(mean) if kind == "sq" else mean


def score_weight(group: WeightGroup, model: OnnxModel, score: str, stats: Stats | None = None,
                 stat: str | None = None, anchor: Stats | None = None, seed: int = 0,
                 eps: float = 1e-6) -> np.ndarray:
    """float64 [out, fan_in] scores of one weight."""
    layer = group.primary
    if score == "random":
        rng = np.random.default_rng([seed, zlib.crc32(group.weight.encode())])
        return rng.random(layer.canonical_shape)
    w = np.abs(layer.canonical_weight(model))
    if score == "magnitude":
        return w
    if stats is None:
        raise FpsGraphError(f"score {score!r} needs activation statistics")
    stat = stat or default_stat(score)
    act = _pooled_mean(group, stats, stat)
    if score == "gd-fps":
        if anchor is None:
            raise FpsGraphError("--score gd-fps needs --anchor DATA (or --anchor-stats FILE)")
        act = act / (_pooled_mean(group, anchor, stat) + eps)
    return w * act
