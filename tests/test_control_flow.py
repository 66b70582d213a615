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
    st, _ = collect_stats(model, layers, batches, kinds=kinds)
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
    """Weight stored inside the branch (key 'sr/then_branch::K'); map statistics equal the unwrapped Conv's."""
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
    np.testing.assert_array_equal(idx_w["sr/then_branch::K"], idx_p["K"])
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
    """One scored MatMul and every kind of unscored 2-D+ constant: Gather table, LSTM W/R, Einsum, ConvTranspose,
    an Add of a 2-D table, and a MatMul with the constant on the left; one of them inside an If body."""
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
    """Every >= 2-D float constant that feeds a compute op and is not scored is listed with a reason."""
    path = omissions_graph(tmp_path / "omit.onnx")
    view = describe(make_plan(path))
    scored = [layer["node"].split(":")[0] for layer in view["layers"]]
    assert scored[0] == "fc" and set(scored) <= {"fc", "lstm"}     # recurrent weights: scored (graph/recurrent.py)
    by_node = {}
    for s in view["skipped"]:
        by_node.setdefault(s["node"], []).append(s["reason"])
    text = {k: " | ".join(v) for k, v in by_node.items()}
    assert "emb [10, 6]" in text["embed"] and "Gather" in text["embed"]
    if "lstm" not in scored:
        assert "lstm_W [1, 32, 6]" in text["lstm"] and "lstm_R [1, 32, 8]" in text["lstm"]
    assert "cf/then_branch::E" not in text.get("cf/then_branch/einsum", "") and "E [6, 5]" in text["cf/then_branch/einsum"]
    assert "ConvTranspose" in text["deconv"]
    assert "pos [5, 6]" in text["add_pos"]
    assert "left operand" in text["left"]
    listed = set(by_node) - ({"lstm"} if "lstm" in scored else set())
    assert listed == {"embed", "cf/then_branch/einsum", "deconv", "add_pos", "left"} | ({"lstm"} - set(scored))
