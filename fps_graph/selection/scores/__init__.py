"""Scores of every input connection of a weight, in its canonical [out_features, fan_in] layout.

Each score is one function in one file of this folder, registered with its properties (``_registry.py``):

* fps:       |W| * E|x_i|                       (FPS v1)
* wanda:     |W| * sqrt(E x_i^2)                (Wanda's l2 statistic)
* magnitude: |W|
* random:    uniform [0, 1), seeded per weight
* gd-fps:    |W| * E_data|x_i| / (E_anchor|x_i| + eps)
* the variants studied in docs/quality.md: fps-cover, fps-sample, act-sample, gd-diff

Every module here that does not start with an underscore is imported below, so a new file is a new ``--score``.
``WeightScores`` turns a registered score into float64 scores made on demand by blocks of output rows.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

import numpy as np

from fps_graph.selection.scores._registry import (STATS, Score, ScoreContext, WeightTimes, exp_keys, get_score,
                                                  pooled_mean, register, registered)

if TYPE_CHECKING:   # types only
    from fps_graph.formats.stats import Stats
    from fps_graph.graph.model import OnnxModel
    from fps_graph.graph.plan import WeightGroup

__all__ = ["Score", "ScoreContext", "WeightTimes", "register", "get_score", "registered", "score_names", "SCORES",
           "STATS", "default_stat", "WeightScores", "score_weight", "exp_keys", "pooled_mean", "input_statistic",
           "BLOCK_ELEMENTS"]

for _module in pkgutil.iter_modules(__path__):          # one file per score, each registering itself
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def score_names() -> tuple[str, ...]:
    """The names of every registered score, in listing order (the CLI's --score choices)."""
    return tuple(s.name for s in registered())


SCORES = score_names()
_pooled_mean = pooled_mean          # the former private name, still read by tests


def default_stat(score: str) -> str | None:
    """The activation statistic a score uses by default (None: no activations needed)."""
    return get_score(score).stat


def input_statistic(group: "WeightGroup", stats: "Stats", stat: str) -> np.ndarray:
    """The activation statistic (mean-abs: E|x|; l2: rms) of each input connection of a weight, broadcastable to
    its canonical [out, fan_in] layout (usually [1, fan_in]), pooled over the weight's consumers."""
    return np.asarray(pooled_mean(group, stats, stat), dtype=np.float64)


BLOCK_ELEMENTS = 1 << 20   # scores are made 8 MB of float64 at a time (a block of whole output rows)


class WeightScores:
    """The scores of one weight, made on demand by blocks of output rows in float64.

    A ``weight_times`` score keeps the weight in its own dtype (a canonical view of the stored array, no copy where
    the layout allows); each block is |W| promoted to float64 and multiplied by the factor, so the numbers are those
    of the whole-weight float64 product, bit for bit, without a float64 copy of the weight (issue 12: 14 s and GBs
    of float64 copies on a 1.1B decoder). Other scores come whole; a sampled score's entries are divided by
    seeded Exp(1) keys, so its top K is a draw in proportion to the score.
    """

    def __init__(self, group: "WeightGroup", model: "OnnxModel", score: str, stats: "Stats | None" = None,
                 stat: str | None = None, anchor: "Stats | None" = None, seed: int = 0, eps: float = 1e-6):
        entry = get_score(score)
        ctx = ScoreContext(entry, group, model, stats, stat, anchor, seed, eps)
        self.shape = ctx.shape
        self._full: np.ndarray | None = None
        self._w: np.ndarray | None = None
        self._act: np.ndarray | None = None
        out = entry.fn(ctx)
        if isinstance(out, WeightTimes) and not entry.sample:
            self._w, self._act = out.weight, out.factor
            return
        if isinstance(out, WeightTimes):                # sampled: the whole product first
            self._w, self._act = out.weight, out.factor
            out = self.rows(0, self.shape[0])
            self._w = self._act = None
        if entry.sample:
            self._full = out / exp_keys(seed, group.weight, self.shape)
        else:
            self._full = np.ascontiguousarray(np.broadcast_to(out, self.shape), dtype=np.float64)

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


def score_weight(group: "WeightGroup", model: "OnnxModel", score: str, stats: "Stats | None" = None,
                 stat: str | None = None, anchor: "Stats | None" = None, seed: int = 0,
                 eps: float = 1e-6) -> np.ndarray:
    """float64 [out, fan_in] scores of one weight."""
    return WeightScores(group, model, score, stats, stat, anchor, seed, eps).full()
