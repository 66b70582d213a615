"""Micro-batching: a batch run as slices gives the masks of the whole batch, byte for byte; --max-memory picks the
slice from the graph's activation bytes per sample (checked on a graph whose live tensors are known by hand); bad
budgets are one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fps_graph.errors import FpsGraphError
from fps_graph.graph.layers import find_layers
from fps_graph.graph.model import load_model
from fps_graph.runtime.calibrate import BatchStats
from fps_graph.runtime.memory import MB, RUNTIME_MB, ARENA_SLACK, ActivationEstimate, Footprint, micro_batch_for
from fps_graph.runtime.micro import MicroBatcher, check_micro
from fps_graph.selection.pipeline import SelectOptions, run_select

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"


def _masks(path, data, **kw):
    res = run_select(path, str(data), SelectOptions(k=2, provider="cpu", batch_size=16, **kw))
    return res, {k: v.tobytes() for k, v in res.indices.items()}


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_micro_batched_masks_equal_whole_batch(exported, name):
    _, path, dpath, _ = exported(name, "legacy")
    whole, ref = _masks(path, dpath)
    assert whole.summary["micro_batch"] == 0
    for micro in (1, 3, 7):
        res, got = _masks(path, dpath, micro_batch=micro)
        assert got == ref, micro
        assert res.summary["micro_batch"] == micro and res.stats.num_samples == whole.stats.num_samples == 37
        for node, slot in whole.stats.sums.items():
            assert res.stats.counts[node] == whole.stats.counts[node]
            for kind, arr in slot.items():
                np.testing.assert_allclose(res.stats.sums[node][kind], arr, rtol=1e-6)


def test_max_memory_slices_batches_and_keeps_masks(exported):
    _, path, dpath, _ = exported("transformer", "legacy")
    _, ref = _masks(path, dpath)
    model = load_model(path)
    layers, _ = find_layers(model)
    step = BatchStats(model, layers, provider="cpu", max_memory_mb=RUNTIME_MB + 0.05)
    fp = step.micro.footprint({"input": np.zeros((16, 6, 10), np.float32)})
    assert fp.per_sample > 0
    expect = micro_batch_for(RUNTIME_MB + 0.05, step.micro.weights, fp)
    assert 1 <= expect < 16          # the budget forces slices on this model
    res, got = _masks(path, dpath, max_memory_mb=RUNTIME_MB + 0.05)
    assert got == ref and res.summary["micro_batch"] == expect


def test_activation_estimate_by_hand():
    """x[N,10] -> A=Relu(x) -> B=Relu(A) -> C=A+B: at most A, B and C live at once (x is freed after A)."""
    nodes = [helper.make_node("Relu", ["x"], ["A"]), helper.make_node("Relu", ["A"], ["B"]),
             helper.make_node("Add", ["A", "B"], ["C"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                          [helper.make_tensor_value_info("C", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    est = ActivationEstimate(m, set())
    assert est.peak_bytes({"x": (5, 10)}) == 3 * 5 * 40
    assert est.footprint({"x": (32, 10)}, {"x"}) == Footprint(fixed=0, per_sample=120)


def test_micro_batch_for_budget():
    fp = Footprint(fixed=2 * MB, per_sample=10 * MB)
    budget = 100 + RUNTIME_MB + ARENA_SLACK * 32   # MB: weights, runtime, 3 samples (32 MB) with slack
    assert micro_batch_for(budget, 100 * MB, fp) == 3
    with pytest.raises(FpsGraphError, match=r"--max-memory 200 MB is too small.*need about \d+ MB; raise it"):
        micro_batch_for(200, 100 * MB, fp)


@pytest.mark.parametrize("micro,budget", [(0, None), (-2, None), (2.5, None), (None, 0), (None, -1.0),
                                          (None, float("nan")), (None, float("inf")), (2, 100.0)])
def test_bad_micro_settings(micro, budget):
    with pytest.raises(FpsGraphError):
        check_micro(micro, budget)


def test_static_inputs_are_never_sliced():
    inputs = [SimpleNamespace(name="x", shape=["N", 4]), SimpleNamespace(name="state", shape=[2, "N", 8])]
    mb = MicroBatcher(None, [], ("abs",), "graph", inputs, micro_batch=1)
    batch = {"x": np.zeros((3, 4), np.float32), "state": np.zeros((2, 3, 8), np.float32)}
    assert not mb.active and mb.split(batch, 3) is None
    mb = MicroBatcher(None, [], ("abs",), "graph", inputs[:1], micro_batch=2)
    parts = mb.split({"x": np.arange(12, dtype=np.float32).reshape(3, 4)}, 3)
    assert [p["x"].shape[0] for p in parts] == [2, 1] and parts[1]["x"][0, 0] == 8


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stderr


@pytest.mark.parametrize("value,message", [("0", "--max-memory must be a positive number"),
                                           ("-5", "--max-memory must be a positive number"),
                                           ("nan", "--max-memory must be a positive number"),
                                           ("abc", "'abc' is not a valid float"),
                                           ("10", "--max-memory 10 MB is too small")])
def test_cli_bad_max_memory(tmp_path, value, message):
    out = tmp_path / "m.safetensors"
    code, err = _cli("select", SAMPLE, IMAGES, "-o", out, "-q", "--max-memory", value)
    lines = err.strip("\n").split("\n")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_cli_max_memory_same_masks(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _cli("select", SAMPLE, IMAGES, "-o", a, "--batch-size", "16")[0] == 0
    code, err = _cli("select", SAMPLE, IMAGES, "-o", b, "--batch-size", "16", "--max-memory", str(RUNTIME_MB + 1))
    assert code == 0 and "micro-batches of" in err, err
    from safetensors.numpy import load_file

    ma, mb = load_file(str(a)), load_file(str(b))
    assert ma.keys() == mb.keys() and all(ma[k].tobytes() == mb[k].tobytes() for k in ma)
