"""Selection variants (fps_graph.selection.variants) against NumPy references: exact indices on small matrices and
on the exported test models (statistics from PyTorch hooks, sampling keys redrawn independently)."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from fps_graph.errors import FpsGraphError
from fps_graph.selection.pipeline import SelectOptions, run_select
from fps_graph.selection.ranking import Budget
from fps_graph.selection.variants import COVER_SLACK, cover_cap, cover_rows, exp_keys, select_cover

from conftest import make_data
from oracle import hook_stats, topk_oracle, torch_scores


def greedy_cover(score: np.ndarray, ks, cap: int) -> np.ndarray:
    """Reference: every entry in order of (score desc, row, column), taken unless its row is full or its column
    holds cap entries; rows left short then take their best untaken columns."""
    rows, cols = score.shape
    ks = np.broadcast_to(np.minimum(np.asarray(ks), cols), (rows,))
    mask = np.zeros(score.shape, dtype=bool)
    for _, r, c in sorted((-score[r, c], r, c) for r in range(rows) for c in range(cols)):
        if mask[r].sum() < ks[r] and mask[:, c].sum() < cap:
            mask[r, c] = True
    for r in range(rows):
        for c in sorted(range(cols), key=lambda c: (-score[r, c], c)):
            if mask[r].sum() >= ks[r]:
                break
            mask[r, c] = True
    return np.flatnonzero(mask)


def test_cover_rows_hand_example():
    # every row prefers column 0, then 1; a cap of 1 forces rows 1 and 2 elsewhere
    score = np.array([[9.0, 5, 1, 0],
                      [8.0, 7, 2, 1],
                      [7.0, 6, 3, 4]])
    assert cover_rows(score, np.array([1, 1, 1]), cap=1).tolist() == [0, 5, 11]
    # with a cap of 2, row 2 still loses column 0 (rows 0 and 1 score higher there) and takes column 1
    assert cover_rows(score, np.array([1, 1, 1]), cap=2).tolist() == [0, 4, 9]
    # K=2, cap 2, greedy order 9 (0,0), 8 (1,0), 7 (1,1), [7 (2,0): column 0 full], 6 (2,1), [5 (0,1): column 1
    # full], 4 (2,3), [3, 2: rows 1, 2 full], 1 (0,2)
    assert cover_rows(score, np.array([2, 2, 2]), cap=2).tolist() == [0, 2, 4, 5, 9, 11]


@pytest.mark.parametrize("seed", range(12))
def test_cover_rows_equals_greedy(seed):
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 12))
    score = rng.integers(0, 6, (rows, cols)).astype(np.float64)    # many ties
    ks = rng.integers(0, cols + 2, rows)
    for cap in (1, 2, cover_cap(int(np.minimum(ks, cols).sum()), cols)):
        got = cover_rows(score, ks, cap)
        assert got.tolist() == greedy_cover(score, ks, cap).tolist(), (rows, cols, ks.tolist(), cap)
        assert np.array_equal(np.bincount(got // cols, minlength=rows), np.minimum(ks, cols))


def test_cover_cap_and_spread():
    assert cover_cap(64, 8192) == 1 and cover_cap(1440, 256) == math.ceil(COVER_SLACK * 1440 / 256)
    rng = np.random.default_rng(0)
    # a few columns dominate every row (as after a large activation): plain top-2 takes only those
    score = rng.random((40, 50)) * np.r_[np.full(3, 100.0), np.ones(47)]
    plain = np.flatnonzero(topk_oracle(score, 2))
    cover = cover_rows(score, np.full(40, 2), cover_cap(80, 50))
    assert np.unique(plain % 50).size <= 3
    assert np.bincount(cover % 50, minlength=50).max() <= cover_cap(80, 50) and np.unique(cover % 50).size >= 20


def test_select_cover_counts_and_refusals():
    rng = np.random.default_rng(1)
    shapes = [(4, 6), (3, 5)]
    mats = [rng.random(s) for s in shapes]
    out, warn = select_cover(2, shapes, lambda i: mats[i], k=2)
    assert not warn and [len(o) for o in out] == [8, 6]
    out, _ = select_cover(2, shapes, lambda i: mats[i], budget=Budget(count=10), granularity="layer")
    # 10 split by size 24:15 -> 6 and 4 (largest remainder), then evenly over rows
    assert [len(o) for o in out] == [6, 4]
    assert np.bincount(out[0] // 6, minlength=4).tolist() == [2, 2, 1, 1]
    assert out[0].tolist() == greedy_cover(mats[0], [2, 2, 1, 1], cover_cap(6, 6)).tolist()
    _, warn = select_cover(2, shapes, lambda i: mats[i], k=6)
    assert warn and "clamped" in warn[0]
    with pytest.raises(FpsGraphError, match="network"):
        select_cover(2, shapes, lambda i: mats[i], budget=Budget(count=10), granularity="network")


def test_exp_keys_sample_in_proportion():
    # top-1 of score / Exp(1) picks each column with probability score / sum(score)
    e = exp_keys(3, "w", (40000, 4))
    picks = np.argmax(np.array([1.0, 2.0, 3.0, 4.0]) / e, axis=1)
    np.testing.assert_allclose(np.bincount(picks, minlength=4) / len(picks), [0.1, 0.2, 0.3, 0.4], atol=0.01)
    assert np.array_equal(exp_keys(3, "w", (2, 3)), exp_keys(3, "w", (2, 3)))
    assert not np.array_equal(exp_keys(3, "w", (2, 3)), exp_keys(4, "w", (2, 3)))


# --------------------------------------------------------------------------- end to end against PyTorch hooks


def canon_stat(model, stats: dict, kind: str) -> dict[str, np.ndarray]:
    """{weight name: E|x| ('abs') or sqrt(E x^2) ('sq') broadcast to [out, fan_in]} from hook sums."""
    from torch import nn

    out = {}
    for name, mod in model.named_modules():
        if name not in stats:
            continue
        a, s, cnt = stats[name]
        stat = a / cnt if kind == "abs" else np.sqrt(s / cnt)
        rows = mod.weight.shape[0]
        if isinstance(mod, nn.Conv2d):
            stat = np.repeat(stat.reshape(mod.groups, -1), mod.out_channels // mod.groups, axis=0)
        else:
            stat = stat.reshape(1, -1)
        out[f"{name}.weight"] = np.broadcast_to(stat, (rows, stat.shape[1]))
    return out


@pytest.mark.parametrize("name,exporter", [("mlp", "dynamo"), ("cnn", "legacy"), ("transformer", "dynamo")])
def test_variants_match_reference(exported, tmp_path, name, exporter):
    model, path, dpath, data = exported(name, exporter)
    anchor = make_data(name, 19, seed=7) * 0.5
    np.save(tmp_path / "anchor.npy", anchor)
    stats, _ = hook_stats(model, data)
    astats, _ = hook_stats(model, anchor)
    mag = torch_scores(model, stats, "magnitude")
    abs_d, sq_d, abs_a = canon_stat(model, stats, "abs"), canon_stat(model, stats, "sq"), canon_stat(model, astats, "abs")
    k = 2
    for score in ("fps-sample", "act-sample", "fps-cover", "gd-diff"):
        res = run_select(path, str(dpath), SelectOptions(score=score, k=k, seed=5, batch_size=8, provider="cpu",
                                                         anchor=str(tmp_path / "anchor.npy")))
        for key, idx in res.indices.items():
            rec = res.tensors[key]
            rows, cols = mag[key].shape
            keys_e = exp_keys(5, rec["onnx"], (rows, cols))
            if score == "fps-sample":
                ref = np.flatnonzero(topk_oracle(mag[key] * abs_d[key] / keys_e, k))
            elif score == "act-sample":
                ref = np.flatnonzero(topk_oracle(sq_d[key] / keys_e, k))
            elif score == "fps-cover":
                ks = min(k, cols)
                ref = greedy_cover(mag[key] * abs_d[key], np.full(rows, ks), cover_cap(rows * ks, cols))
            else:
                ref = np.flatnonzero(topk_oracle(mag[key] * np.abs(abs_d[key] - abs_a[key]), k))
            assert np.sort(idx).tolist() == ref.tolist(), (score, key)   # canonical == PyTorch layout here


def test_variant_options(exported, tmp_path):
    _, path, dpath, _ = exported("mlp", "dynamo")
    with pytest.raises(FpsGraphError, match="gd-diff needs --anchor"):
        run_select(path, str(dpath), SelectOptions(score="gd-diff", k=1, provider="cpu"))
    a = run_select(path, str(dpath), SelectOptions(score="fps-sample", k=2, seed=1, provider="cpu"))
    b = run_select(path, str(dpath), SelectOptions(score="fps-sample", k=2, seed=1, provider="cpu"))
    c = run_select(path, str(dpath), SelectOptions(score="fps-sample", k=2, seed=2, provider="cpu"))
    assert all(np.array_equal(a.indices[key], b.indices[key]) for key in a.indices)
    assert any(not np.array_equal(a.indices[key], c.indices[key]) for key in a.indices)
    assert a.metadata["score"] == "fps-sample" and a.metadata["stat"] == "mean-abs"
    with pytest.raises(FpsGraphError, match="network"):
        run_select(path, str(dpath), SelectOptions(score="fps-cover", budget=Budget(fraction=0.1),
                                                   granularity="network", k=None, provider="cpu"))
