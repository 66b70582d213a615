"""Ranking rules: top-K ties, budgets, apportioning, and the network-wide radix select against a full sort."""
from __future__ import annotations

import numpy as np
import pytest

from fps_graph.errors import FpsGraphError
from fps_graph.selection.ranking import Budget, apportion, parse_budget, select, select_network, topk_rows


def brute_network(scores, n):
    items = sorted((-s.reshape(-1)[j], i, j) for i, s in enumerate(scores) for j in range(s.size))[:n]
    out = [[] for _ in scores]
    for _, i, j in items:
        out[i].append(j)
    return [sorted(o) for o in out]


@pytest.mark.parametrize("seed", range(5))
def test_network_select_equals_full_sort_with_ties(seed):
    rng = np.random.default_rng(seed)
    # coarse values -> many ties, including across weights, and exact zeros
    scores = [np.round(rng.random((rng.integers(1, 9), rng.integers(1, 9))) * 6) / 6 for _ in range(6)]
    total = sum(s.size for s in scores)
    for n in (1, total // 3, total - 1, total):
        got = select_network(len(scores), lambda i: scores[i], n)
        assert [g.tolist() for g in got] == brute_network(scores, n)


def test_network_select_spans_exponents():
    rng = np.random.default_rng(3)
    scores = [np.exp(rng.normal(0, 20, (4, 5))) for _ in range(3)] + [np.zeros((2, 2)), np.full((1, 3), 1e-300)]
    for n in (1, 7, 30, 66):
        got = select_network(len(scores), lambda i: scores[i], n)
        assert [g.tolist() for g in got] == brute_network(scores, n)


def test_topk_ties_take_lower_index():
    s = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert topk_rows(s, 2).tolist() == [1, 2, 4, 5]
    assert topk_rows(s, np.array([1, 3])).tolist() == [1, 4, 5, 6]


def test_apportion_sums_exactly():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(apportion(1234, [7, 100, 3, 999])) == 1234


def test_k_larger_than_fan_in_is_clamped_with_a_warning():
    s = [np.ones((2, 3))]
    out, warnings = select(1, [(2, 3)], lambda i: s[i], k=5)
    assert out[0].tolist() == list(range(6))
    assert warnings and "smallest: 3 in #0" in warnings[0]



@pytest.mark.parametrize("k", [1, 3])
def test_workers_rank_weights_in_parallel_with_the_same_positions(k):
    """--k ranks several weights at a time (select's ``workers``): the positions, their order per weight and the
    warnings equal one worker's, and each weight's equal the sorted reference (ties included)."""
    rng = np.random.default_rng(4)
    shapes = [(int(rng.integers(1, 40)), int(rng.integers(1, 30))) for _ in range(23)]
    scores = [np.round(rng.random(s), 1) for s in shapes]            # rounded: many ties
    calls = []

    def argmax(i):
        calls.append(i)
        return scores[i].argmax(axis=1) if k == 1 else None

    one, w1 = select(len(shapes), shapes, lambda i: scores[i], k=k, row_argmax=argmax, workers=1)
    many, w4 = select(len(shapes), shapes, lambda i: scores[i], k=k, row_argmax=argmax, workers=4)
    assert w1 == w4 and len(one) == len(many) == len(shapes)
    for i, (a, b) in enumerate(zip(one, many)):
        assert np.array_equal(a, b)
        want = topk_rows(scores[i], k)
        assert np.array_equal(np.sort(a), np.sort(want)), i
    assert sorted(calls) == (sorted(list(range(len(shapes))) * 2) if k == 1 else [])

@pytest.mark.parametrize("text,frac,count", [("0.005", 0.005, None), ("0.5%", 0.005, None), ("1000", None, 1000),
                                             ("1.0", 1.0, None), ("100%", 1.0, None)])
def test_parse_budget(text, frac, count):
    b = parse_budget(text)
    assert b.count == count
    assert b.fraction == pytest.approx(frac) if frac is not None else b.fraction is None


@pytest.mark.parametrize("text", ["0", "-1", "0%", "101%", "1.5", "abc", "-0.1"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(FpsGraphError):
        parse_budget(text)


def test_budget_count_larger_than_total_is_refused():
    with pytest.raises(FpsGraphError, match="more than"):
        select(1, [(2, 2)], lambda i: np.ones((2, 2)), budget=Budget(count=5))


def brute_topk_rows(score, ks):
    """Per row, the k best by (score descending, position ascending), as sorted flat positions."""
    out = []
    for r, row in enumerate(score):
        best = sorted(range(row.size), key=lambda j: (-row[j], j))[: int(ks[r])]
        out += [r * row.size + j for j in best]
    return sorted(out)


@pytest.mark.parametrize("seed", range(40))
def test_topk_rows_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    levels = int(rng.integers(1, 5))   # few distinct values: many ties, often at the threshold
    score = np.floor(rng.random((rows, cols)) * levels) / levels
    if seed % 4 == 0:
        score[rng.random((rows, cols)) < 0.3] = 0.0
    for k in (1, 2, cols - 1, cols, cols + 3, rng.integers(0, cols + 2, rows)):
        ks = np.broadcast_to(np.minimum(np.maximum(np.asarray(k), 0), cols), (rows,))
        if np.all(ks == 0) and np.ndim(k) == 0:
            continue
        assert topk_rows(score, k).tolist() == brute_topk_rows(score, ks), k


def test_topk_rows_ties_all_equal_row_and_k1():
    s = np.array([[5.0, 5.0, 5.0], [1.0, 7.0, 7.0], [2.0, 2.0, 9.0]])
    assert topk_rows(s, 1).tolist() == [0, 4, 8]
    assert topk_rows(s, 2).tolist() == [0, 1, 4, 5, 6, 8]
    assert topk_rows(s, np.array([3, 0, 2])).tolist() == [0, 1, 2, 6, 8]


@pytest.mark.parametrize("seed", range(10))
def test_row_blocks_select_the_same_as_whole_weights(seed):
    rng = np.random.default_rng(seed)
    scores = [np.floor(rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 9)))) * 4) for _ in range(4)]
    shapes = [s.shape for s in scores]

    def blocks(i):
        step = int(rng.integers(1, 7))
        return ((r, scores[i][r:r + step]) for r in range(0, shapes[i][0], step))

    for kw in ({"k": 1}, {"k": 3}, {"budget": Budget(fraction=0.3)}, {"budget": Budget(count=7)}):
        whole, _ = select(4, shapes, lambda i: scores[i], **kw)
        blocked, _ = select(4, shapes, lambda i: scores[i], row_blocks=blocks, **kw)
        assert [w.tolist() for w in whole] == [b.tolist() for b in blocked]
        assert all(b.dtype == np.int64 for b in blocked)
