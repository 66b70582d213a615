"""Hand-built ONNX graphs: Constant-node, fp16+Cast, DequantizeLinear and Reshape/Transpose weights; auto_pad,
asymmetric pads, dilation, groups, Conv1d; Gemm with transA; a two-input model fed from .npz. Checked against
NumPy statistics computed from the activations themselves (sliding windows over the zero-padded input)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from fps_graph.graph.discover import find_layers
from fps_graph.graph.model import load_model
from fps_graph.selection.pipeline import SelectOptions, run_select
from fps_graph.graph.observe import col_borders, plan_observers, pointwise
from fps_graph.runtime.calibrate import collect_stats
from fps_graph.runtime.config import RuntimeConfig
from fps_graph.runtime.windows import conv_col_window_sums, conv_pads, conv_window_sums

from oracle import topk_oracle

RNG = np.random.default_rng(0)
W_A = RNG.standard_normal((6, 4, 4, 4)).astype(np.float32)
W_B_Q = RNG.integers(-100, 100, (6, 2, 3, 3)).astype(np.int8)
B_SCALE = RNG.uniform(0.01, 0.05, 6).astype(np.float32)
B_ZP = RNG.integers(-3, 3, 6).astype(np.int8)
W_C = RNG.standard_normal((6, 3)).astype(np.float16)
W_D = RNG.standard_normal(42).astype(np.float32)
W_E = RNG.standard_normal((4, 3, 3)).astype(np.float32)


def build_model(path):
    """x[N,4,9,8] -> ConvA (SAME_UPPER, stride 2, Constant weight) and ConvB (DQ weight, groups 2, asymmetric
    pads, dilation); ConvA -> mean -> Transpose -> Gemm(transA=1, fp16 weight + Cast); ConvB -> tokens -> MatMul
    (weight = Transpose(Reshape(W_d))); seq[N,3,11] -> Conv1d."""
    nodes = [
        helper.make_node("Constant", [], ["W_a"], value=numpy_helper.from_array(W_A)),
        helper.make_node("Conv", ["x", "W_a"], ["y1"], name="convA", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("DequantizeLinear", ["W_b_q", "b_scale", "b_zp"], ["W_b"], axis=0),
        helper.make_node("Conv", ["x", "W_b"], ["y2"], name="convB", group=2, pads=[0, 1, 2, 0], dilations=[2, 1]),
        helper.make_node("ReduceMean", ["y1"], ["y1m"], axes=[2, 3], keepdims=0),
        helper.make_node("Transpose", ["y1m"], ["y1t"], perm=[1, 0]),
        helper.make_node("Cast", ["W_c"], ["W_c32"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["y1t", "W_c32"], ["out1"], name="gemmC", transA=1),
        helper.make_node("Reshape", ["y2", "tok_shape"], ["y2r"]),
        helper.make_node("Transpose", ["y2r"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["W_d", "wd_shape"], ["W_d2"]),
        helper.make_node("Transpose", ["W_d2"], ["W_dT"], perm=[1, 0]),
        helper.make_node("MatMul", ["tokens", "W_dT"], ["out2"], name="matmulD"),
        helper.make_node("Conv", ["seq", "W_e"], ["out3"], name="conv1d", strides=[2], pads=[1, 1]),
    ]
    inits = [numpy_helper.from_array(W_B_Q, "W_b_q"), numpy_helper.from_array(B_SCALE, "b_scale"),
             numpy_helper.from_array(B_ZP, "b_zp"), numpy_helper.from_array(W_C, "W_c"),
             numpy_helper.from_array(W_D, "W_d"), numpy_helper.from_array(W_E, "W_e"),
             numpy_helper.from_array(np.array([0, 6, -1], dtype=np.int64), "tok_shape"),
             numpy_helper.from_array(np.array([7, 6], dtype=np.int64), "wd_shape")]
    g = helper.make_graph(
        nodes, "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 8]),
         helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["N", 3, 11])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out1", "out2", "out3")],
        inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return m


def windows(x, kernel, strides, dilations, pads):
    """[C, *kernel] sums of |x| over every output position of a conv, straight from sliding windows."""
    nsp = len(kernel)
    xp = np.pad(np.abs(x.astype(np.float64)), [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    w = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nsp)))
    w = w[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
    w = w[(Ellipsis,) + tuple(slice(None, None, d) for d in dilations)]
    n_pos = int(np.prod(w.shape[2:2 + nsp]))
    return w.sum(axis=(0,) + tuple(range(2, 2 + nsp))), w.shape[0] * n_pos


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    path = root / "shapes.onnx"
    build_model(path)
    x = RNG.standard_normal((13, 4, 9, 8)).astype(np.float32) + 0.2
    seq = RNG.standard_normal((13, 3, 11)).astype(np.float32)
    np.savez(root / "data.npz", x=x, seq=seq)
    return path, root / "data.npz", x, seq


def test_layers_found_through_chains(model_and_data):
    path, *_ = model_and_data
    layers, skipped = find_layers(load_model(path))
    by = {l.node: l for l in layers}
    assert set(by) == {"convA", "convB", "gemmC", "matmulD", "conv1d"}
    assert by["convA"].weight == "W_a"
    assert by["convB"].weight == "W_b_q" and [s["op"] for s in by["convB"].chain] == ["DequantizeLinear"]
    assert by["gemmC"].weight == "W_c" and by["gemmC"].feature_axis == 0
    assert by["matmulD"].weight == "W_d" and [s["op"] for s in by["matmulD"].chain] == ["Reshape", "Transpose"]
    assert skipped == []


def test_stats_and_masks_match_numpy(model_and_data):
    path, dpath, x, seq = model_and_data
    res = run_select(path, str(dpath), SelectOptions(k=2, batch_size=4, provider="cpu", stat="mean-abs"))
    st = res.stats
    # ORT gives the intermediate activations; the statistics are computed here independently.
    m = onnx.load(path)
    for name in ("y1t", "tokens"):
        m.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    y1t, tokens = [], []
    for i in range(0, len(x), 4):
        a, b = sess.run(["y1t", "tokens"], {"x": x[i:i + 4], "seq": seq[i:i + 4]})
        y1t.append(a)
        tokens.append(b)
    expected = {}
    # convA: SAME_UPPER, kernel 4, stride 2 on 9x8 -> out 5x4, total pads (3, 2): begin (1, 1), end (2, 1)
    expected["convA"] = windows(x, (4, 4), (2, 2), (1, 1), (1, 1, 2, 1))
    expected["convB"] = windows(x, (3, 3), (1, 1), (2, 1), (0, 1, 2, 0))
    expected["conv1d"] = windows(seq, (3,), (2,), (1,), (1, 1))
    g = np.abs(np.concatenate(y1t, axis=1).astype(np.float64))      # [6, N] with transA: features on axis 0
    expected["gemmC"] = (g.sum(1), g.shape[1])
    t = np.abs(np.concatenate(tokens).astype(np.float64)).reshape(-1, 6)
    expected["matmulD"] = (t.sum(0), t.shape[0])
    for node, (sums, count) in expected.items():
        assert st.counts[node] == count, node
        np.testing.assert_allclose(st.sums[node]["abs"], sums, rtol=2e-5, err_msg=node)

    def mean(node):
        return expected[node][0] / expected[node][1]

    w_b = (W_B_Q.astype(np.float32) - B_ZP[:, None, None, None]) * B_SCALE[:, None, None, None]
    stat_b = mean("convB").reshape(2, -1)                  # groups 2 -> rows use their group's channels
    canon = {
        "W_a": (np.abs(W_A.reshape(6, -1)) * mean("convA").reshape(1, -1), lambda c: c.reshape(-1)),
        "W_b_q": (np.abs(w_b.reshape(6, -1)) * np.repeat(stat_b, 3, axis=0), lambda c: c.reshape(-1)),
        "W_c": (np.abs(W_C.astype(np.float32).T) * mean("gemmC")[None, :], lambda c: c.T.reshape(-1)),
        "W_d": (np.abs(W_D.reshape(7, 6)) * mean("matmulD")[None, :], lambda c: c.reshape(-1)),
        "W_e": (np.abs(W_E.reshape(4, -1)) * mean("conv1d").reshape(1, -1), lambda c: c.reshape(-1)),
    }
    for key, (score, to_stored) in canon.items():
        want = np.flatnonzero(to_stored(topk_oracle(score, 2)))
        assert res.indices[key].tolist() == want.tolist(), key


def test_conv_windows_auto_pad_lower():
    x = RNG.standard_normal((2, 3, 7, 6))
    conv = {"kernel": [2, 3], "strides": [2, 2], "dilations": [1, 2], "pads": [0, 0, 0, 0], "auto_pad": "SAME_LOWER"}
    got, n = conv_window_sums(np.abs(x).sum(0), conv)
    # SAME_LOWER: out = ceil(in / s); the extra pad goes at the beginning
    # H: out 4, total = (4-1)*2 + 2 - 7 = 1 -> (1, 0); W: out 3, total = (3-1)*2 + 5 - 6 = 3 -> (2, 1)
    want, m = windows(x, (2, 3), (2, 2), (1, 2), (1, 2, 0, 1))
    assert n * 2 == m
    np.testing.assert_allclose(got, want)


# (seed, cases, dims, kernel, dilation and spatial ranges (high exclusive), at least this many checked)
WINDOW_CASES = {
    # small maps: taps that read only padding, inputs barely larger than the kernel, 1-D/2-D/3-D
    "small": (7, 400, (1, 4), (1, 5), (1, 3), (1, 10), 201),
    # maps much larger than the kernel: the taps of a residue class share most of their run, summed once
    "large": (11, 60, (1, 3), (2, 6), (1, 4), (20, 41), 60),
}


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_conv_windows_match_sliding_windows_on_random_convs(case):
    """The per-axis window sums equal the sliding-window reference on random convs: kernels, strides (1-3),
    dilations and asymmetric pads."""
    seed, cases, dims, kernels, dils, sizes, least = WINDOW_CASES[case]
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(cases):
        nd = int(rng.integers(*dims))
        kernel = [int(v) for v in rng.integers(*kernels, nd)]
        strides = [int(v) for v in rng.integers(1, 4, nd)]
        dilations = [int(v) for v in rng.integers(*dils, nd)]
        pads = [int(v) for v in rng.integers(0, 4, 2 * nd)]
        spatial = [int(v) for v in rng.integers(*sizes, nd)]
        if any(sz + pads[i] + pads[i + nd] < (kernel[i] - 1) * dilations[i] + 1 for i, sz in enumerate(spatial)):
            continue
        x = rng.standard_normal((2, 3, *spatial)).astype(np.float32)
        conv = {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads}
        got, n = conv_window_sums(np.abs(x).sum(0), conv)
        want, m = windows(x, kernel, strides, dilations, pads)
        assert n * 2 == m, conv
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str((conv, spatial)))
        checked += 1
    assert checked >= least


def _random_conv(rng, nd, auto=False):
    kernel = [int(v) for v in rng.integers(1, 6, nd)]
    strides = [int(v) for v in rng.integers(1, 4, nd)]
    dilations = [int(v) for v in rng.integers(1, 3, nd)]
    pads = [int(v) for v in rng.integers(0, 4, 2 * nd)]
    spatial = [int(v) for v in rng.integers(1, 12, nd)]
    conv = {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads,
            "auto_pad": str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])) if auto else "NOTSET"}
    return conv, spatial


def _graph_cols(a, cols):
    """What observe._col_nodes computes from a batch's |x| [N, C, *spatial] (in float64)."""
    stride, left, right = cols
    width = a.shape[-1]
    whole = width - width % stride
    res = a[..., :whole].reshape(*a.shape[:-1], -1, stride).sum(axis=(0, a.ndim - 1))
    parts = [res, a[..., :left].sum(0), a[..., max(0, width - right):].sum(0)]
    return np.concatenate(parts, axis=-1)


def test_conv_col_window_sums_match_sliding_windows_on_random_convs():
    """Window sums finished from the graph's column reduction (residue classes + border columns) equal the
    sliding-window reference: 1-D/2-D/3-D, strides wider than the input, inputs narrower than the borders,
    dilation, asymmetric pads and auto_pad."""
    rng = np.random.default_rng(11)
    checked = narrow = 0
    for i in range(600):
        conv, spatial = _random_conv(rng, int(rng.integers(1, 4)), auto=i % 3 == 0)
        nd = len(spatial)
        pads = conv_pads(conv, spatial)
        flat = [p[0] for p in pads] + [p[1] for p in pads]
        if any(sz + flat[j] + flat[j + nd] < (conv["kernel"][j] - 1) * conv["dilations"][j] + 1
               for j, sz in enumerate(spatial)):
            continue
        x = rng.standard_normal((2, 3, *spatial))
        cols = (conv["strides"][-1], *col_borders(conv))
        got, n = conv_col_window_sums(_graph_cols(np.abs(x), cols), (2, 3, *spatial), conv, cols)
        want, m = windows(x, conv["kernel"], conv["strides"], conv["dilations"], flat)
        assert n * 2 == m, conv
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=str((conv, spatial)))
        checked += 1
        narrow += sum(cols[1:]) >= spatial[-1]
    assert checked > 300 and narrow > 30


@pytest.mark.parametrize("opset", [11, 17])
def test_conv_col_reduction_in_onnx_runtime_matches_sliding_windows(opset, tmp_path):
    """The same through ONNX Runtime: a conv fed from a Relu (so its input is an activation), the graph's column
    reduction (float32) and the host's window sums against float64 sliding windows, also for |x| and x*x."""
    rng = np.random.default_rng(5 + opset)
    checked = cols = 0
    for i in range(40):
        conv, spatial = _random_conv(rng, 1 + i % 3, auto=i % 4 == 0)
        nd = len(spatial)
        spatial = [sz + 2 for sz in spatial]
        pads = conv_pads(conv, spatial)
        flat = [p[0] for p in pads] + [p[1] for p in pads]
        if any(sz + flat[j] + flat[j + nd] < (conv["kernel"][j] - 1) * conv["dilations"][j] + 1
               for j, sz in enumerate(spatial)):
            continue
        w = rng.standard_normal((4, 3, *conv["kernel"])).astype(np.float32)
        attrs = {"strides": conv["strides"], "dilations": conv["dilations"]}
        if conv["auto_pad"] == "NOTSET":
            attrs["pads"] = conv["pads"]
        else:
            attrs["auto_pad"] = conv["auto_pad"]
        g = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Conv", ["r", "w"], ["y"], name="conv", **attrs)],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3] + [None] * nd)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
        proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 7
        onnx.save(proto, tmp_path / "m.onnx")
        model = load_model(tmp_path / "m.onnx")
        layers, _ = find_layers(model)
        kinds = [o.kind for o in plan_observers(layers)[0]]
        assert kinds == ["features" if pointwise(layers[0].conv) else "cols"]
        cols += kinds == ["cols"]
        x = rng.standard_normal((3, 3, *spatial)).astype(np.float32)
        st, _ = collect_stats(model, layers, [{"x": x}], kinds=("abs", "sq"), runtime=RuntimeConfig(provider="cpu"))
        r = np.maximum(x, 0).astype(np.float64)
        want, m = windows(r, conv["kernel"], conv["strides"], conv["dilations"], flat)
        want_sq, _ = windows(r * r, conv["kernel"], conv["strides"], conv["dilations"], flat)   # |r*r| = r*r
        assert st.counts["conv"] == m
        np.testing.assert_allclose(st.sums["conv"]["abs"], want, rtol=2e-6, atol=1e-9, err_msg=str(conv))
        np.testing.assert_allclose(st.sums["conv"]["sq"], want_sq, rtol=2e-6, atol=1e-9, err_msg=str(conv))
        checked += 1
    assert checked > 25 and cols > 20
