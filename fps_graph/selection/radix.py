"""Network-wide ranking by radix select: the budget-th best score over every weight, in O(largest weight) memory.

Scores are produced one weight at a time by a callable; the threshold is found by a radix select over the float64
bit patterns (four histogram passes of 16-bit digits), ties broken by earlier weight in graph order, then lower
position. Shared by the plain network budget (``ranking``) and the one with a floor per layer (``floor``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fps_graph.errors import DataError

__all__ = ["ScoreFn", "network_threshold", "select_network", "topn_flat"]

ScoreFn = Callable[[int], np.ndarray]   # weight position -> float64 [out, fan_in] scores


def topn_flat(score: np.ndarray, n: int) -> np.ndarray:
    """Sorted flat canonical positions of the n best entries of a whole weight."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-score.reshape(-1), kind="stable")
    return np.sort(order[:n])


def _keys(score: np.ndarray) -> np.ndarray:
    """uint64 keys that sort like the float64 scores (all scores are >= 0; -0.0 folded onto 0.0)."""
    s = np.ascontiguousarray(score, dtype=np.float64).reshape(-1) + 0.0
    if np.any(s < 0) or np.any(np.isnan(s)):
        raise DataError("scores must be finite and non-negative")
    return s.view(np.uint64)


def network_threshold(n_weights: int, score_fn: ScoreFn, budget: int) -> tuple[np.uint64, int]:
    """The key of the budget-th best score over all weights, and how many keys equal to it are to be taken.

    Radix select on 16-bit digits, most significant first: each pass histograms only the keys that share the
    prefix found so far, so memory is that of one weight's scores.
    """
    prefix = np.uint64(0)
    need = budget
    for shift in (48, 32, 16, 0):
        hist = np.zeros(1 << 16, dtype=np.int64)
        high_mask = np.uint64(((1 << 64) - 1) ^ ((1 << (shift + 16)) - 1)) if shift < 48 else np.uint64(0)
        for i in range(n_weights):
            keys = _keys(score_fn(i))
            if shift < 48:
                keys = keys[(keys & high_mask) == prefix]
            digits = ((keys >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64)
            hist += np.bincount(digits, minlength=1 << 16)
        above = np.cumsum(hist[::-1])          # above[j] = number of keys with digit >= 65535 - j
        j = int(np.searchsorted(above, need))  # first digit (from the top) where the count reaches need
        digit = (1 << 16) - 1 - j
        more = int(above[j - 1]) if j > 0 else 0
        need -= more
        prefix = prefix | (np.uint64(digit) << np.uint64(shift))
    return prefix, need


def select_network(n_weights: int, score_fn: ScoreFn, budget: int) -> list[np.ndarray]:
    """Sorted flat canonical positions per weight of the global top-budget scores."""
    thr, ties = network_threshold(n_weights, score_fn, budget)
    out = []
    for i in range(n_weights):
        keys = _keys(score_fn(i))
        above = np.flatnonzero(keys > thr)
        equal = np.flatnonzero(keys == thr)
        take = equal[:ties]
        ties -= len(take)
        out.append(np.sort(np.concatenate([above, take])).astype(np.int64))
    return out
