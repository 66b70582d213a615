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
