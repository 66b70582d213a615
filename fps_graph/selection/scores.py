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

import numpy as np

from fps_graph.errors import DataError, OptionError
from fps_graph.graph.layers import apply_chain
from fps_graph.graph.model import OnnxModel
from fps_graph.graph.plan import WeightGroup
from fps_graph.formats.stats import Stats
from fps_graph.selection.variants import VARIANTS, variant_score

SCORES = ("fps", "wanda", "magnitude", "random", "gd-fps") + tuple(VARIANTS)   # variants: selection/variants.py
STATS = ("mean-abs", "l2")


def default_stat(score: str) -> str | None:
    """The activation statistic a score uses by default (None: no activations needed)."""
    if score in VARIANTS:
        return VARIANTS[score].stat
    return {"fps": "mean-abs", "wanda": "l2", "gd-fps": "mean-abs"}.get(score)


def _pooled_mean(group: WeightGroup, stats: Stats, stat: str) -> np.ndarray:
    """Per-connection statistic in the primary's canonical layout, pooled over all consumers."""
    kind = {"mean-abs": "abs", "l2": "sq"}[stat]
    if len(group.layers) == 1:
        return group.primary.stat_to_canonical(stats.mean(group.primary.node, stat))
    n = group.size
    sums = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.float64)
    for layer in group.layers:
        if kind not in stats.sums.get(layer.node, {}):
            stats.mean(layer.node, stat)   # raises naming the missing layer
        idx = layer.canonical_index()
        s = np.broadcast_to(layer.stat_to_canonical(stats.sums[layer.node][kind]), idx.shape)
        sums[idx.reshape(-1)] += s.reshape(-1)
        count = stats.counts.get(layer.node, 0.0)     # per value for ConvTranspose taps (selection.stats)
        if np.ndim(count):
            count = np.broadcast_to(layer.stat_to_canonical(count), idx.shape).reshape(-1)
        counts[idx.reshape(-1)] += count
    if not any(stats.reached(layer.node) for layer in group.layers):
        raise DataError(f"weight {group.weight} saw no data (none of its layers ran)")
    # a consumer that did not run (the untaken branch of an If) adds zero sums and a zero count
    pidx = group.primary.canonical_index()
    mean = sums[pidx] / np.maximum(counts[pidx], 1e-300)
    return np.sqrt(mean) if kind == "sq" else mean


def input_statistic(group: WeightGroup, stats: Stats, stat: str) -> np.ndarray:
    """The activation statistic (mean-abs: E|x|; l2: rms) of each input connection of a weight, broadcastable to
    its canonical [out, fan_in] layout (usually [1, fan_in]), pooled over the weight's consumers."""
    return np.asarray(_pooled_mean(group, stats, stat), dtype=np.float64)


BLOCK_ELEMENTS = 1 << 20   # scores are made 8 MB of float64 at a time (a block of whole output rows)


class WeightScores:
    """The scores of one weight, made on demand by blocks of output rows in float64.

    The weight stays in its own dtype (a canonical view of the stored array, no copy where the layout allows);
    each block is |W| promoted to float64 and multiplied by the activation statistic, so the numbers are those of
    the whole-weight float64 product, bit for bit, without a float64 copy of the weight (issue 12: 14 s and GBs
    of float64 copies on a 1.1B decoder).
    """

    def __init__(self, group: WeightGroup, model: OnnxModel, score: str, stats: Stats | None = None,
                 stat: str | None = None, anchor: Stats | None = None, seed: int = 0, eps: float = 1e-6):
        layer = group.primary
        self.shape = layer.canonical_shape
        self._full: np.ndarray | None = None
        self._act: np.ndarray | None = None
        if score == "random":
            rng = np.random.default_rng([seed, zlib.crc32(group.weight.encode())])
            self._full = rng.random(self.shape)
            return
        self._w = layer.to_canonical(apply_chain(model.tensor(layer.weight), layer.chain, values=True, model=model))
        if score == "magnitude":
            return
        if stats is None:
            raise OptionError(f"score {score!r} needs activation statistics")
        if score in VARIANTS:   # selection/variants.py; scored whole
            self._full = variant_score(score, group.weight, np.abs(self._w, dtype=np.float64),
                                       lambda st: _pooled_mean(group, stats, stat or st),
                                       None if anchor is None else (lambda st: _pooled_mean(group, anchor, stat or st)),
                                       seed)
            return
        stat = stat or default_stat(score)
        act = _pooled_mean(group, stats, stat)
        if score == "gd-fps":
            if anchor is None:
                raise OptionError("--score gd-fps needs --anchor DATA (or --anchor-stats FILE)")
            act = act / (_pooled_mean(group, anchor, stat) + eps)
        self._act = np.asarray(act, dtype=np.float64)

    @property
    def block_rows(self) -> int:
        """Rows per block (at least one)."""
        return max(1, BLOCK_ELEMENTS // max(1, self.shape[1]))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float64 scores of output rows [start, stop)."""
        if self._full is not None:
            return self._full[start:stop]
        out = self._w[start:stop].astype(np.float64)   # then abs in place: ~1.5x faster than abs(dtype=float64)
        np.abs(out, out=out)
        if self._act is not None:
            act = self._act if self._act.shape[0] == 1 else self._act[start:stop]
            np.multiply(out, act, out=out)
        return out

    def argmax_rows(self) -> np.ndarray | None:
        """Per output row, the position of its best score (ties: the lowest), or None where a score is not finite
        (the caller then ranks by the sorted reference). The same float64 scores as ``rows``, but read in the
        stored layout: a MatMul weight is stored [in, out], so its canonical rows are strided columns, and copying
        them block by block cost as much as the scoring; here blocks of stored rows update a running best per
        column instead (2x faster on a 2048 x 5632 weight; issue 19)."""
        if self._full is not None or (self._act is not None and self._act.shape[0] != 1):
            return None
        act = None if self._act is None else self._act.reshape(-1)
        stored = self._w.T
        if not stored.flags.c_contiguous:     # canonical rows are contiguous: rank them block by block
            out = []
            for start, block in self.blocks():
                best = block.argmax(axis=1)
                if not np.all(np.isfinite(block[np.arange(block.shape[0]), best])):   # NaN/inf win argmax
                    return None
                out.append(best)
            return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
        cols = stored.shape[1]
        best_val = np.full(cols, -1.0)
        best_pos = np.zeros(cols, dtype=np.int64)
        step = max(1, BLOCK_ELEMENTS // max(1, cols))
        every = np.arange(cols)
        for start in range(0, stored.shape[0], step):
            block = stored[start:start + step].astype(np.float64)
            np.abs(block, out=block)
            if act is not None:
                np.multiply(block, act[start:start + step, None], out=block)
            pos = block.argmax(axis=0)
            val = block[pos, every]
            if not np.all(np.isfinite(val)):
                return None
            better = val > best_val        # strictly: an earlier block keeps a tie (the lower position)
            best_val[better] = val[better]
            best_pos[better] = pos[better] + start
        return best_pos

    def blocks(self):
        """(first row, float64 scores) for consecutive blocks of rows covering the weight."""
        step = self.block_rows
        for start in range(0, self.shape[0], step):
            yield start, self.rows(start, min(start + step, self.shape[0]))

    def full(self) -> np.ndarray:
        """float64 [out, fan_in] scores of the whole weight."""
        return self.rows(0, self.shape[0])


def score_weight(group: WeightGroup, model: OnnxModel, score: str, stats: Stats | None = None,
                 stat: str | None = None, anchor: Stats | None = None, seed: int = 0,
                 eps: float = 1e-6) -> np.ndarray:
    """float64 [out, fan_in] scores of one weight."""
    return WeightScores(group, model, score, stats, stat, anchor, seed, eps).full()
