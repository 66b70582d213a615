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
