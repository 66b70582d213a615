"""Layers inside If, Loop and Scan bodies: found, observed in the body, equal to NumPy / unrolled / unmerged graphs.

Hand-built graphs check the threading of observer sums out of bodies against NumPy on the same data; the merged
decoder tests (further down) check an Optimum-style merged Llama decoder against its unmerged decoder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from fps_graph.errors import FpsGraphError
from fps_graph.formats.masks import load_indices, read_metadata
from fps_graph.graph.layers import find_layers
from fps_graph.graph.model import load_model
from fps_graph.runtime.calibrate import collect_stats
from fps_graph.selection.pipeline import SelectOptions, describe, make_plan, run_select, write_result
from fps_graph.selection.stats import Stats, conv_window_sums


def _vi(name: str, elem: int = TP.FLOAT, shape=None) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _stats(path: Path, batches: list[dict[str, np.ndarray]], kinds=("abs", "sq")) -> tuple[Stats, list]:
    model = load_model(path)
    layers, _ = find_layers(model)
    # whole batches: the comparisons here are exact to 1e-12, and slices would regroup the in-graph float32 sums
    st, _ = collect_stats(model, layers, batches, kinds=kinds, micro_batch=max(len(next(iter(b.values())))
                                                                                for b in batches))
    return st, layers


def _masks(path: Path, st: Stats, out: Path, k: int = 2) -> tuple[dict[str, np.ndarray], dict]:
    """Masks of a model from saved statistics, through the select job (no data source needed)."""
    stats_file = out.with_suffix(".stats.safetensors")
    st.save(stats_file)
    result = run_select(path, None, SelectOptions(k=k, stats_in=[str(stats_file)]))
    write_result(result, out)
    return load_indices(out), read_metadata(out)


RNG = np.random.default_rng(7)
W6x4 = RNG.normal(size=(6, 4)).astype(np.float32)


def if_graph(path: Path, separate: bool = False) -> Path:
    """x = relu(x0); If(c): then x @ W, else (2x) @ W: one outer weight read in both branches (or, separate, the
    else branch holds its own weight W2)."""
    then = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y_t"], name="mm")], "then", [],
                        [_vi("y_t", shape=["N", 3, 4])])
    inits = [nh.from_array(np.float32(2), "two")] + ([nh.from_array(W6x4[::-1].copy(), "W2")] if separate else [])
    other = h.make_graph([h.make_node("Mul", ["x", "two"], ["x2"], name="double"),
                          h.make_node("MatMul", ["x2", "W2" if separate else "W"], ["y_e"], name="mm")], "else", [],
                         [_vi("y_e", shape=["N", 3, 4])], initializer=inits)
    g = h.make_graph([h.make_node("Relu", ["x0"], ["x"], name="relu"),
                      h.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)], "g",
                     [_vi("x0", shape=["N", 3, 6]), _vi("c", TP.BOOL, [])], [_vi("y", shape=["N", 3, 4])],
                     initializer=[nh.from_array(W6x4, "W")])
    return _save(g, path)


def test_if_weight_in_both_branches_is_one_entry_with_pooled_statistics(tmp_path):
    path = if_graph(tmp_path / "if.onnx")
    xs = [RNG.normal(size=(2, 3, 6)).astype(np.float32) for _ in range(4)]
    cs = [True, False, True, True]
    st, layers = _stats(path, [{"x0": x, "c": np.array(c)} for x, c in zip(xs, cs)])
    assert sorted(layer.node for layer in layers) == ["branch/else_branch/mm", "branch/then_branch/mm"]
    assert {layer.weight for layer in layers} == {"W"}
    taken = [np.maximum(x, 0).reshape(-1, 6) for x, c in zip(xs, cs) if c]
    other = [2 * np.maximum(x, 0).reshape(-1, 6) for x, c in zip(xs, cs) if not c]
    for node, rows in (("branch/then_branch/mm", taken), ("branch/else_branch/mm", other)):
        r = np.concatenate(rows).astype(np.float64)
        np.testing.assert_allclose(st.sums[node]["abs"], np.abs(r).sum(0), rtol=1e-6)
        np.testing.assert_allclose(st.sums[node]["sq"], np.square(r).sum(0), rtol=1e-6)
        assert st.counts[node] == r.shape[0]
    # one mask entry, scored by the statistics of both branches pooled
    plan = make_plan(path)
    assert len(plan.groups) == 1 and len(plan.groups[0].layers) == 2
    idx, meta = _masks(path, st, tmp_path / "m.safetensors", k=2)
    assert list(idx) == ["W"]
    allrows = np.concatenate(taken + other).astype(np.float64)
    score = np.abs(W6x4.T.astype(np.float64)) * np.abs(allrows).mean(0)       # [out, in]
    want = np.sort(np.concatenate([np.argsort(-score[o], kind="stable")[:2] * 4 + o for o in range(4)]))
    np.testing.assert_array_equal(idx["W"], want)      # flat positions in W's own [in, out] layout
    assert sorted(meta["tensors"]["W"]["nodes"]) == ["branch/else_branch/mm", "branch/then_branch/mm"]


def test_if_branch_never_taken_gives_zero_count(tmp_path):
    path = if_graph(tmp_path / "if.onnx")
    xs = [RNG.normal(size=(2, 3, 6)).astype(np.float32) for _ in range(2)]
    st, _ = _stats(path, [{"x0": x, "c": np.array(True)} for x in xs])
    assert st.counts["branch/else_branch/mm"] == 0
    np.testing.assert_array_equal(st.sums["branch/else_branch/mm"]["abs"], np.zeros(6))
    # pooled with the branch that ran: the untaken one changes nothing
    idx, _ = _masks(path, st, tmp_path / "m.safetensors", k=1)
    rows = np.concatenate([np.maximum(x, 0).reshape(-1, 6) for x in xs]).astype(np.float64)
    score = np.abs(W6x4.T.astype(np.float64)) * np.abs(rows).mean(0)
    np.testing.assert_array_equal(idx["W"], np.sort(np.argmax(score, axis=1) * 4 + np.arange(4)))


def test_weight_only_in_a_branch_never_taken_is_skipped_with_reason(tmp_path):
    path = if_graph(tmp_path / "if2.onnx", separate=True)
    xs = [RNG.normal(size=(2, 3, 6)).astype(np.float32) for _ in range(2)]
    st, _ = _stats(path, [{"x0": x, "c": np.array(True)} for x in xs])
    stats_file = tmp_path / "s.safetensors"
    st.save(stats_file)
    result = run_select(path, None, SelectOptions(k=1, stats_in=[str(stats_file)]))
    assert list(result.indices) == ["W"]
    assert any("saw no calibration data" in w for w in result.warnings)
    st_else, _ = _stats(path, [{"x0": x, "c": np.array(False)} for x in xs])
    assert st_else.counts["branch/then_branch/mm"] == 0 and st_else.counts["branch/else_branch/mm"] == 12
    plan = make_plan(path)
    assert sorted(g.weight for g in plan.groups) == ["W", "branch/else_branch::W2"]


def test_no_layer_reached_is_an_error(tmp_path):
    path = conv_if_graph(tmp_path / "w.onnx", True)
    x = RNG.normal(size=(2, 3, 9, 9)).astype(np.float32)
    st, _ = _stats(path, [{"x0": x, "c": np.array(False), "z": np.zeros((2, 4, 5, 5), np.float32)}])
    st.save(tmp_path / "s.safetensors")
    with pytest.raises(FpsGraphError, match="no calibration data reached"):
        run_select(path, None, SelectOptions(k=1, stats_in=[str(tmp_path / "s.safetensors")]))


W6 = RNG.normal(size=(6, 6)).astype(np.float32) * 0.5
V6x5 = RNG.normal(size=(6, 5)).astype(np.float32)
TRIPS = 3


def loop_graph(path: Path) -> Path:
    """A Loop of TRIPS iterations: h <- tanh(h @ W) carried; z_t = x @ V reads the outer x; z stacked."""
    body = h.make_graph(
        [h.make_node("MatMul", ["h_in", "W"], ["y"], name="mm"), h.make_node("Tanh", ["y"], ["h_out"], name="tanh"),
         h.make_node("MatMul", ["x", "V"], ["z"], name="mmv"),
         h.make_node("Identity", ["cond_in"], ["cond_out"], name="cond")], "body",
        [_vi("i", TP.INT64, []), _vi("cond_in", TP.BOOL, []), _vi("h_in", shape=["N", 6])],
        [_vi("cond_out", TP.BOOL, []), _vi("h_out", shape=["N", 6]), _vi("z", shape=["N", 5])])
    g = h.make_graph([h.make_node("Relu", ["x0"], ["x"], name="relu"),
                      h.make_node("Loop", ["M", "", "x"], ["hT", "zs"], name="loop", body=body)], "g",
                     [_vi("x0", shape=["N", 6])], [_vi("hT", shape=["N", 6]), _vi("zs", shape=[TRIPS, "N", 5])],
                     initializer=[nh.from_array(W6, "W"), nh.from_array(V6x5, "V"),
                                  nh.from_array(np.array(TRIPS, np.int64), "M")])
    return _save(g, path)


def unrolled_graph(path: Path) -> Path:
    """The same computation written out: TRIPS MatMuls share W, TRIPS share V."""
    nodes = [h.make_node("Relu", ["x0"], ["x"], name="relu")]
    prev = "x"
    for t in range(TRIPS):
        nodes += [h.make_node("MatMul", [prev, "W"], [f"y{t}"], name=f"mm{t}"),
                  h.make_node("Tanh", [f"y{t}"], [f"h{t}"], name=f"tanh{t}"),
                  h.make_node("MatMul", ["x", "V"], [f"z{t}"], name=f"mmv{t}")]
        prev = f"h{t}"
    g = h.make_graph(nodes, "g", [_vi("x0", shape=["N", 6])],
                     [_vi(prev, shape=["N", 6])] + [_vi(f"z{t}", shape=["N", 5]) for t in range(TRIPS)],
                     initializer=[nh.from_array(W6, "W"), nh.from_array(V6x5, "V")])
    return _save(g, path)


def test_loop_body_equals_unrolled_graph(tmp_path):
    loop, flat = loop_graph(tmp_path / "loop.onnx"), unrolled_graph(tmp_path / "flat.onnx")
    batches = [{"x0": RNG.normal(size=(4, 6)).astype(np.float32)} for _ in range(3)]
    st_loop, layers = _stats(loop, batches)
    st_flat, flat_layers = _stats(flat, batches)
    assert [(l.node, l.loops) for l in layers] == [("loop/body/mm", 1), ("loop/body/mmv", 1)]
    for node, prefix in (("loop/body/mm", "mm"), ("loop/body/mmv", "mmv")):
        unrolled = [f"{prefix}{t}" for t in range(TRIPS)]
        assert st_loop.counts[node] == sum(st_flat.counts[n] for n in unrolled) == 4 * 3 * TRIPS
        for kind in ("abs", "sq"):
            np.testing.assert_allclose(st_loop.sums[node][kind], sum(st_flat.sums[n][kind] for n in unrolled),
                                       rtol=1e-12)
    # and against NumPy directly
    ref = np.zeros(6)
    for b in batches:
        x = np.maximum(b["x0"], 0)
        for _ in range(TRIPS):
            ref += np.abs(x.astype(np.float64)).sum(0)
            x = np.tanh(x @ W6)
    np.testing.assert_allclose(st_loop.sums["loop/body/mm"]["abs"], ref, rtol=1e-5)
    # the masks: one entry per weight, the same as the unrolled graph's (its three consumers pooled)
    idx_loop, _ = _masks(loop, st_loop, tmp_path / "loop.safetensors")
    idx_flat, _ = _masks(flat, st_flat, tmp_path / "flat.safetensors")
    assert sorted(idx_loop) == sorted(idx_flat) == ["V", "W"]
    for key in idx_loop:
        np.testing.assert_array_equal(idx_loop[key], idx_flat[key])


def test_loop_with_zero_iterations_gives_zero_counts(tmp_path):
    path = loop_graph(tmp_path / "loop.onnx")
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == "M":
            t.CopyFrom(nh.from_array(np.array(0, np.int64), "M"))
    onnx.save(model, str(path))
    st, _ = _stats(path, [{"x0": RNG.normal(size=(4, 6)).astype(np.float32)}])
    assert st.counts == {"loop/body/mm": 0.0, "loop/body/mmv": 0.0}
    np.testing.assert_array_equal(st.sums["loop/body/mm"]["abs"], np.zeros(6))


def test_conv_in_nested_loops_equals_unfold_oracle(tmp_path):
    """Loop(2) { Loop(3) { h <- relu(conv(h)) } }: six convolutions of the carried map; window sums per iteration
    (the map observer's outputs carry two iteration axes) == F.unfold over the six inputs."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    kernel = RNG.normal(size=(3, 3, 3, 3)).astype(np.float32) * 0.3
    inner = h.make_graph([h.make_node("Conv", ["h_in", "K"], ["y"], name="conv", pads=[1, 1, 1, 1]),
                          h.make_node("Relu", ["y"], ["h_out"], name="relu"),
                          h.make_node("Identity", ["c_in"], ["c_out"], name="cond")], "inner",
                         [_vi("i", TP.INT64, []), _vi("c_in", TP.BOOL, []), _vi("h_in", shape=["N", 3, 5, 5])],
                         [_vi("c_out", TP.BOOL, []), _vi("h_out", shape=["N", 3, 5, 5])])
    outer = h.make_graph([h.make_node("Loop", ["M2", "", "h_in"], ["h_mid"], name="inner", body=inner),
                          h.make_node("Identity", ["c_in"], ["c_out"], name="cond")], "outer",
                         [_vi("j", TP.INT64, []), _vi("c_in", TP.BOOL, []), _vi("h_in", shape=["N", 3, 5, 5])],
                         [_vi("c_out", TP.BOOL, []), _vi("h_mid", shape=["N", 3, 5, 5])])
    g = h.make_graph([h.make_node("Loop", ["M1", "", "x"], ["hT"], name="outer", body=outer)], "g",
                     [_vi("x", shape=["N", 3, 5, 5])], [_vi("hT", shape=["N", 3, 5, 5])],
                     initializer=[nh.from_array(kernel, "K"), nh.from_array(np.array(2, np.int64), "M1"),
                                  nh.from_array(np.array(3, np.int64), "M2")])
    path = _save(g, tmp_path / "nested.onnx")
    x = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    st, layers = _stats(path, [{"x": x}])
    assert [(l.node, l.loops) for l in layers] == [("outer/body/inner/body/conv", 2)]
    cur, want_abs, want_sq, count = torch.from_numpy(x), 0.0, 0.0, 0
    for _ in range(6):
        cols = F.unfold(cur.double(), 3, padding=1)           # [N, C*9, positions]
        want_abs = want_abs + cols.abs().sum((0, 2)).numpy()
        want_sq = want_sq + cols.square().sum((0, 2)).numpy()
        count += cols.shape[0] * cols.shape[2]
        cur = torch.relu(F.conv2d(cur, torch.from_numpy(kernel), padding=1))
    np.testing.assert_allclose(st.sums[layers[0].node]["abs"].reshape(-1), want_abs, rtol=1e-5)
    np.testing.assert_allclose(st.sums[layers[0].node]["sq"].reshape(-1), want_sq, rtol=1e-5)
    assert st.counts[layers[0].node] == count


def scan_graph(path: Path, opset: int = 17) -> Path:
    """Scan over the sequence axis: s <- s + x_t @ W (state), y_t = x_t @ W stacked."""
    body = h.make_graph([h.make_node("MatMul", ["x_t", "W"], ["y_t"], name="mm"),
                         h.make_node("Add", ["s_in", "y_t"], ["s_out"], name="acc")], "body",
                        [_vi("s_in", shape=["N", 4]), _vi("x_t", shape=["N", 6])],
                        [_vi("s_out", shape=["N", 4]), _vi("y_t", shape=["N", 4])])
    g = h.make_graph([h.make_node("Relu", ["x0"], ["x"], name="relu"),
                      h.make_node("Scan", ["s0", "x"], ["sT", "ys"], name="scan", body=body, num_scan_inputs=1,
                                  scan_input_axes=[1], scan_output_axes=[1])], "g",
                     [_vi("x0", shape=["N", "T", 6]), _vi("s0", shape=["N", 4])],
                     [_vi("sT", shape=["N", 4]), _vi("ys", shape=["N", "T", 4])],
                     initializer=[nh.from_array(W6x4, "W")])
    return _save(g, path, opset)


def test_scan_body_sums_over_steps(tmp_path):
    path = scan_graph(tmp_path / "scan.onnx")
    xs = [RNG.normal(size=(3, 5, 6)).astype(np.float32) for _ in range(2)]
    st, layers = _stats(path, [{"x0": x, "s0": np.zeros((3, 4), np.float32)} for x in xs])
    assert [(l.node, l.loops) for l in layers] == [("scan/body/mm", 1)]
    rows = np.concatenate([np.maximum(x, 0).reshape(-1, 6) for x in xs]).astype(np.float64)
    np.testing.assert_allclose(st.sums["scan/body/mm"]["abs"], np.abs(rows).sum(0), rtol=1e-6)
    np.testing.assert_allclose(st.sums["scan/body/mm"]["sq"], np.square(rows).sum(0), rtol=1e-6)
    assert st.counts["scan/body/mm"] == rows.shape[0]


CONV_W = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)


def conv_if_graph(path: Path, wrapped: bool) -> Path:
    """A Conv (weight stored inside the branch) in the then-branch of an If, or the same Conv alone."""
    conv = h.make_node("Conv", ["x", "K"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])
    if not wrapped:
        g = h.make_graph([h.make_node("Relu", ["x0"], ["x"], name="relu"), conv], "g", [_vi("x0", shape=["N", 3, 9, 9])],
                         [_vi("y", shape=["N", 4, 5, 5])], initializer=[nh.from_array(CONV_W, "K")])
        return _save(g, path)
    then = h.make_graph([conv], "then", [], [_vi("y", shape=["N", 4, 5, 5])],
                        initializer=[nh.from_array(CONV_W, "K")])
    other = h.make_graph([h.make_node("Identity", ["z"], ["y2"], name="same")], "else", [],
                         [_vi("y2", shape=["N", 4, 5, 5])])
    g = h.make_graph([h.make_node("Relu", ["x0"], ["x"], name="relu"),
                      h.make_node("If", ["c"], ["out"], name="sr", then_branch=then, else_branch=other)], "g",
                     [_vi("x0", shape=["N", 3, 9, 9]), _vi("c", TP.BOOL, []), _vi("z", shape=["N", 4, 5, 5])],
                     [_vi("out", shape=["N", 4, 5, 5])])
    return _save(g, path)


def test_conv_inside_if_equals_plain_conv(tmp_path):
    """Weight stored inside the branch (model-wide key "sr/then_branch::K", mask key "K"); map statistics equal the
    unwrapped Conv's."""
    wrapped, plain = conv_if_graph(tmp_path / "w.onnx", True), conv_if_graph(tmp_path / "p.onnx", False)
    xs = [RNG.normal(size=(2, 3, 9, 9)).astype(np.float32) for _ in range(3)]
    cs = [True, False, True]
    z = np.zeros((2, 4, 5, 5), np.float32)
    st_w, layers = _stats(wrapped, [{"x0": x, "c": np.array(c), "z": z} for x, c in zip(xs, cs)])
    st_p, _ = _stats(plain, [{"x0": x} for x, c in zip(xs, cs) if c])
    assert [(l.node, l.weight) for l in layers] == [("sr/then_branch/conv", "sr/then_branch::K")]
    for kind in ("abs", "sq"):
        np.testing.assert_array_equal(st_w.sums["sr/then_branch/conv"][kind], st_p.sums["conv"][kind])
    assert st_w.counts["sr/then_branch/conv"] == st_p.counts["conv"]
    # the same masks, keyed by the body initializer
    idx_w, meta = _masks(wrapped, st_w, tmp_path / "w.safetensors")
    idx_p, _ = _masks(plain, st_p, tmp_path / "p.safetensors")
    np.testing.assert_array_equal(idx_w["K"], idx_p["K"])   # named by its name in the body
    # and against NumPy windows
    m = sum(np.abs(np.maximum(x, 0).astype(np.float64)).sum(0) for x, c in zip(xs, cs) if c)
    win, _ = conv_window_sums(m, layers[0].conv)
    np.testing.assert_allclose(st_w.sums["sr/then_branch/conv"]["abs"], win, rtol=1e-6)


def if_in_loop_graph(path: Path, conv: bool) -> Path:
    """A Loop whose body holds an If: then-branch x @ W (or a Conv), else-branch nothing scored."""
    if conv:
        inner = [h.make_node("Conv", ["xi", "K"], ["y_t"], name="conv")]
        inits, x_shape, y_shape = [nh.from_array(CONV_W, "K")], ["N", 3, 5, 5], ["N", 4, 3, 3]
    else:
        inner = [h.make_node("MatMul", ["xi", "W"], ["y_t"], name="mm")]
        inits, x_shape, y_shape = [nh.from_array(W6x4, "W")], ["N", 6], ["N", 4]
    then = h.make_graph(inner, "then", [], [_vi("y_t", shape=y_shape)])
    other = h.make_graph([h.make_node("Identity", ["zero"], ["y_e"], name="id")], "else", [], [_vi("y_e", shape=y_shape)])
    body = h.make_graph(
        [h.make_node("Mod", ["i", "two"], ["r"], name="mod"), h.make_node("Equal", ["r", "zero_i"], ["even"], name="eq"),
         h.make_node("Cast", ["i"], ["fi"], name="cast", to=TP.FLOAT), h.make_node("Mul", ["x", "fi"], ["xi"], name="scale"),
         h.make_node("If", ["even"], ["y"], name="pick", then_branch=then, else_branch=other),
         h.make_node("Identity", ["cond_in"], ["cond_out"], name="cond")], "body",
        [_vi("i", TP.INT64, []), _vi("cond_in", TP.BOOL, [])], [_vi("cond_out", TP.BOOL, []), _vi("y", shape=y_shape)])
    g = h.make_graph([h.make_node("Loop", ["M", ""], ["ys"], name="loop", body=body)], "g",
                     [_vi("x", shape=x_shape), _vi("zero", shape=y_shape)], [_vi("ys", shape=[5] + y_shape)],
                     initializer=inits + [nh.from_array(np.array(5, np.int64), "M"),
                                          nh.from_array(np.array(2, np.int64), "two"),
                                          nh.from_array(np.array(0, np.int64), "zero_i")])
    return _save(g, path)


def test_if_inside_loop(tmp_path):
    """Iterations 0, 2, 4 take the branch (x scaled by i); 1 and 3 add zero sums."""
    path = if_in_loop_graph(tmp_path / "il.onnx", conv=False)
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    st, layers = _stats(path, [{"x": x, "zero": np.zeros((3, 4), np.float32)}])
    assert [(l.node, l.loops) for l in layers] == [("loop/body/pick/then_branch/mm", 1)]
    ref = sum(np.abs(x.astype(np.float64) * i).sum(0) for i in (0, 2, 4))
    np.testing.assert_allclose(st.sums[layers[0].node]["abs"], ref, rtol=1e-6)
    assert st.counts[layers[0].node] == 3 * 3


def test_conv_in_if_in_loop_is_refused_with_reason(tmp_path):
    path = if_in_loop_graph(tmp_path / "cil.onnx", conv=True)
    layers, skipped = find_layers(load_model(path))
    assert layers == []
    reasons = {s.node: s.reason for s in skipped}
    assert "Conv inside an If branch within a Loop/Scan body" in reasons["loop/body/pick/then_branch/conv"]


def test_host_reduce_refuses_body_layers(tmp_path):
    path = if_graph(tmp_path / "if.onnx")
    model = load_model(path)
    layers, _ = find_layers(model)
    with pytest.raises(FpsGraphError, match="host"):
        collect_stats(model, layers, [{"x0": np.ones((1, 3, 6), np.float32), "c": np.array(True)}], reduce="host")


def test_observer_names_clash_is_refused(tmp_path):
    then = h.make_graph([h.make_node("MatMul", ["x", "W"], ["fpsg_0_abs"], name="mm")], "then", [],
                        [_vi("fpsg_0_abs", shape=["N", 4])])
    other = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y_e"], name="mm")], "else", [], [_vi("y_e", shape=["N", 4])])
    g = h.make_graph([h.make_node("If", ["c"], ["y"], name="b", then_branch=then, else_branch=other)], "g",
                     [_vi("x", shape=["N", 6]), _vi("c", TP.BOOL, [])], [_vi("y", shape=["N", 4])],
                     initializer=[nh.from_array(W6x4, "W")])
    path = _save(g, tmp_path / "clash.onnx")
    model = load_model(path)
    layers, _ = find_layers(model)
    with pytest.raises(FpsGraphError, match="fpsg_"):
        collect_stats(model, layers, [{"x": np.ones((1, 6), np.float32), "c": np.array(True)}])


def omissions_graph(path: Path) -> Path:
    """One scored MatMul (and a scored ConvTranspose) and every kind of unscored 2-D+ constant: Gather table, LSTM
    W/R, Einsum, an Add of a 2-D table, and a MatMul with the constant on the left; one of them inside an If body."""
    f = lambda *s: RNG.normal(size=s).astype(np.float32)   # noqa: E731
    inits = [nh.from_array(f(10, 6), "emb"), nh.from_array(f(6, 6), "W"), nh.from_array(f(1, 32, 6), "lstm_W"),
             nh.from_array(f(1, 32, 8), "lstm_R"), nh.from_array(f(6, 5), "E"), nh.from_array(f(4, 2, 3, 3), "CT"),
             nh.from_array(f(5, 6), "pos"), nh.from_array(f(3, 5), "L")]
    then = h.make_graph([h.make_node("Einsum", ["h", "E"], ["e_t"], name="einsum", equation="bsi,ij->bsj")], "then",
                        [], [_vi("e_t", shape=["N", 5, 5])])
    other = h.make_graph([h.make_node("Identity", ["h"], ["e_e"], name="id")], "else", [], [_vi("e_e", shape=None)])
    nodes = [h.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
             h.make_node("Add", ["x", "pos"], ["xp"], name="add_pos"),
             h.make_node("MatMul", ["xp", "W"], ["h"], name="fc"),
             h.make_node("Transpose", ["h"], ["hs"], name="tr", perm=[1, 0, 2]),
             h.make_node("LSTM", ["hs", "lstm_W", "lstm_R"], ["Y"], name="lstm", hidden_size=8),
             h.make_node("If", ["c"], ["e"], name="cf", then_branch=then, else_branch=other),
             h.make_node("ConvTranspose", ["img", "CT"], ["up"], name="deconv"),
             h.make_node("MatMul", ["L", "h2d"], ["lh"], name="left")]
    g = h.make_graph(nodes, "g", [_vi("ids", TP.INT64, ["N", 5]), _vi("c", TP.BOOL, []),
                                  _vi("img", shape=["N", 4, 5, 5]), _vi("h2d", shape=[5, 7])],
                     [_vi("Y", shape=None), _vi("e", shape=None), _vi("up", shape=None), _vi("lh", shape=None)],
                     initializer=inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_no_silent_omissions(tmp_path):
    """Every >= 2-D float constant that feeds a compute op and is not scored is listed with its name, shape,
    dtype and a reason; the inventory counts every weight value once, scored or not."""
    path = omissions_graph(tmp_path / "omit.onnx")
    view = describe(make_plan(path))
    scored = [layer["node"].split(":")[0] for layer in view["layers"]]
    assert scored[0] == "fc" and set(scored) <= {"fc", "lstm", "deconv"}   # recurrent weights, ConvTranspose: scored
    assert "deconv" in scored
    rec = {s["weight"]: s for s in view["skipped"] if s["weight"]}
    assert set(rec) == {"emb", "pos", "E", "L"}      # E: an outer initializer read inside the If body
    assert (rec["emb"]["node"], rec["emb"]["shape"], rec["emb"]["dtype"]) == ("embed", [10, 6], "float32")
    assert "Gather" in rec["emb"]["reason"]
    einsum = rec["E"]
    assert einsum["node"] == "cf/then_branch/einsum" and einsum["shape"] == [6, 5]
    assert rec["pos"]["node"] == "add_pos" and rec["pos"]["shape"] == [5, 6]
    assert rec["L"]["node"] == "left" and "left operand" in rec["L"]["reason"] and rec["L"]["values"] == 15
    sizes = {"emb": 60, "W": 36, "lstm_W": 192, "lstm_R": 256, "E": 30, "CT": 72, "pos": 30, "L": 15}
    w = view["weights"]
    assert w["total_values"] == sum(sizes.values())
    assert w["scored_values"] == 36 + 72 + (192 + 256 if "lstm" in scored else 0)
    assert sum(w["unscored_by_kind"].values()) == w["total_values"] - w["scored_values"]
    assert w["unscored_by_kind"]["Gather"] == 60 and "ConvTranspose" not in w["unscored_by_kind"]


# ---------------------------------------------------------------------------------------------------------------
# An Optimum-style merged decoder, built here from a tiny random Llama: the decoder without past and the decoder
# with past are exported with Optimum's input/output names, then merged into one graph whose top-level If on
# `use_cache_branch` holds them (then: with past, else: no past), their weights deduplicated into shared outer
# initializers (what optimum-onnx's merge_decoders does; written from its description, not copied).

torch = pytest.importorskip("torch")
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 1, 8, 50


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                      num_attention_heads=2, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      tie_word_embeddings=False, use_cache=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():       # no bit-identical tensors (norm ones) for the exporter to merge
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


OUTPUTS = ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
PAST = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]


def _export_decoders(model, folder: Path) -> tuple[Path, Path]:
    """decoder_model.onnx (no past) and decoder_with_past_model.onnx, legacy exporter, parameter names kept."""
    import warnings

    from transformers import DynamicCache, LlamaForCausalLM

    def flat(out):
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    class NoPast(LlamaForCausalLM):
        def forward(self, input_ids, attention_mask, position_ids):
            return flat(super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        past_key_values=DynamicCache(config=self.config), use_cache=True))

    class WithPast(LlamaForCausalLM):
        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.config)
            for i in range(LAYERS):
                cache.update(past[2 * i], past[2 * i + 1], i)
            return flat(super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        past_key_values=cache, use_cache=True))

    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({o: {0: "batch", 2: "total"} for o in OUTPUTS[1:]})
    names = ["input_ids", "attention_mask", "position_ids"]
    ids = torch.randint(0, VOCAB, (2, 5))
    paths = folder / "decoder_model.onnx", folder / "decoder_with_past_model.onnx"
    original = model.__class__
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model.__class__ = NoPast
            torch.onnx.export(model, (ids, torch.ones(2, 5, dtype=torch.int64), torch.arange(5).expand(2, 5)),
                              str(paths[0]), input_names=names, output_names=OUTPUTS, dynamic_axes=axes,
                              dynamo=False, opset_version=17)
            model.__class__ = WithPast
            past = [torch.randn(2, KV_HEADS, 3, HEAD_DIM) for _ in PAST]
            torch.onnx.export(model, (ids[:, :1], torch.ones(2, 4, dtype=torch.int64), torch.full((2, 1), 3), *past),
                              str(paths[1]), input_names=names + PAST, output_names=OUTPUTS,
                              dynamic_axes={**axes, **{p: {0: "batch", 2: "past"} for p in PAST}},
                              dynamo=False, opset_version=17)
    finally:
        model.__class__ = original
    return paths


def _rename_inputs(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def merge_decoders(no_past: Path, with_past: Path, out: Path, share: bool = True, external: bool = False) -> Path:
    """One model whose If(use_cache_branch) holds both decoders (then: with past, else: no past).

    share=True: every initializer (beyond scalars and 1-D int tensors, which stay in the branches) moves to the
    outer graph, equal values deduplicated (the no-past decoder's name kept), so both branches read one copy of each
    weight. share=False: each branch keeps its own initializers (a weight is stored twice).
    """
    dec, past = onnx.load(str(no_past)), onnx.load(str(with_past))
    outer: dict[tuple, str] = {}
    outer_inits: list[onnx.TensorProto] = []
    taken: set[str] = set()
    branches = {}
    for model, name in ((dec, "no_past"), (past, "with_past")):      # the no-past decoder's names win
        keep, rename = [], {}
        for t in model.graph.initializer:
            small = len(t.dims) == 0 or (len(t.dims) == 1 and t.data_type in (TP.INT32, TP.INT64))
            if small or not share:
                keep.append(t)
                continue
            value = nh.to_array(t)
            sig = (value.dtype.str, value.shape, value.tobytes())
            if sig not in outer:
                new = t.name if t.name not in taken else f"{t.name}_merged"
                taken.add(new)
                outer[sig] = new
                outer_inits.append(nh.from_array(value, new))
            rename[t.name] = outer[sig]
        _rename_inputs(model.graph, rename)
        branches[name] = h.make_graph(list(model.graph.node), name, [], list(model.graph.output), initializer=keep)
    use_cache = h.make_tensor_value_info("use_cache_branch", TP.BOOL, [1])
    inputs = list(past.graph.input) + [use_cache]
    node = h.make_node("If", ["use_cache_branch"], [o.name for o in dec.graph.output], name="optimum::if",
                       then_branch=branches["with_past"], else_branch=branches["no_past"])
    graph = h.make_graph([node], "merged", inputs, list(dec.graph.output), initializer=outer_inits)
    merged = h.make_model(graph, opset_imports=list(dec.opset_import), producer_name="optimum-onnx")
    merged.ir_version = 9
    onnx.checker.check_model(merged)
    if external:
        onnx.save(merged, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=out.name + "_data", size_threshold=100)
    else:
        onnx.save(merged, str(out))
    return out


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """The tiny Llama, its two decoders and their merges (shared weights; each branch its own copy; external)."""
    folder = tmp_path_factory.mktemp("decoders")
    model = _llama()
    no_past, with_past = _export_decoders(model, folder)
    merged = merge_decoders(no_past, with_past, folder / "decoder_model_merged.onnx")
    copies = merge_decoders(no_past, with_past, folder / "merged_copies.onnx", share=False)
    (folder / "ext").mkdir()
    external = merge_decoders(no_past, with_past, folder / "ext" / "decoder_model_merged.onnx", external=True)
    return {"model": model, "no_past": no_past, "with_past": with_past, "merged": merged, "copies": copies,
            "external": external, "folder": folder}


def _decoder_batches(branch: str, merged: bool, n: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Token batches for one decoder (past of length 3 for the with-past branch), plus the merged inputs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq, past_len = (6, 0) if branch == "no_past" else (2, 3)
        feed = {"input_ids": rng.integers(0, VOCAB, size=(2, seq)).astype(np.int64),
                "attention_mask": np.ones((2, past_len + seq), np.int64),
                "position_ids": np.tile(np.arange(past_len, past_len + seq, dtype=np.int64), (2, 1))}
        if branch == "with_past" or merged:
            feed.update({p: rng.normal(size=(2, KV_HEADS, past_len, HEAD_DIM)).astype(np.float32) for p in PAST})
        if merged:
            feed["use_cache_branch"] = np.array([branch == "with_past"])
        out.append(feed)
    return out


def _strip_names(meta: dict, fields: tuple[str, ...] = ("nodes",)) -> dict:
    """Masks metadata without what names the model file itself (hash, file name) or its nodes / initializers (the
    skipped records name nodes)."""
    meta = {k: v for k, v in meta.items() if k not in ("model_sha256", "model", "skipped")}
    meta["tensors"] = {k: {f: v for f, v in rec.items() if f not in fields} for k, rec in meta["tensors"].items()}
    return meta


@pytest.mark.parametrize("branch", ["no_past", "with_past"])
def test_merged_decoder_gives_the_masks_of_the_unmerged_decoder(decoders, tmp_path, branch):
    merged, single = decoders["merged"], decoders[branch]
    st_m, layers_m = _stats(merged, _decoder_batches(branch, merged=True))
    st_s, layers_s = _stats(single, _decoder_batches(branch, merged=False))
    plan_m, plan_s = make_plan(merged), make_plan(single)
    # every weight is one outer initializer read by one MatMul per branch: one entry, two layers
    assert len(plan_m.groups) == len(plan_s.groups) == 7 * LAYERS + 1
    assert all(len(g.layers) == 2 for g in plan_m.groups) and all(len(g.layers) == 1 for g in plan_s.groups)
    prefix = "optimum::if/" + ("then_branch/" if branch == "with_past" else "else_branch/")
    for layer in layers_s:
        assert st_m.counts[prefix + layer.node] == st_s.counts[layer.node] > 0
        np.testing.assert_array_equal(st_m.sums[prefix + layer.node]["abs"], st_s.sums[layer.node]["abs"])
    other = "optimum::if/" + ("else_branch/" if branch == "with_past" else "then_branch/")
    assert all(st_m.counts[l.node] == 0 for l in layers_m if l.node.startswith(other))
    idx_m, meta_m = _masks(merged, st_m, tmp_path / "merged.safetensors")
    idx_s, meta_s = _masks(single, st_s, tmp_path / "single.safetensors")
    assert sorted(idx_m) == sorted(idx_s) and "model.layers.0.self_attn.q_proj.weight" in idx_m
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged.safetensors"), "numpy") as fm, \
            safe_open(str(tmp_path / "single.safetensors"), "numpy") as fs:
        assert sorted(fm.keys()) == sorted(fs.keys())
        for key in fm.keys():
            a, b = fm.get_tensor(key), fs.get_tensor(key)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key
    # the merged file names its shared initializers after the no-past decoder's (as Optimum keeps one name)
    fields = ("nodes",) if branch == "no_past" else ("nodes", "onnx")
    assert _strip_names(meta_m, fields) == _strip_names(meta_s, fields)
    for key, rec in meta_m["tensors"].items():     # the unmerged decoder's node, in its branch
        assert prefix + meta_s["tensors"][key]["nodes"][0] in rec["nodes"]


# ---- apply on the merged decoder --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def delta(decoders):
    """Masks selected on the no-past decoder, and a delta file of random trained changes at those entries (plus
    model.norm.weight trained in full), with the fine-tuned PyTorch model to compare against."""
    import copy

    from fps_graph.formats.delta import FullEntry, SparseEntry, write_delta

    folder = decoders["folder"]
    st, _ = _stats(decoders["no_past"], _decoder_batches("no_past", merged=False))
    idx, meta = _masks(decoders["no_past"], st, folder / "masks.safetensors")
    model = decoders["model"]
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(3)
    sparse, tensors = {}, {}
    for key, ind in idx.items():
        base = sd[key].reshape(-1)[ind].astype(np.float32)
        sparse[key] = SparseEntry(ind.astype(np.int64), rng.normal(scale=0.2, size=ind.size).astype(np.float32),
                                  base, tuple(sd[key].shape))
        tensors[key] = {**meta["tensors"][key], "kind": "sparse", "shape": list(sd[key].shape), "dtype": "float32"}
    norm = "model.norm.weight"
    full = {norm: FullEntry(sd[norm] + rng.normal(scale=0.2, size=sd[norm].shape).astype(np.float32), sd[norm])}
    tensors[norm] = {"kind": "full", "shape": list(sd[norm].shape), "dtype": "float32"}
    path = folder / "delta.safetensors"
    write_delta(path, sparse, full, tensors, {}, {"model_sha256": meta["model_sha256"]})
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(tuned.named_parameters())
        for key, e in sparse.items():
            params[key].view(-1)[torch.from_numpy(e.indices)] = torch.from_numpy(e.values())
        params[norm].copy_(torch.from_numpy(full[norm].value))
    return {"path": path, "tuned": tuned, "keys": sorted(sparse) + [norm]}


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feed.items() if k in names})


def _torch_logits(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(LAYERS):
        if feed[PAST[2 * i]].shape[2]:
            cache.update(torch.from_numpy(feed[PAST[2 * i]]), torch.from_numpy(feed[PAST[2 * i + 1]]), i)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["attention_mask"]),
                    position_ids=torch.from_numpy(feed["position_ids"]), past_key_values=cache, use_cache=True)
    return out.logits.numpy()


def _close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want)))
    assert err <= rel * float(np.max(np.abs(want))), f"max abs error {err}"


def test_apply_merged_decoder_equals_patched_unmerged_and_pytorch(decoders, delta, tmp_path):
    from fps_graph.formats.io import sha256_file
    from fps_graph.graph.apply import apply_delta

    before = sha256_file(decoders["merged"])
    report = apply_delta(decoders["merged"], delta["path"], tmp_path / "merged_ft.onnx")
    assert sha256_file(decoders["merged"]) == before
    # one shared outer initializer per trained tensor
    assert sorted(report["updated"]) == delta["keys"] and all(len(v) == 1 for v in report["updated"].values())
    apply_delta(decoders["no_past"], delta["path"], tmp_path / "no_past_ft.onnx")
    apply_delta(decoders["with_past"], delta["path"], tmp_path / "with_past_ft.onnx")
    for branch in ("no_past", "with_past"):
        feed = _decoder_batches(branch, merged=True, n=1, seed=5)[0]
        merged_out = _run(tmp_path / "merged_ft.onnx", feed)
        single_out = _run(tmp_path / f"{branch}_ft.onnx", feed)
        for a, b in zip(merged_out, single_out):
            np.testing.assert_array_equal(a, b)
        _close(merged_out[0], _torch_logits(delta["tuned"], feed))
        base = _run(decoders["merged"], feed)[0]
        assert np.max(np.abs(base - merged_out[0])) > 1e-3      # the delta did change the outputs


def test_apply_patches_every_copy_inside_the_branches(decoders, delta, tmp_path):
    """Each branch storing its own copy of every weight: both copies are found and patched."""
    from fps_graph.graph.apply import apply_delta

    report = apply_delta(decoders["copies"], delta["path"], tmp_path / "copies_ft.onnx")
    for key, copies in report["updated"].items():
        names = sorted(c["initializer"] for c in copies)
        assert len(names) == 2 and names[0].startswith("optimum::if/else_branch::"), (key, names)
        assert names[1].startswith("optimum::if/then_branch::")
    for branch in ("no_past", "with_past"):
        feed = _decoder_batches(branch, merged=True, n=1, seed=6)[0]
        _close(_run(tmp_path / "copies_ft.onnx", feed)[0], _torch_logits(delta["tuned"], feed))


def test_apply_keeps_external_data(decoders, delta, tmp_path):
    from fps_graph.formats.io import sha256_file
    from fps_graph.graph.apply import apply_delta

    src = decoders["external"]
    data = src.parent / (src.name + "_data")
    hashes = (sha256_file(src), sha256_file(data))
    out = tmp_path / "merged_ft.onnx"
    report = apply_delta(src, delta["path"], out)
    assert (sha256_file(src), sha256_file(data)) == hashes
    assert report["external_data"] == str(out.parent / (out.name + ".data"))
    proto = onnx.load(str(out), load_external_data=False)
    big = [t for t in proto.graph.initializer if np.prod(t.dims) * 4 > 1024]      # the weights, all of them
    assert len(big) >= 5 and all(t.data_location == TP.EXTERNAL for t in big)
    feed = _decoder_batches("with_past", merged=True, n=1, seed=7)[0]
    _close(_run(out, feed)[0], _torch_logits(delta["tuned"], feed))


def test_cli_select_from_text_merged_equals_unmerged(decoders, tmp_path):
    """`fps-graph select` from a text file: use_cache_branch false and an empty past are filled in (the HF/Optimum
    conventions), and the merged decoder's masks hold the same bytes as the no-past decoder's."""
    import shutil

    from safetensors import safe_open

    import hf_helpers
    from fps_graph_cli.main import entry

    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("decoder_model_merged.onnx", "decoder_model.onnx"):
        shutil.copy(decoders["folder"] / name, folder / name)
    hf_helpers.write_tokenizer(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(hf_helpers.cycle_text(12, seed=2)) + "\n")
    outs = []
    for name in ("decoder_model_merged.onnx", "decoder_model.onnx"):
        out = tmp_path / f"{name}.masks.safetensors"
        assert entry(["select", str(folder / name), str(text), "--k", "2", "-o", str(out), "-q"]) == 0
        outs.append(out)
    with safe_open(str(outs[0]), "numpy") as a, safe_open(str(outs[1]), "numpy") as b:
        masks = [k for k in a.keys() if not k.endswith("::input_scale")]   # and each key's input scales
        assert sorted(a.keys()) == sorted(b.keys()) and len(masks) == 7 * LAYERS + 1
        assert all(a.get_tensor(k).tobytes() == b.get_tensor(k).tobytes() for k in a.keys())


def test_weight_stored_once_per_branch_is_one_entry(decoders, tmp_path):
    """A merger that leaves each branch its own copy of every weight: each pair of equal copies with one PyTorch
    name is one entry (their layers pooled); the masks are the unmerged decoder's, byte for byte."""
    copies, single = decoders["copies"], decoders["no_past"]
    plan = make_plan(copies)
    assert len(plan.groups) == 7 * LAYERS + 1
    for g in plan.groups:
        weights = sorted({layer.weight for layer in g.layers})
        assert len(weights) == 2 and weights[0].startswith("optimum::if/else_branch::"), weights
        assert weights[1].startswith("optimum::if/then_branch::")
    assert describe(plan)["layers"][0]["shared"] is True
    st_c, _ = _stats(copies, _decoder_batches("no_past", merged=True))
    st_s, _ = _stats(single, _decoder_batches("no_past", merged=False))
    idx_c, _ = _masks(copies, st_c, tmp_path / "copies.safetensors")
    idx_s, _ = _masks(single, st_s, tmp_path / "single.safetensors")
    assert sorted(idx_c) == sorted(idx_s)
    for key in idx_c:
        assert idx_c[key].dtype == idx_s[key].dtype and idx_c[key].tobytes() == idx_s[key].tobytes(), key


def test_body_external_data_outside_the_folder_is_refused(decoders, tmp_path):
    src = merge_decoders(decoders["no_past"], decoders["with_past"], tmp_path / "m.onnx", share=False, external=True)
    proto = onnx.load(str(src), load_external_data=False)
    body = next(a.g for a in proto.graph.node[0].attribute if a.name == "else_branch")
    big = next(t for t in body.initializer if t.data_location == TP.EXTERNAL)
    next(e for e in big.external_data if e.key == "location").value = "../elsewhere.bin"
    (tmp_path / "bad").mkdir()
    onnx.save(proto, str(tmp_path / "bad" / "m.onnx"))
    with pytest.raises(FpsGraphError, match="points outside the model's folder"):
        make_plan(tmp_path / "bad" / "m.onnx")
