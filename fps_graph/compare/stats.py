"""Paired differences between two methods run on the same seeds (and points): the statistics of every quality
table (``fps-graph compare``, bench/quality, bench/quality_lm).

Runs are records ``{"method", "point", "seed", "metrics": {metric: value}}``; a *point* is a budget or any other
setting both methods ran at. Two methods are compared only where both ran the same (point, seed), so the
difference removes what the seed and the point share (the data order, a new head's initialisation, the split).
Differences are in percentage points of the metric (x100): accuracy 0.81 vs 0.79 is +2.0.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["paired", "paired_seeds", "format_paired"]


def _index(runs: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, str, int], float]:
    return {(r["method"], r["point"], r["seed"]): float(r["metrics"][metric]) for r in runs
            if metric in r.get("metrics", {})}


def _summary(d: np.ndarray) -> dict[str, Any]:
    if d.size == 0:
        return {"n": 0}
    sem = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"n": int(d.size), "mean_pp": float(d.mean()), "sem_pp": sem, "share_ge": float(np.mean(d >= 0))}


def paired(runs: Sequence[dict[str, Any]], a: str, b: str, metric: str, points: Sequence[str]) -> dict[str, Any]:
    """Mean of (a - b) x 100 over every (point, seed) both ran, its standard error over those pairs, and the share
    of pairs where a >= b: ``{"n", "mean_pp", "sem_pp", "share_ge"}`` (``{"n": 0}`` when no pair exists)."""
    idx = _index(runs, metric)
    d = np.array([idx[(a, p, s)] - idx[(b, p, s)] for (m, p, s) in idx
                  if m == a and p in points and (b, p, s) in idx]) * 100
    return _summary(d)


def paired_seeds(runs: Sequence[dict[str, Any]], a: str, b: str, metric: str,
                 points: Sequence[str]) -> dict[str, Any]:
    """Like ``paired``, but each seed's mean difference over the points is one sample: the standard error is over
    seeds only, since the points of one seed share the training split and order and are not independent."""
    idx = _index(runs, metric)
    seeds = sorted({s for (m, p, s) in idx if m == a})
    per = [np.mean([idx[(a, p, s)] - idx[(b, p, s)] for p in points if (a, p, s) in idx and (b, p, s) in idx])
           for s in seeds if any((a, p, s) in idx and (b, p, s) in idx for p in points)]
    return _summary(np.array(per) * 100)


def format_paired(c: dict[str, Any]) -> str:
    """A table cell: ``+1.23 ± 0.45`` (bold when the mean is at least two standard errors from 0), ``+1.23 (n=1)``
    for a single pair, empty when there is none."""
    if not c.get("n"):
        return ""
    if c["n"] < 2:
        return f"{c['mean_pp']:+.2f} (n=1)"
    mark = "**" if c["mean_pp"] != 0 and abs(c["mean_pp"]) >= 2 * c["sem_pp"] else ""
    return f"{mark}{c['mean_pp']:+.2f} ± {c['sem_pp']:.2f}{mark}"
