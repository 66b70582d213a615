"""Selection variants beyond the paper's rule, each a named ``--score`` (evidence in docs/quality.md).

Each one changes one thing about FPS that the quality experiments pointed at:

* ``fps-cover``: FPS scores, but no input feature (column of the canonical [out, fan_in] weight) is taken by more
  than ``ceil(COVER_SLACK * chosen / fan_in)`` output neurons of a tensor. Where the statistic is large for a few
  inputs, plain top-K per neuron gives every neuron the same few inputs; trained together those entries can only
  change the layer along those inputs.
* ``fps-sample``: K entries per neuron drawn without replacement with probability proportional to the FPS score
  (seeded), instead of the K largest: keeps FPS's preference but, like a random mask, spreads the entries.
* ``act-sample``: drawn in proportion to the input's root-mean-square activation alone: the gradient of a weight
  is the (back-propagated error) x (its input), so the input's scale bounds how fast that entry can move, while
  |W| (a pruning criterion) says nothing about it.
* ``gd-diff``: |W| * |E_data|x| - E_anchor|x||: the inputs whose statistic moved between the pre-training domain
  (the anchor) and the task data, in either direction (GD-FPS's ratio only rewards growth).

Sampling uses the Efraimidis-Spirakis keys score / E with E ~ Exp(1): ranking them and taking the top K draws K
entries without replacement, each draw proportional to the score of what is left. The keys are seeded per weight
like ``random``, so a selection is reproducible and the same on every shard.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fps_graph.errors import OptionError

COVER_SLACK = 2.0   # a column may take up to twice its even share of a tensor's chosen entries


@dataclass(frozen=True)
class Variant:
    """A named score: the activation statistic it reads, whether it needs anchor data, its one-line rationale."""

    stat: str | None
    anchor: bool
    cover: bool
    help: str


VARIANTS: dict[str, Variant] = {
    "fps-cover": Variant("mean-abs", False, True,
                         "FPS, but no input feature taken by more than 2x its share of a tensor's neurons "
                         "(top-K per neuron would give them all the same high-activation inputs)"),
    "fps-sample": Variant("mean-abs", False, False,
                          "K entries per neuron sampled in proportion to the FPS score (seeded) instead of the top K"),
    "act-sample": Variant("l2", False, False,
                          "sampled in proportion to the input's rms alone: it scales the weight's gradient; |W| does "
                          "not"),
    "gd-diff": Variant("mean-abs", True, False,
                       "|W| * |E_data|x| - E_anchor|x||: inputs whose statistic moved from the anchor, either way"),
}


def needs_anchor(score: str) -> bool:
    """Whether a score compares against anchor statistics (gd-fps and the variants built on it)."""
    return score == "gd-fps" or (score in VARIANTS and VARIANTS[score].anchor)


def exp_keys(seed: int, weight: str, shape: tuple[int, ...]) -> np.ndarray:
    """Exp(1) draws for one weight, seeded by (seed, weight name), in a stream apart from ``random``'s."""
    rng = np.random.default_rng([seed, zlib.crc32(weight.encode()), 1])
    return np.maximum(rng.standard_exponential(shape), np.finfo(np.float64).tiny)


def variant_score(score: str, weight: str, w: np.ndarray, act: Callable[[str], np.ndarray],
                  anchor_act: Callable[[str], np.ndarray] | None, seed: int) -> np.ndarray:
    """float64 [out, fan_in] scores of one weight for a variant.

    w: |W| in the canonical layout; act(stat) / anchor_act(stat): the data / anchor statistic broadcastable to it.
    """
    v = VARIANTS[score]
    if score in ("fps-cover", "fps-sample"):
        s = w * act(v.stat)
    elif score == "act-sample":
        s = np.broadcast_to(act(v.stat), w.shape)
    elif score == "gd-diff":
        if anchor_act is None:
            raise OptionError(f"score {score!r} needs anchor statistics (--anchor DATA or --anchor-stats FILE)")
        s = w * np.abs(act(v.stat) - anchor_act(v.stat))
    else:
        raise OptionError(f"unknown variant score {score!r}")
    if score.endswith("-sample"):
        return s / exp_keys(seed, weight, w.shape)
    return np.array(s, dtype=np.float64)


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
    from fps_graph.selection.ranking import apportion, per_row_counts

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


__all__ = ["VARIANTS", "Variant", "COVER_SLACK", "needs_anchor", "variant_score", "cover_cap", "cover_rows",
           "select_cover", "exp_keys"]
