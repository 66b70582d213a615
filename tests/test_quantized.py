"""Quantized weights: scored from the float activation entering them and the dequantized weight, against NumPy.

Test models are float models made here and quantized with onnxruntime.quantization (quantize_dynamic,
MatMulNBitsQuantizer); the reference dequantizes the stored integers by hand and takes E|x| from the float tensor
ONNX Runtime computes in the quantized model (exposed as an extra output), never from the code under test.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from fps_graph.errors import FpsGraphError
from fps_graph.formats.delta import SparseEntry, write_delta
from fps_graph.formats.masks import load_indices, read_metadata
from fps_graph.graph.apply import apply_delta
from fps_graph.graph.layers import find_layers
from fps_graph.graph.model import load_model
from fps_graph.selection.pipeline import SelectOptions, describe, make_plan, run_select, write_result

quantization = pytest.importorskip("onnxruntime.quantization")
logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
logging.getLogger().setLevel(logging.ERROR)
RNG = np.random.default_rng(3)


def _vi(name, elem=TP.FLOAT, shape=None):
    return h.make_tensor_value_info(name, elem, shape)


def _save(graph, path, opset=17, extra=()):
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset), *extra])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def float_mlp_conv(path: Path) -> Path:
    """x[N,16] -> mm1 (W1 16x32) -> Relu -> mm2 (W2 32x8); img[N,3,8,8] -> conv (K 6x3x3x3, stride 1, no pad)."""
    f = lambda *s: RNG.normal(size=s).astype(np.float32)   # noqa: E731
    nodes = [h.make_node("Conv", ["img", "K"], ["c"], name="conv"),
             h.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"), h.make_node("Relu", ["a"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    g = h.make_graph(nodes, "g", [_vi("x", shape=["N", 16]), _vi("img", shape=["N", 3, 8, 8])],
                     [_vi("y"), _vi("c")],
                     initializer=[nh.from_array(f(16, 32), "W1"), nh.from_array(f(32, 8), "W2"),
                                  nh.from_array(f(6, 3, 3, 3), "K")])
    return _save(g, path)


def _quantize_dynamic(src: Path, dst: Path, per_channel: bool, ops=("MatMul", "Conv")) -> Path:
    quantization.quantize_dynamic(str(src), str(dst), weight_type=quantization.QuantType.QInt8,
                                  per_channel=per_channel, op_types_to_quantize=list(ops))
    return dst


def _run_with(path: Path, feeds: dict, extra: list[str]) -> dict:
    """Run a model with some intermediate tensors added as outputs (the reference's view of the float inputs)."""
    m = onnx.load(str(path))
    for name in extra:
        m.graph.output.append(_vi(name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in m.graph.output]
    return dict(zip(names, sess.run(None, feeds)))


def _init(path: Path, name: str) -> np.ndarray:
    return next(nh.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name == name)


def _dq(path: Path, base: str, axis_shape) -> np.ndarray:
    """(q - zero_point) * scale by hand, parameters reshaped for broadcasting."""
    q = _init(path, f"{base}_quantized").astype(np.float64)
    s = _init(path, f"{base}_scale").astype(np.float64)
    z = _init(path, f"{base}_zero_point").astype(np.float64)
    if s.size > 1:
        s, z = s.reshape(axis_shape), z.reshape(axis_shape)
    return (q - z) * s


def _top1_stored(score_rows: np.ndarray, key_of_row_col) -> list[int]:
    """Top-1 input per output row (ties: lowest index), as sorted flat positions in the key layout."""
    best = np.argmax(score_rows, axis=1)
    return sorted(key_of_row_col(o, int(i)) for o, i in enumerate(best))


@pytest.mark.parametrize("per_channel", [False, True])
def test_matmul_integer_and_conv_integer_scored_against_numpy(tmp_path, per_channel):
    fpath = float_mlp_conv(tmp_path / "f.onnx")
    qpath = _quantize_dynamic(fpath, tmp_path / "q.onnx", per_channel)
    assert {n.op_type for n in onnx.load(str(qpath)).graph.node} >= {"MatMulInteger", "ConvInteger"}
    layers, skipped = find_layers(load_model(qpath))
    assert [(l.op, getattr(l, "node_op", ""), l.weight, l.activation) for l in layers] == [
        ("Conv", "ConvInteger", "K", "img"), ("MatMul", "MatMulInteger", "W1", "x"),
        ("MatMul", "MatMulInteger", "W2", "r")]
    x = RNG.normal(size=(24, 16)).astype(np.float32)
    img = RNG.normal(size=(24, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, img=img)
    res = run_select(qpath, str(tmp_path / "d.npz"), SelectOptions(k=1, batch_size=8))
    ref = _run_with(qpath, {"x": x, "img": img}, ["r"])
    # MatMul: canonical [N, K] = W.T; E|x| over rows
    for key, act in (("W1", x), ("W2", ref["r"])):
        w = _dq(qpath, key, (1, -1))                                       # [K, N]
        score = np.abs(w.T) * np.abs(act.astype(np.float64)).mean(0)      # [N, K]
        want = _top1_stored(score, lambda o, i, n=w.shape[1]: i * n + o)   # key layout [K, N]
        assert res.indices[key].tolist() == want, key
        assert res.tensors[key]["shape"] == list(w.shape) and res.tensors[key]["op"] == "MatMul"
    # Conv, no padding, stride 1: E over every window position of |x| at each (c, kh, kw)
    k = _dq(qpath, "K", (-1, 1, 1, 1))
    win = np.lib.stride_tricks.sliding_window_view(np.abs(img.astype(np.float64)), (3, 3), axis=(2, 3))
    stat = win.mean(axis=(0, 2, 3)).reshape(-1)                           # [C*3*3]
    score = np.abs(k.reshape(6, -1)) * stat
    assert res.indices["K"].tolist() == _top1_stored(score, lambda o, i: o * 27 + i)
    # the inventory: every int8 weight scored; scales and zero points belong to their weights
    assert res.metadata["weights"]["share"] == 1.0 and res.metadata["skipped"] == []
    assert res.metadata["weights"]["total_values"] == 16 * 32 + 32 * 8 + 6 * 27


def test_fps_scores_equal_the_numpy_reference_exactly(tmp_path):
    """Not only the top-1 pick: every score of the dequantized MatMulInteger weight."""
    from fps_graph.selection.scores import WeightScores

    qpath = _quantize_dynamic(float_mlp_conv(tmp_path / "f.onnx"), tmp_path / "q.onnx", True, ops=("MatMul",))
    x = RNG.normal(size=(10, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, img=np.zeros((10, 3, 8, 8), np.float32))
    res = run_select(qpath, str(tmp_path / "d.npz"), SelectOptions(k=1), stats_out=True)
    plan = make_plan(qpath)
    group = next(g for g in plan.groups if g.weight == "W1")
    got = WeightScores(group, plan.model, "fps", res.stats, "mean-abs", None, 0, 1e-6).full()
    want = np.abs(_dq(qpath, "W1", (1, -1)).T) * np.abs(x.astype(np.float64)).mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def nbits_model(tmp_path: Path, symmetric: bool, block: int = 16) -> tuple[Path, Path]:
    """A float MatMul (64 -> 40, K not a multiple of some blocks) after a Tanh, quantized to 4-bit MatMulNBits."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    w = RNG.normal(size=(56, 40)).astype(np.float32)
    g = h.make_graph([h.make_node("Tanh", ["x"], ["t"], name="tanh"), h.make_node("MatMul", ["t", "proj.W"], ["y"],
                                                                                  name="proj")],
                     "g", [_vi("x", shape=["N", 56])], [_vi("y")], initializer=[nh.from_array(w, "proj.W")])
    fpath = _save(g, tmp_path / "f.onnx", opset=21)
    quant = mnq.MatMulNBitsQuantizer(onnx.load(str(fpath)), block_size=block, is_symmetric=symmetric)
    quant.process()
    qpath = tmp_path / "q4.onnx"
    onnx.save(quant.model.model, str(qpath))
    return fpath, qpath


def _nbits_reference(qpath: Path) -> np.ndarray:
    """MatMulNBits' weight [K, N] dequantized by hand from its attributes and stored blocks (lowest nibble first)."""
    m = onnx.load(str(qpath))
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: h.get_attribute_value(a) for a in node.attribute}
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    inits = {t.name: nh.to_array(t) for t in m.graph.initializer}
    b = inits[node.input[1]]                     # [N, blocks, bs/2]
    blocks = b.shape[1]
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks * bs).astype(np.float64)
    s = inits[node.input[2]].reshape(n, blocks).astype(np.float64)
    if len(node.input) > 3 and node.input[3]:
        zp_packed = inits[node.input[3]].reshape(n, -1)
        z = np.stack([zp_packed & 0x0F, zp_packed >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float64)
    else:
        z = np.full((n, blocks), 8.0)
    w = (q.reshape(n, blocks, bs) - z[:, :, None]) * s[:, :, None]
    return w.reshape(n, -1)[:, :k].T


@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_nbits_int4_blocks_scored_against_numpy(tmp_path, symmetric):
    fpath, qpath = nbits_model(tmp_path, symmetric)
    m = onnx.load(str(qpath))
    assert [n.op_type for n in m.graph.node] == ["Tanh", "MatMulNBits"]
    w = _nbits_reference(qpath)                                           # [K, N] float64
    x = RNG.normal(size=(12, 56)).astype(np.float32)
    # the reference dequantization is what ONNX Runtime computes with
    y = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.tanh(x.astype(np.float64)) @ w, rtol=1e-4, atol=1e-4)
    plan = make_plan(qpath)
    assert [(l.weight, l.op, l.node_op, l.activation) for l in plan.layers] == [
        ("proj.W", "MatMul", "com.microsoft.MatMulNBits", "t")]
    np.testing.assert_allclose(plan.model.tensor("proj.W"), w, rtol=1e-6)
    np.save(tmp_path / "x.npy", x)
    res = run_select(qpath, str(tmp_path / "x.npy"), SelectOptions(k=2))
    stat = np.abs(np.tanh(x.astype(np.float64))).mean(0)
    score = np.abs(w.T) * stat                                            # [N, K]
    top2 = np.argsort(-score, axis=1, kind="stable")[:, :2]
    want = sorted(int(i) * 40 + o for o in range(40) for i in top2[o])
    assert res.indices["proj.W"].tolist() == want
    rec = res.tensors["proj.W"]
    assert rec["shape"] == [56, 40] and rec["layout"]["quantized"]["format"] == "nbits"
    assert rec["layout"]["quantized"]["source"] == "proj.W_Q4"
    inv = res.metadata["weights"]
    assert inv["total_values"] == 56 * 40 and inv["share"] == 1.0      # int4: two values per stored byte


def lstm_model(path: Path) -> Path:
    """x[T=5, N, 6] -> LSTM (hidden 8) -> Y; weights given as float W/R/B."""
    hid, inp = 8, 6
    f = lambda *s: RNG.normal(size=s).astype(np.float32)   # noqa: E731
    g = h.make_graph([h.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], name="lstm", hidden_size=hid)], "g",
                     [_vi("x", shape=[5, "N", inp])], [_vi("Y")],
                     initializer=[nh.from_array(f(1, 4 * hid, inp), "W"), nh.from_array(f(1, 4 * hid, hid), "R"),
                                  nh.from_array(f(1, 8 * hid), "B")])
    return _save(g, path)


def test_dynamic_quantize_lstm_scored_against_numpy(tmp_path):
    qpath = _quantize_dynamic(lstm_model(tmp_path / "l.onnx"), tmp_path / "lq.onnx", True, ops=("LSTM",))
    assert [n.op_type for n in onnx.load(str(qpath)).graph.node] == ["DynamicQuantizeLSTM"]
    x = RNG.normal(size=(5, 4, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    plan = make_plan(qpath)
    assert sorted(l.node_op for l in plan.layers) == ["com.microsoft.DynamicQuantizeLSTM"] * 2
    res = run_select(qpath, str(tmp_path / "x.npy"), SelectOptions(k=1, batch_size=4))
    y = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]   # [T,1,N,H]
    torch_blocks = [0, 2, 3, 1]            # PyTorch i,f,g,o from ONNX i,o,f,c
    for part, base, act in (("ih", "W", x), ("hh", "R", np.concatenate([np.zeros_like(y[:1]), y[:-1]])[:, 0])):
        q = _init(qpath, f"{base}_quantized").astype(np.float64)      # [1, in, 4H]
        s = _init(qpath, f"{base}_scale").astype(np.float64)          # [1, 4H]
        z = _init(qpath, f"{base}_zero_point").astype(np.float64)
        w = ((q - z[:, None, :]) * s[:, None, :])[0].T                  # [4H, in], ONNX gate order
        w = np.concatenate([w[b * 8:(b + 1) * 8] for b in torch_blocks])
        stat = np.abs(act.astype(np.float64)).reshape(-1, act.shape[-1]).mean(0)
        key = next(k for k in res.indices if k.endswith(f"weight_{part}_l0") or k.endswith(f"weight_{part}"))
        want = _top1_stored(np.abs(w) * stat, lambda o, i, n=w.shape[1]: o * n + i)
        assert res.indices[key].tolist() == want, key
    assert res.metadata["weights"]["share"] == pytest.approx((32 * 6 + 32 * 8) / (32 * 6 + 32 * 8 + 64))   # B: not scored


def cast_scale_graph(path: Path, with_zero_point: bool, scale_first: bool) -> tuple[Path, np.ndarray]:
    """MatMul(x, Mul(Cast(int8 W), scale[N])) (or with Sub(Cast(W), Cast(zp)) first): constants only."""
    q = RNG.integers(-100, 100, size=(12, 7)).astype(np.int8)
    scale = RNG.uniform(0.01, 0.1, size=7).astype(np.float32)
    zp = RNG.integers(-3, 3, size=7).astype(np.int8)
    nodes = [h.make_node("Cast", ["Wq"], ["Wc"], name="cast", to=TP.FLOAT)]
    src = "Wc"
    if with_zero_point:
        nodes += [h.make_node("Cast", ["zp"], ["zpf"], name="castz", to=TP.FLOAT),
                  h.make_node("Sub", ["Wc", "zpf"], ["Wz"], name="sub")]
        src = "Wz"
    nodes += [h.make_node("Mul", ["s", src] if scale_first else [src, "s"], ["Wf"], name="dq"),
              h.make_node("MatMul", ["x", "Wf"], ["y"], name="fc")]
    g = h.make_graph(nodes, "g", [_vi("x", shape=["N", 12])], [_vi("y")],
                     initializer=[nh.from_array(q, "Wq"), nh.from_array(scale, "s"), nh.from_array(zp, "zp")])
    w = (q.astype(np.float64) - (zp.astype(np.float64) if with_zero_point else 0)) * scale.astype(np.float64)
    return _save(g, path), w


@pytest.mark.parametrize("with_zero_point,scale_first", [(False, False), (True, True)])
def test_cast_times_scale_weight_is_scored(tmp_path, with_zero_point, scale_first):
    path, w = cast_scale_graph(tmp_path / "cs.onnx", with_zero_point, scale_first)
    x = RNG.normal(size=(9, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    plan = make_plan(path)
    assert [(l.node, l.weight) for l in plan.layers] == [("fc", "Wf")]      # the float weight's name in the graph
    res = run_select(path, str(tmp_path / "x.npy"), SelectOptions(k=1))
    score = np.abs(w.T) * np.abs(x.astype(np.float64)).mean(0)
    assert res.indices["Wf"].tolist() == _top1_stored(score, lambda o, i: i * 7 + o)
    assert plan.skipped == [] and res.metadata["weights"]["share"] == 1.0     # scale and zero point: part of Wf
    assert res.tensors["Wf"]["layout"]["quantized"] == {
        "source": "Wq", "format": "linear", "how": "Cast x scale", "scale": "s",
        "zero_point": "zp" if with_zero_point else ""}


def test_cast_times_scale_embedding_is_named_once_as_a_table(tmp_path):
    """A dequantized embedding read by Gather: one record naming the float view (its int8 source and scale are
    part of it), kind Gather."""
    q = RNG.integers(-100, 100, size=(20, 6)).astype(np.int8)
    w = RNG.normal(size=(6, 3)).astype(np.float32)
    nodes = [h.make_node("Cast", ["emb_q"], ["emb_f"], name="cast", to=TP.FLOAT),
             h.make_node("Mul", ["emb_f", "emb_scale"], ["emb.weight"], name="dq"),
             h.make_node("Gather", ["emb.weight", "ids"], ["e"], name="embed"),
             h.make_node("MatMul", ["e", "W"], ["y"], name="fc")]
    g = h.make_graph(nodes, "g", [_vi("ids", TP.INT64, ["N", 4])], [_vi("y")],
                     initializer=[nh.from_array(q, "emb_q"), nh.from_array(np.full((20, 1), 0.1, np.float32),
                                                                            "emb_scale"), nh.from_array(w, "W")])
    plan = make_plan(_save(g, tmp_path / "e.onnx"))
    named = [(s.weight, s.op, s.shape, s.dtype) for s in plan.skipped]
    assert named == [("emb.weight", "Gather", (20, 6), "float32")]
    inv = plan.inventory()
    assert (inv.total_values, inv.scored_values, inv.unscored_by_kind) == (120 + 18, 18, {"Gather": 120})


def test_dynamic_quantize_matmul_from_ort_optimizer(tmp_path):
    """ONNX Runtime fuses DynamicQuantizeLinear + MatMulInteger + Cast + Mul into com.microsoft
    DynamicQuantizeMatMul when it saves an optimized model; that is scored the same way."""
    qpath = _quantize_dynamic(float_mlp_conv(tmp_path / "f.onnx"), tmp_path / "q.onnx", True, ops=("MatMul",))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(qpath), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    if "DynamicQuantizeMatMul" not in ops:
        pytest.skip(f"this onnxruntime does not fuse to DynamicQuantizeMatMul ({sorted(ops)})")
    x = RNG.normal(size=(10, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, img=np.zeros((10, 3, 8, 8), np.float32))
    a = run_select(qpath, str(tmp_path / "d.npz"), SelectOptions(k=1))
    b = run_select(tmp_path / "opt.onnx", str(tmp_path / "d.npz"), SelectOptions(k=1))
    for key in ("W1", "W2"):
        assert a.indices[key].tolist() == b.indices[key].tolist()


def test_apply_refuses_quantized_weights_and_the_float_model_takes_the_delta(tmp_path):
    """Policy: apply never re-quantizes; it refuses in one line, and the same delta applies to the float model."""
    fpath = float_mlp_conv(tmp_path / "f.onnx")
    qpath = _quantize_dynamic(fpath, tmp_path / "q.onnx", True)
    x = RNG.normal(size=(8, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, img=RNG.normal(size=(8, 3, 8, 8)).astype(np.float32))
    res = run_select(qpath, str(tmp_path / "d.npz"), SelectOptions(k=1))
    write_result(res, tmp_path / "m.safetensors")
    idx = load_indices(tmp_path / "m.safetensors")["W1"]
    w1 = _init(fpath, "W1")
    delta = RNG.normal(size=idx.size).astype(np.float32) * 0.1
    entry = SparseEntry(idx, delta, w1.reshape(-1)[idx], w1.shape)
    meta = read_metadata(tmp_path / "m.safetensors")
    write_delta(tmp_path / "delta.safetensors", {"W1": entry}, {},
                {"W1": {"kind": "sparse", "shape": [16, 32], "dtype": "float32", **meta["tensors"]["W1"]}}, {}, {})
    with pytest.raises(FpsGraphError, match="stored quantized") as err:
        apply_delta(qpath, tmp_path / "delta.safetensors", tmp_path / "out.onnx")
    assert "float model" in str(err.value) and not (tmp_path / "out.onnx").exists()
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "apply", str(qpath),
                        str(tmp_path / "delta.safetensors"), "-o", str(tmp_path / "out.onnx")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "W1_quantized" in p.stderr
    report = apply_delta(fpath, tmp_path / "delta.safetensors", tmp_path / "out.onnx")
    assert [u["initializer"] for u in report["updated"]["W1"]] == ["W1"]
    tuned = w1.copy().reshape(-1)
    tuned[idx] = entry.values()
    np.testing.assert_array_equal(_init(tmp_path / "out.onnx", "W1").reshape(-1), tuned)


def test_qdq_weight_apply_is_refused_in_one_line(tmp_path):
    """A DequantizeLinear weight (QDQ) is scored (docs/robustness.md) but, stored as int8, never written."""
    q = RNG.integers(-50, 50, size=(6, 4)).astype(np.int8)
    g = h.make_graph([h.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wf"], name="dq"),
                      h.make_node("MatMul", ["x", "Wf"], ["y"], name="fc")], "g", [_vi("x", shape=["N", 6])],
                     [_vi("y")], initializer=[nh.from_array(q, "Wq"), nh.from_array(np.float32(0.05), "s"),
                                              nh.from_array(np.int8(1), "z")])
    path = _save(g, tmp_path / "qdq.onnx")
    np.save(tmp_path / "x.npy", RNG.normal(size=(5, 6)).astype(np.float32))
    res = run_select(path, str(tmp_path / "x.npy"), SelectOptions(k=1))
    w = (q.astype(np.float64) - 1) * 0.05
    score = np.abs(w.T) * np.abs(np.load(tmp_path / "x.npy").astype(np.float64)).mean(0)
    assert res.indices["Wq"].tolist() == _top1_stored(score, lambda o, i: i * 4 + o)
    idx = res.indices["Wq"]
    entry = SparseEntry(idx, np.full(idx.size, 0.01, np.float32), w.reshape(-1)[idx].astype(np.float32), w.shape)
    write_delta(tmp_path / "d.safetensors", {"Wq": entry}, {},
                {"Wq": {"kind": "sparse", "shape": [6, 4], "dtype": "float32", **res.tensors["Wq"]}}, {}, {})
    with pytest.raises(FpsGraphError, match="stored quantized"):
        apply_delta(path, tmp_path / "d.safetensors", tmp_path / "o.onnx")


def test_inspect_names_quantized_weights(tmp_path):
    qpath = _quantize_dynamic(float_mlp_conv(tmp_path / "f.onnx"), tmp_path / "q.onnx", False)
    view = describe(make_plan(qpath))
    rows = {(l["op"], l["weight"], tuple(l["weight_shape"])) for l in view["layers"]}
    assert rows == {("ConvInteger", "K", (6, 3, 3, 3)), ("MatMulInteger", "W1", (16, 32)),
                    ("MatMulInteger", "W2", (32, 8))}
    assert {(l["stored"], l["stored_dtype"]) for l in view["layers"]} == {
        ("K_quantized", "int8"), ("W1_quantized", "int8"), ("W2_quantized", "int8")}
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "inspect", str(qpath)], capture_output=True,
                       text=True)
    assert p.returncode == 0 and "W1 <- W1_quantized (int8)" in p.stdout
    assert view["weights"]["share"] == 1.0


def test_conv_integer_with_an_int32_bias_add_before_the_cast(tmp_path):
    """Older quantizers add the int32 bias between ConvInteger and the Cast (ddddocr, Kokoro); the scale is found
    through it and the scores are those of the same model without the Add."""
    fpath = float_mlp_conv(tmp_path / "f.onnx")
    qpath = _quantize_dynamic(fpath, tmp_path / "q.onnx", False, ops=("Conv",))
    m = onnx.load(str(qpath))
    conv = next(n for n in m.graph.node if n.op_type == "ConvInteger")
    cast = next(n for n in m.graph.node if n.op_type == "Cast" and n.input[0] == conv.output[0])
    m.graph.initializer.append(nh.from_array(np.arange(6, dtype=np.int32).reshape(1, 6, 1, 1), "bias_q"))
    m.graph.node.insert(list(m.graph.node).index(cast),
                        h.make_node("Add", [conv.output[0], "bias_q"], ["biased"], name="bias_add"))
    cast.input[0] = "biased"
    onnx.save(m, str(tmp_path / "qb.onnx"))
    img = RNG.normal(size=(6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 16), np.float32), img=img)
    a = run_select(qpath, str(tmp_path / "d.npz"), SelectOptions(k=2))
    b = run_select(tmp_path / "qb.onnx", str(tmp_path / "d.npz"), SelectOptions(k=2))
    assert [l.node_op for l in make_plan(tmp_path / "qb.onnx").layers if l.op == "Conv"] == ["ConvInteger"]
    assert a.indices["K"].tolist() == b.indices["K"].tolist() and b.metadata["weights"]["share"] == 1.0


def test_blocked_int4_dequantize_linear_is_scored(tmp_path):
    """opset 21 DequantizeLinear with block_size on an int4 weight (one scale and zero point per block of 8 along
    K): scored with the blocks dequantized by hand; the reference is first checked against ONNX Runtime."""
    k, n, bs = 32, 6, 8
    q = RNG.integers(-8, 8, size=(k, n)).astype(np.int8)
    scale = RNG.uniform(0.05, 0.2, size=(k // bs, n)).astype(np.float32)
    zp = RNG.integers(-2, 2, size=(k // bs, n)).astype(np.int8)
    wq = h.make_tensor("Wq", TP.INT4, [k, n], q.reshape(-1).tolist())
    zq = h.make_tensor("z", TP.INT4, [k // bs, n], zp.reshape(-1).tolist())
    g = h.make_graph([h.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wf"], name="dq", axis=0, block_size=bs),
                      h.make_node("MatMul", ["x", "Wf"], ["y"], name="fc")], "g", [_vi("x", shape=["N", k])],
                     [_vi("y")], initializer=[wq, nh.from_array(scale, "s"), zq])
    path = _save(g, tmp_path / "b4.onnx", opset=21)
    w = (q.astype(np.float64) - np.repeat(zp, bs, axis=0)) * np.repeat(scale.astype(np.float64), bs, axis=0)
    x = RNG.normal(size=(10, k)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
    np.save(tmp_path / "x.npy", x)
    res = run_select(path, str(tmp_path / "x.npy"), SelectOptions(k=2))
    score = np.abs(w.T) * np.abs(x.astype(np.float64)).mean(0)
    top = np.argsort(-score, axis=1, kind="stable")[:, :2]
    assert res.indices["Wq"].tolist() == sorted(int(i) * n + o for o in range(n) for i in top[o])
    assert res.metadata["weights"]["share"] == 1.0 and res.metadata["skipped"] == []
