"""runtime.shards without Ray: shard plans, the fixed float64 grouping of collect_stats, the work folder's checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fps_graph.errors import FpsGraphError
from fps_graph.graph.layers import find_layers
from fps_graph.graph.model import load_model
from fps_graph.runtime.calibrate import BatchStats, collect_stats
from fps_graph.runtime.shards import Workdir, batch_groups, order_digest, plan_shards, shard_batches
from fps_graph.selection.stats import Stats

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"


def test_shard_plan_is_whole_batches_in_order():
    assert shard_batches(8, 16) == 2 and shard_batches(8, 17) == 3 and shard_batches(32, 1) == 1
    with pytest.raises(FpsGraphError, match="at least 1 sample"):
        shard_batches(8, 0)
    order = np.random.default_rng(0).permutation(45)
    batches = batch_groups(object(), order, 8)                 # a source without batches(): plain slices
    shards = plan_shards(batches, 2)
    assert [s.samples for s in shards] == [16, 16, 13] and [s.start for s in shards] == [0, 16, 32]
    assert np.array_equal(np.concatenate([b for s in shards for b in s.batches]), order)
    assert order_digest(shards) == order_digest(plan_shards(batches, 2))
    assert order_digest(shards) != order_digest(plan_shards(batches, 3))           # other boundaries
    assert order_digest(shards) != order_digest(plan_shards(batch_groups(object(), order[::-1], 8), 2))


@pytest.fixture(scope="module")
def sample_batches():
    model = load_model(SAMPLE)
    layers, _ = find_layers(model)
    rng = np.random.default_rng(3)
    batches = [{"input": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)} for n in (4, 4, 4, 4, 4, 3)]
    return model, layers, batches


@pytest.mark.parametrize("per_shard", [None, 1, 2, 4])
def test_collect_stats_adds_shard_sums_in_order(sample_batches, per_shard):
    """collect_stats == (sum of each shard's batch sums, from zero) added shard by shard, to the last bit."""
    model, layers, batches = sample_batches
    step = BatchStats(model, layers, kinds=("abs", "sq"), reduce="host")
    partials = [step(b) for b in batches]
    step.close()
    size = per_shard or len(batches)
    want: dict[tuple[str, str], np.ndarray] = {}
    for i in range(0, len(batches), size):
        shard: dict[tuple[str, str], np.ndarray] = {}
        for p in partials[i:i + size]:
            for node, slot in p.sums.items():
                for kind, arr in slot.items():
                    shard[node, kind] = shard[node, kind] + arr if (node, kind) in shard else arr.copy()
        for key, arr in shard.items():
            want[key] = want[key] + arr if key in want else arr.copy()
    st, info = collect_stats(model, layers, batches, kinds=("abs", "sq"), reduce="host", shard_batches=per_shard)
    assert st.num_samples == info.samples == 23
    for (node, kind), arr in want.items():
        assert np.array_equal(st.sums[node][kind], arr), (node, kind)


def test_grouping_changes_last_bits(sample_batches):
    """The grouping is part of the definition: here, other shards give other bits (so the tests above can fail)."""
    model, layers, batches = sample_batches
    a, _ = collect_stats(model, layers, batches, kinds=("sq",), reduce="host", shard_batches=None)
    b, _ = collect_stats(model, layers, batches, kinds=("sq",), reduce="host", shard_batches=2)
    assert any(not np.array_equal(a.sums[n]["sq"], b.sums[n]["sq"]) for n in a.sums)
    assert all(np.allclose(a.sums[n]["sq"], b.sums[n]["sq"], rtol=1e-12, atol=0) for n in a.sums)


def _job(**changes):
    job = {"format": "fps-graph-shards", "version": 1, "model_sha256": "ab" * 32, "kinds": ["abs"], "shards": 2}
    job.update(changes)
    return job


def _stats(n: int, sha: str = "ab" * 32) -> Stats:
    st = Stats(model_sha256=sha, kinds=("abs",), num_samples=n)
    st.add("fc", "abs", np.arange(4, dtype=np.float64))
    st.add_count("fc", 4.0 * n)
    return st


def test_workdir_new_resume_and_checks(tmp_path):
    shards = plan_shards(batch_groups(object(), np.arange(12), 3), 2)        # 2 shards of 6
    root = tmp_path / "work"
    wd = Workdir(root, "calibration", _job(), shards, resume=False)
    assert wd.open() == set()
    assert json.loads((root / "calibration" / "job.json").read_text())["model_sha256"] == "ab" * 32
    wd.save(0, _stats(6))
    (root / "calibration" / ".shard-000001.safetensors.x1y2.tmp").write_bytes(b"half")   # a killed driver's
    with pytest.raises(FpsGraphError, match="in use by another run"):
        Workdir(root, "calibration", _job(), shards, resume=True).open()
    wd.close()

    with pytest.raises(FpsGraphError, match="already holds shards of a run"):
        Workdir(root, "calibration", _job(), shards, resume=False).open()
    with pytest.raises(FpsGraphError, match=r"made with kinds = \[\"abs\"\], this run has \[\"sq\"\]"):
        Workdir(root, "calibration", _job(kinds=["sq"]), shards, resume=True).open()
    with pytest.raises(FpsGraphError, match="nothing to resume"):
        Workdir(tmp_path / "empty", "calibration", _job(), shards, resume=True).open()

    again = Workdir(root, "calibration", _job(), shards, resume=True)
    assert again.open() == {0}
    assert not list((root / "calibration").glob(".shard-*.tmp"))
    assert np.array_equal(again.load(shards[0], []).sums["fc"]["abs"], np.arange(4.0))
    again.save(1, _stats(5))                                      # one sample short of shard 1
    with pytest.raises(FpsGraphError, match="holds 5 samples, shard 1 has 6; delete"):
        again.load(shards[1], [])
    again.save(1, _stats(6, sha="cd" * 32))
    with pytest.raises(FpsGraphError, match="computed on another model"):
        again.load(shards[1], [])
    again.close()
    # a new label in a resumed folder starts fresh (the anchor data of gd-fps)
    anchor = Workdir(root, "anchor", _job(), shards, resume=True)
    assert anchor.open() == set() and (root / "anchor" / "job.json").is_file()
    anchor.close()
