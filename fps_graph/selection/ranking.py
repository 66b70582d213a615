"""Ranking scores into a selection: top-K per output neuron, or a budget per neuron, layer or network.

All rankings are by score, highest first, ties broken by the lower canonical position (row-major in
[out_features, fan_in]; for the network budget, earlier weight in graph order first). Scores are produced one
weight at a time by a callable, so memory stays O(largest weight) even for a network-wide budget, whose threshold
is found by a radix select over the float64 bit patterns (four histogram passes).
"""
from __future__ import annotations

import concurrent.futures as cf
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from fps_graph.errors import OptionError
from fps_graph.selection.floor import select_network_floor
from fps_graph.selection.radix import ScoreFn, select_network, topn_flat

GRANULARITIES = ("neuron", "layer", "network")
RowBlocksFn = Callable[[int], Iterable[tuple[int, np.ndarray]]]   # weight position -> (first row, scores) blocks


@dataclass
class Budget:
    """A budget as given: a fraction of the scored weights, or an absolute count."""

    fraction: float | None = None
    count: int | None = None

    def resolve(self, total: int) -> int:
        """Number of weights to select out of total."""
        n = self.count if self.count is not None else int(round(self.fraction * total))
        if n > total:
            raise OptionError(f"--budget {n} is more than the {total} scored weights")
        return max(n, 1)


def parse_budget(text: str) -> Budget:
    """'0.005' or '0.5%' (fractions, 0 < f <= 1) or '1000' (a count)."""
    t = text.strip()
    try:
        if t.endswith("%"):
            frac = float(t[:-1]) / 100.0
            if not 0 < frac <= 1:
                raise OptionError(f"--budget {text}: a percentage must be in (0, 100]")
            return Budget(fraction=frac)
        if re.fullmatch(r"[+-]?\d+", t):
            n = int(t)
            if n <= 0:
                raise OptionError(f"--budget {text}: a count must be positive")
            return Budget(count=n)
        frac = float(t)
    except ValueError as exc:
        raise OptionError(f"--budget {text!r}: expected a fraction (0.005), a percentage (0.5%) or a count (1000)"
                            ) from exc
    if not 0 < frac <= 1:
        raise OptionError(f"--budget {text}: a fraction must be in (0, 1]")
    return Budget(fraction=frac)


def _order_rows(score: np.ndarray) -> np.ndarray:
    """Per row, positions sorted by score descending, ties by lower position."""
    return np.argsort(-score, axis=1, kind="stable")


def _topk_rows_sorted(score: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """topk_rows by a full stable sort of every row (the reference; used when scores are not all finite)."""
    rows, cols = score.shape
    order = _order_rows(score)
    take = np.arange(cols)[None, :] < ks[:, None]
    flat = (order + (np.arange(rows) * cols)[:, None])[take]
    return np.sort(flat)


def topk_rows(score: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Sorted flat canonical positions of the top-k entries of every row (k may differ per row).

    A partial partition finds each row's k-th best score; every entry above it is taken, then the entries equal
    to it by lower position until the row has k: the same result as a stable sort, ~10x faster on ViT-B weights.
    """
    rows, cols = score.shape
    ks = np.broadcast_to(np.minimum(np.asarray(k), cols), (rows,)).astype(np.int64)
    if rows == 0 or cols == 0 or not np.all(np.isfinite(score)):
        return _topk_rows_sorted(score, ks)
    if np.all(ks == 1):   # argmax returns the first (lowest) position of each row's maximum
        return np.argmax(score, axis=1) + np.arange(rows) * cols
    live = ks > 0
    pos = np.where(live, cols - ks, 0)
    kth = np.unique(pos)
    thr = np.partition(score, int(kth[0]) if kth.size == 1 else kth, axis=1)[np.arange(rows), pos]
    thr = np.where(live, thr, np.inf)[:, None]
    take = score > thr
    equal = score == thr
    need = ks - take.sum(axis=1)
    crowded = np.flatnonzero(equal.sum(axis=1) > need)   # rows with more ties at the threshold than places
    if crowded.size:
        equal[crowded] &= np.cumsum(equal[crowded], axis=1) <= need[crowded, None]
    take |= equal
    return np.flatnonzero(take)


def apportion(total: int, sizes: Sequence[int]) -> list[int]:
    """Split total over parts in proportion to their sizes (largest remainder, ties to the earlier part)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    exact = total * sizes / sizes.sum()
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:rest]] += 1
    return [int(b) for b in base]


def per_row_counts(count: int, rows: int) -> np.ndarray:
    """count spread over rows as evenly as possible, the earlier rows taking the remainder."""
    ks = np.full(rows, count // rows, dtype=np.int64)
    ks[: count % rows] += 1
    return ks


def topk_blocks(blocks: Iterable[tuple[int, np.ndarray]], cols: int, k: int | np.ndarray) -> np.ndarray:
    """topk_rows over a weight given as blocks of whole rows (per-row ranking does not look across rows)."""
    parts = []
    for start, block in blocks:
        ks = k if np.ndim(k) == 0 else np.asarray(k)[start:start + block.shape[0]]
        parts.append(topk_rows(block, ks) + start * cols)
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, dtype=np.int64)


def select(n_weights: int, shapes: Sequence[tuple[int, int]], score_fn: ScoreFn, k: int | None = None,
           budget: Budget | None = None, granularity: str = "neuron",
           names: Sequence[str] | None = None,
           row_blocks: RowBlocksFn | None = None, min_per_layer: int = 0,
           row_argmax: Callable[[int], np.ndarray | None] | None = None,
           workers: int = 1) -> tuple[list[np.ndarray], list[str]]:
    """Sorted flat canonical positions per weight, and warnings (e.g. K clamped to a layer's fan-in).

    With row_blocks, the per-neuron rankings (--k, or a budget per neuron) read each weight's scores block by
    block, so no whole-weight float64 score array is made; the result is the same. With row_argmax (each row's
    best position, ties to the lowest, or None), K=1 takes it instead, the same result read in the stored layout.
    ``workers`` > 1 ranks that many weights at a time for --k (NumPy releases the GIL in its loops; each weight's
    ranking is independent and the results are kept in weight order, so the positions are the same).
    """
    warnings: list[str] = []
    if (k is None) == (budget is None):
        raise OptionError("give exactly one of --k or --budget")
    if granularity not in GRANULARITIES:
        raise OptionError(f"unknown granularity {granularity!r} (use {', '.join(GRANULARITIES)})")
    if min_per_layer and (budget is None or granularity != "network"):
        raise OptionError("a per-layer minimum applies to a network-wide budget only (--budget with "
                            "--granularity network); --k and the per-layer/per-neuron budgets give every layer a share")
    if k is not None:
        if k < 1:
            raise OptionError(f"--k must be at least 1 (got {k})")
        clamped = [(shapes[i][1], names[i] if names else f"#{i}") for i in range(n_weights) if k > shapes[i][1]]

        def one(i: int) -> np.ndarray:
            rows, cols = shapes[i]
            best = row_argmax(i) if (k == 1 and row_argmax is not None) else None
            if best is not None:
                return best.astype(np.int64) + np.arange(rows, dtype=np.int64) * cols
            return topk_blocks(row_blocks(i), cols, k) if row_blocks else topk_rows(score_fn(i), k)

        if workers > 1 and n_weights > 1:
            with cf.ThreadPoolExecutor(max_workers=workers) as pool:
                out = list(pool.map(one, range(n_weights)))
        else:
            out = [one(i) for i in range(n_weights)]
        if clamped:
            cols, name = min(clamped)
            warnings.append(f"K={k} exceeds the fan-in of {len(clamped)} tensor(s) (smallest: {cols} in {name}); "
                            "K was clamped to the fan-in there, so all their connections are selected")
        return out, warnings
    sizes = [r * c for r, c in shapes]
    total = budget.resolve(int(sum(sizes)))
    if granularity == "network":
        if min_per_layer:   # every weight keeps its own best min_per_layer entries (selection/floor.py)

            return select_network_floor(n_weights, sizes, score_fn, total, min_per_layer), warnings
        return select_network(n_weights, score_fn, total), warnings
    counts = apportion(total, sizes)
    out = []
    for i in range(n_weights):
        if granularity == "layer":
            out.append(topn_flat(score_fn(i), counts[i]))
        else:
            ks = per_row_counts(counts[i], shapes[i][0])
            out.append(topk_blocks(row_blocks(i), shapes[i][1], ks) if row_blocks else topk_rows(score_fn(i), ks))
    return out, warnings
