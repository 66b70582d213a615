"""Coverage-aware top-K, the choice behind ``--score fps-cover`` (the score itself: selection/scores/fps_cover.py).

No input feature (column of the canonical [out, fan_in] weight) is taken by more than
``ceil(COVER_SLACK * chosen / fan_in)`` output neurons of a tensor; the per-neuron counts are those of the plain
ranking (a budget is split over tensors by size, then evenly over each tensor's neurons).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from fps_graph.errors import OptionError
from fps_graph.selection.ranking import apportion, per_row_counts
from fps_graph.selection.scores import exp_keys  # noqa: F401  (its former home: tests and bench import it here)

COVER_SLACK = 2.0   # a column may take up to twice its even share of a tensor's chosen entries


# ------------------------------------------------------------------------------------------ coverage-aware top-K


def cover_cap(chosen: int, cols: int) -> int:
    """Most neurons that may take one input feature: COVER_SLACK times its even share, at least 1."""
    return max(1, math.ceil(COVER_SLACK * chosen / max(cols, 1)))


def cover_rows(score: np.ndarray, ks: np.ndarray, cap: int) -> np.ndarray:
    """Sorted flat positions: ks[i] entries of row i, no column taken more than cap times.

    The result is the greedy one (best entry of the whole tensor first, ties to the lower row then column, taken
    unless its row is full or its column at cap), found by deferred acceptance: rows propose their best untried
    columns, each column keeps its best cap proposals. Rows whose columns all fill (only possible when
    sum(ks) > cap * columns) finish with their best remaining columns, ignoring the cap.
    """
    rows, cols = score.shape
    ks = np.minimum(np.broadcast_to(np.asarray(ks, dtype=np.int64), (rows,)), cols)
    if rows == 0 or cols == 0 or not ks.any():
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-score, axis=1, kind="stable")
    ptr = np.zeros(rows, dtype=np.int64)
    held = np.zeros((rows, cols), dtype=bool)
    need = ks.copy()
    span = np.arange(cols)[None, :]
    while True:
        need = np.where(ptr < cols, need, 0)
        if not need.any():
            break
        window = (span >= ptr[:, None]) & (span < (ptr + need)[:, None])
        prow = np.nonzero(window)[0]
        held[prow, order[window]] = True
        ptr += need
        load = held.sum(axis=0)
        over = np.flatnonzero(load > cap)
        if over.size:
            r, c = np.nonzero(held[:, over])
            c = over[c]
            rank_order = np.lexsort((r, -score[r, c], c))        # per column: best score, then lower row
            r, c = r[rank_order], c[rank_order]
            start = np.searchsorted(c, c, side="left")
            drop = (np.arange(c.size) - start) >= cap
            held[r[drop], c[drop]] = False
        need = ks - held.sum(axis=1)
    short = np.flatnonzero(held.sum(axis=1) < ks)
    for i in short:   # capacity ran out: best remaining columns of the row
        free = order[i][~held[i, order[i]]]
        held[i, free[: ks[i] - held[i].sum()]] = True
    return np.flatnonzero(held)


def select_cover(n_weights: int, shapes: Sequence[tuple[int, int]], score_fn: Callable[[int], np.ndarray],
                 k: int | None = None, budget: Any = None, granularity: str = "neuron",
                 names: Sequence[str] | None = None, row_blocks: Any = None) -> tuple[list[np.ndarray], list[str]]:
    """``ranking.select`` for coverage-aware scores: the same per-neuron counts (a budget is split over tensors by
    size, then evenly over each tensor's neurons), chosen with cover_rows (row_blocks: unused, whole weights)."""
    if (k is None) == (budget is None):
        raise OptionError("give exactly one of k or budget")
    if granularity == "network":
        raise OptionError("coverage-aware scores spread each tensor's count over its neurons; use a per-neuron "
                            "or per-layer budget, not a network-wide one")
    warnings: list[str] = []
    if k is not None:
        if k < 1:
            raise OptionError(f"k must be at least 1 (got {k})")
        counts = [np.full(r, min(k, c), dtype=np.int64) for r, c in shapes]
        clamped = [(c, names[i] if names else f"#{i}") for i, (r, c) in enumerate(shapes) if k > c]
        if clamped:
            cols, name = min(clamped)
            warnings.append(f"K={k} exceeds the fan-in of {len(clamped)} tensor(s) (smallest: {cols} in {name}); "
                            "K was clamped to the fan-in there, so all their connections are selected")
    else:
        sizes = [r * c for r, c in shapes]
        per = apportion(budget.resolve(int(sum(sizes))), sizes)
        counts = [per_row_counts(n, r) for n, (r, c) in zip(per, shapes)]
    out = []
    for i, ks in enumerate(counts):
        out.append(cover_rows(score_fn(i), ks, cover_cap(int(ks.sum()), shapes[i][1])))
    return out, warnings


__all__ = ["COVER_SLACK", "cover_cap", "cover_rows", "select_cover"]
