"""A network-wide budget with a floor per layer (``--min-per-layer N``): no scored tensor is left with nothing.

A single network-wide ranking can leave a layer with 0 selected entries (a small conv or an embedding whose scores
sit below everyone else's). With a floor of N, every weight first gets its own N best entries (all of them when it
has fewer), and the rest of the budget goes to the best remaining entries of the whole network. Both steps use the
one order of `ranking`: score, highest first; ties by earlier weight in graph order, then by lower position. For
distinct scores this is the selection of largest total score among those of the budget's size with at least N
entries in every weight (tests/test_rough_edges.py checks it against an exhaustive search).

Memory stays that of one weight's scores: the fill step is the same radix select as `ranking.select_network`,
run over the keys left after each weight's reserved entries are taken out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fps_graph.errors import OptionError
from fps_graph.selection.radix import ScoreFn, _keys, network_threshold, topn_flat

__all__ = ["floor_counts", "select_network_floor"]


def floor_counts(sizes: Sequence[int], minimum: int, budget: int) -> list[int]:
    """Entries reserved per weight (minimum, or the whole weight when smaller); refuse floors over the budget."""
    if minimum < 0:
        raise OptionError(f"the per-layer minimum must not be negative (got {minimum})")
    counts = [min(int(minimum), int(s)) for s in sizes]
    if sum(counts) > budget:
        raise OptionError(f"a minimum of {minimum} per layer needs {sum(counts):,} entries over {len(counts)} "
                            f"tensors, more than the budget of {budget:,}; lower the minimum or raise the budget")
    return counts


def select_network_floor(n_weights: int, sizes: Sequence[int], score_fn: ScoreFn, budget: int,
                         minimum: int) -> list[np.ndarray]:
    """Sorted flat canonical positions per weight: each weight's top-`minimum`, then the network-wide best rest."""
    counts = floor_counts(sizes, minimum, budget)
    reserved = [topn_flat(score_fn(i), counts[i]) for i in range(n_weights)]
    rest = budget - sum(counts)
    if rest == 0:
        return reserved

    def remaining(i: int) -> np.ndarray:
        return np.delete(np.ascontiguousarray(score_fn(i), dtype=np.float64).reshape(-1), reserved[i])

    thr, ties = network_threshold(n_weights, remaining, rest)
    out = []
    for i in range(n_weights):
        keys = _keys(score_fn(i))
        free = np.ones(keys.size, dtype=bool)
        free[reserved[i]] = False
        above = np.flatnonzero(free & (keys > thr))
        take = np.flatnonzero(free & (keys == thr))[:ties]
        ties -= len(take)
        out.append(np.sort(np.concatenate([reserved[i], above, take])).astype(np.int64))
    return out
