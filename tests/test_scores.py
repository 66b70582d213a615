"""Scores made by blocks of rows in the weight's dtype == the whole-weight float64 product, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from fps_graph.runtime.calibrate import collect_stats
from fps_graph.data.sources import Loader, open_source
from fps_graph.selection import scores as scores_mod
from fps_graph.selection.pipeline import make_plan, spec_list
from fps_graph.selection.scores import WeightScores, default_stat, _pooled_mean


def _reference(group, model, score, stats, anchor):
    """The former implementation: a float64 copy of the whole canonical weight, times the statistic."""
    layer = group.primary
    w = np.abs(np.ascontiguousarray(layer.to_canonical(layer.to_op(model.tensor(layer.weight))), dtype=np.float64))
    if score == "magnitude":
        return w
    act = _pooled_mean(group, stats, default_stat(score))
    if score == "gd-fps":
        act = act / (_pooled_mean(group, anchor, default_stat(score)) + 1e-6)
    return w * act


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_blocks_equal_whole_weight_float64(exported, monkeypatch, name):
    _, path, dpath, _ = exported(name, "legacy")
    plan = make_plan(path)
    loader = Loader(open_source(str(dpath), spec_list(plan.model)), batch_size=8)
    stats, _ = collect_stats(plan.model, plan.layers, loader, kinds=("abs", "sq"), provider="cpu")
    monkeypatch.setattr(scores_mod, "BLOCK_ELEMENTS", 50)   # several blocks per weight, uneven last block
    for score in ("fps", "wanda", "magnitude", "gd-fps"):
        for group in plan.groups:
            ws = WeightScores(group, plan.model, score, stats, None, stats)
            ref = _reference(group, plan.model, score, stats, stats)
            blocks = list(ws.blocks())
            assert len(blocks) == -(-ws.shape[0] // ws.block_rows)
            got = np.concatenate([b for _, b in blocks])
            assert got.dtype == np.float64 and got.tobytes() == ref.tobytes(), (score, group.weight)
            assert ws.full().tobytes() == ref.tobytes()


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_argmax_rows_equals_the_reference_ranking(exported, monkeypatch, name):
    """K=1 read in the stored layout (running best per column for [in, out] MatMul weights) picks what ranking
    the whole float64 scores picks, ties to the lower position; a non-finite score hands back to the reference."""
    from fps_graph.selection.ranking import topk_rows

    _, path, dpath, _ = exported(name, "legacy")
    plan = make_plan(path)
    loader = Loader(open_source(str(dpath), spec_list(plan.model)), batch_size=8)
    stats, _ = collect_stats(plan.model, plan.layers, loader, kinds=("abs", "sq"), provider="cpu")
    monkeypatch.setattr(scores_mod, "BLOCK_ELEMENTS", 50)   # several blocks, an uneven last one
    layouts = set()
    for score in ("fps", "magnitude"):
        for group in plan.groups:
            ws = WeightScores(group, plan.model, score, stats, None, stats)
            layouts.add(ws._w.T.flags.c_contiguous)
            want = topk_rows(_reference(group, plan.model, score, stats, stats), 1)
            got = ws.argmax_rows()
            if got is None:    # a grouped conv: each row its own statistic, ranked by the reference
                assert ws._act is not None and ws._act.shape[0] == ws.shape[0] > 1
                continue
            assert np.array_equal(got + np.arange(ws.shape[0]) * ws.shape[1], want), (score, group.weight)
            # ties: a weight of equal magnitudes picks the lowest position in every row, as the sort does
            ws._w = np.ones_like(np.asarray(ws._w)).T.copy().T if ws._w.T.flags.c_contiguous else \
                np.ones_like(np.asarray(ws._w))
            ws._act = None
            assert np.array_equal(ws.argmax_rows(), np.zeros(ws.shape[0], dtype=np.int64))
            bad = np.array(ws._w, dtype=np.float32)
            bad[0, -1] = np.nan
            ws._w = bad
            assert ws.argmax_rows() is None
    if name == "transformer":
        assert True in layouts      # MatMul weights ([in, out]) take the stored-layout path
