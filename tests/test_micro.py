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
from onnx import TensorProto, helper, numpy_helper

from fps_graph.errors import FpsGraphError
from fps_graph.graph.layers import find_layers
from fps_graph.graph.model import load_model
from fps_graph.runtime.calibrate import BatchStats
from fps_graph.runtime.memory import (MB, PLAIN_SLACK, RUNTIME_MB, ARENA_SLACK, AUTO, ActivationEstimate, Footprint,
                                     auto_cap, even_slices, micro_batch_for, within_plain)
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
    whole, ref = _masks(path, dpath, micro_batch=16)      # a slice as large as the batch: whole batches
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
    _, plain = step.micro.footprints({"input": np.zeros((16, 6, 10), np.float32)})
    expect = even_slices(16, min(micro_batch_for(RUNTIME_MB + 0.05, step.micro.weights, fp),
                                 within_plain(fp, plain, 16)))
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


def test_activation_estimate_counts_views_once():
    """Reshape and a Cast to the type a tensor already has share its buffer (ONNX Runtime aliases or removes them):
    x[N,10] -> A=Relu(x) -> V=Reshape(A) -> W=Cast(V, float) -> B=Relu(W), outputs A and B: x is freed after A, V
    and W cost nothing, so A and B are all that is ever live (a copy per view would make it A, V, W then B). A Cast to
    float16 is a new tensor of half the size."""
    def model(cast_to: int):
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 10])
        nodes = [helper.make_node("Relu", ["x"], ["A"]), helper.make_node("Reshape", ["A", "shape"], ["V"]),
                 helper.make_node("Cast", ["V"], ["W"], to=cast_to), helper.make_node("Relu", ["W"], ["B"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("B", cast_to, None)], [shape])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert ActivationEstimate(model(TensorProto.FLOAT), set()).peak_bytes({"x": (5, 10)}) == 2 * 5 * 40
    assert ActivationEstimate(model(TensorProto.FLOAT16), set()).peak_bytes({"x": (5, 10)}) == 5 * 40 + 2 * 5 * 20


def test_even_slices():
    assert [even_slices(32, m) for m in (32, 40, 28, 16, 11, 7, 1, 0)] == [32, 32, 16, 16, 11, 7, 1, 1]
    assert even_slices(5, 2) == 2 and even_slices(1, 8) == 1


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_default_never_needs_more_than_plain_inference(exported, name):
    """By default a batch is sliced just enough that the observed graph's activations stay within those of plain
    inference of the same batch (both estimated from the graphs); --max-memory auto goes further, within a quarter
    of the weights (at least 64 MB); the masks are the whole batch's, byte for byte."""
    _, path, dpath, data = exported(name, "legacy")
    _, ref = _masks(path, dpath, micro_batch=16)
    model = load_model(path)
    layers, _ = find_layers(model)
    batch = {"input": np.zeros((16, *data.shape[1:]), np.float32)}
    step = BatchStats(model, layers, provider="cpu")
    observed, plain = step.micro.footprints(batch)
    m = step.micro.size(batch, 16)
    need = lambda k: observed.fixed + observed.per_sample * k   # noqa: E731
    ceiling = plain.fixed + plain.per_sample * 16 + PLAIN_SLACK
    assert m == 1 or need(m) <= ceiling
    assert m == 16 or need(-(-16 // (-(-16 // m) - 1))) > ceiling   # not sliced more than needed
    auto = BatchStats(model, layers, provider="cpu", max_memory_mb=AUTO)
    assert auto.micro.size(batch, 16) <= m
    for kw in ({}, {"max_memory_mb": AUTO}):
        res, got = _masks(path, dpath, **kw)
        assert got == ref, kw


def test_auto_bounds_activations_by_a_share_of_the_weights():
    """A graph whose activations dwarf its weights: auto picks the most samples whose activations (with the arena's
    slack) fit max(weights / 4, 64 MB); the default only stays within plain inference."""
    w = numpy_helper.from_array(np.eye(256, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4096, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = Path(pytest.importorskip("tempfile").mkdtemp()) / "wide.onnx"
    onnx.save(m, path)
    model = load_model(path)
    layers, _ = find_layers(model)
    batch = {"x": np.zeros((64, 4096, 256), np.float32)}   # 4 MB per sample
    auto = BatchStats(model, layers, provider="cpu", max_memory_mb=AUTO).micro
    observed, _ = auto.footprints(batch)
    k = auto.size(batch, 64)
    assert auto_cap(auto.weights) == 64 * MB // ARENA_SLACK
    assert observed.fixed + observed.per_sample * k <= auto_cap(auto.weights) < \
        observed.fixed + observed.per_sample * (k + 1)
    assert 1 <= k < BatchStats(model, layers, provider="cpu").micro.size(batch, 64)


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
                                           ("abc", "'abc' is neither a number of MB nor 'auto'"),
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
    assert ma.keys() == mb.keys()
    scale = "::input_scale"   # each entry's input statistic: sums over micro-batches round differently
    assert all(ma[k].tobytes() == mb[k].tobytes() for k in ma if not k.endswith(scale))   # the selection: bytes
    for k in (k for k in ma if k.endswith(scale)):
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, err_msg=k)
