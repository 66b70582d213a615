"""Recurrent layers (ONNX LSTM/GRU/RNN) against nn.LSTM/nn.GRU/nn.RNN: statistics, masks, names, apply."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fps_graph.formats.masks import load_masks  # noqa: E402
from fps_graph.selection.pipeline import SelectOptions, describe, make_plan, run_select  # noqa: E402

from oracle import topk_oracle  # noqa: E402

IN, HID, T, N, B = 5, 4, 6, 12, 4
CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Net(nn.Module):
    """A recurrent module fed sample-first data; seq-first modules get the transpose inside."""

    def __init__(self, kind: str, layers: int, bidir: bool, batch_first: bool, state: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.state = state
        self.rnn = CLASSES[kind](IN, HID, num_layers=layers, bidirectional=bidir, batch_first=batch_first)

    def forward(self, x, *hx):
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.state:
            out = self.rnn(x, tuple(hx) if len(hx) > 1 else hx[0])[0]
        else:
            out = self.rnn(x)[0]
        return out if self.batch_first else out.transpose(0, 1)


def build(kind: str, layers: int, bidir: bool, batch_first: bool, state: bool = False, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(kind, layers, bidir, batch_first, state)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def state_inputs(net: Net, batch: int, seed: int = 3) -> list[np.ndarray]:
    """h0 (and c0 for LSTM): [layers * dirs, batch, H], non-zero."""
    rnn = net.rnn
    d = 2 if rnn.bidirectional else 1
    rng = np.random.default_rng(seed)
    n = 2 if isinstance(rnn, nn.LSTM) else 1
    return [(rng.standard_normal((rnn.num_layers * d, batch, HID)) * 0.7).astype(np.float32) for _ in range(n)]


def export(net: Net, path: Path, dynamo: bool, hx: list[np.ndarray] | None = None, fold: bool = True) -> Path:
    """Export; fold=False keeps the parameters unfolded (W stacked from weight_ih_l0 etc. in the graph), with a
    dynamic batch (dynamo then computes the slice bounds from shapes)."""
    x = torch.randn(B, T, IN)
    args = (x, *[torch.from_numpy(h) for h in hx or []])
    names = ["x"] + (["h0", "c0"][: len(hx)] if hx else [])
    kw: dict = {}
    if not fold:
        kw = {"optimize": False, "dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},)} if dynamo \
            else {"do_constant_folding": False, "dynamic_axes": {"x": {0: "b"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, args, str(path), input_names=names, output_names=["y"], dynamo=dynamo, **kw)
    return path


def data(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, T, IN)) * rng.uniform(0.5, 2.0, IN) + 0.3).astype(np.float32)


def oracle(net: Net, x: np.ndarray, hx: list[np.ndarray] | None = None, batch: int = B) -> dict[str, tuple]:
    """{PyTorch weight name: (sum |a|, sum a^2, count)} of the activation each weight multiplies, from PyTorch.

    One single-layer module per layer (weights copied) gives every layer's input and output sequence; the chain
    is checked against the full module. W reads x_t; R reads h_(t-1): h0 then outputs 0..T-2 (forward), outputs
    1..T-1 then h0 (reverse).
    """
    rnn = net.rnn
    dirs = 2 if rnn.bidirectional else 1
    acc: dict[str, list] = {}

    def add(key: str, a: torch.Tensor) -> None:
        a = a.double().reshape(-1, a.shape[-1])
        s = [a.abs().sum(0).numpy(), a.square().sum(0).numpy(), a.shape[0]]
        if key in acc:
            acc[key] = [acc[key][0] + s[0], acc[key][1] + s[1], acc[key][2] + s[2]]
        else:
            acc[key] = s

    with torch.no_grad():
        for start in range(0, len(x), batch):
            inp = torch.from_numpy(x[start:start + batch]).transpose(0, 1)     # [T, b, in]
            nb = inp.shape[1]
            states = [torch.from_numpy(h) for h in hx] if hx else [torch.zeros(rnn.num_layers * dirs, nb, HID)] * (
                2 if isinstance(rnn, nn.LSTM) else 1)
            full_in = inp
            for layer in range(rnn.num_layers):
                kw = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
                one = type(rnn)(inp.shape[-1], HID, num_layers=1, bidirectional=rnn.bidirectional, **kw)
                for sfx in ["", "_reverse"][:dirs]:
                    for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(one, f"{p}_l0{sfx}").copy_(getattr(rnn, f"{p}_l{layer}{sfx}"))
                h = [s[layer * dirs:(layer + 1) * dirs] for s in states]
                out = one(inp, tuple(h) if len(h) > 1 else h[0])[0]            # [T, b, dirs*H]
                for d, sfx in enumerate(["", "_reverse"][:dirs]):
                    add(f"rnn.weight_ih_l{layer}{sfx}", inp)
                    o = out[..., d * HID:(d + 1) * HID]
                    prev = torch.cat([h[0][d][None], o[:-1]]) if d == 0 else torch.cat([o[1:], h[0][d][None]])
                    add(f"rnn.weight_hh_l{layer}{sfx}", prev)
                inp = out
            hxs = tuple(states) if len(states) > 1 else states[0]
            ref = rnn(full_in.transpose(0, 1), hxs)[0].transpose(0, 1) if rnn.batch_first else rnn(full_in, hxs)[0]
            torch.testing.assert_close(inp, ref, rtol=1e-5, atol=1e-6)         # the chain is the module
    return {k: tuple(v) for k, v in acc.items()}


def select(path: Path, dpath: Path, **kw):
    opts = SelectOptions(**{"batch_size": B, "provider": "cpu", "k": 1, **kw})
    return run_select(path, str(dpath), opts, stats_out=True)


CASES = [
    ("lstm", 1, False, False, "legacy"), ("lstm", 2, True, True, "legacy"), ("lstm", 2, True, False, "legacy"),
    ("lstm", 1, False, True, "legacy"), ("gru", 2, True, True, "legacy"), ("gru", 1, False, False, "legacy"),
    ("rnn", 2, True, False, "legacy"),
    ("lstm", 2, True, True, "dynamo"), ("gru", 2, True, False, "dynamo"), ("rnn", 1, False, True, "dynamo"),
    ("lstm", 2, True, True, "legacy-nofold"), ("gru", 2, True, True, "dynamo-nofold"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("rnn")
    cache: dict = {}

    def get(kind, layers, bidir, bf, exporter):
        key = (kind, layers, bidir, bf, exporter)
        if key not in cache:
            net = build(kind, layers, bidir, bf)
            path = export(net, root / ("_".join(map(str, key)) + ".onnx"), exporter.startswith("dynamo"),
                          fold="nofold" not in exporter)
            dpath = root / "x.npy"
            np.save(dpath, data())
            cache[key] = (net, path, dpath)
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_statistics_and_names_match_pytorch(exported, case):
    net, path, dpath = exported(*case)
    res = select(path, dpath)
    ref = oracle(net, data())
    assert set(res.tensors) == set(ref), (sorted(res.tensors), sorted(ref))
    for key, rec in res.tensors.items():
        assert rec["torch"] == key
        a, s, cnt = ref[key]
        count = sum(res.stats.counts[n] for n in rec["nodes"])          # one node, or the steps of an unrolled RNN
        if case[0] == "rnn" and case[4] == "dynamo":   # dynamo unrolls nn.RNN into per-step MatMuls (shared W)
            assert rec["op"] == "MatMul"
            if "weight_hh" in key:                     # no MatMul for h_(-1) = 0 (folded away): T-1 steps
                cnt = cnt // T * (T - 1)
        assert count == cnt, key
        np.testing.assert_allclose(sum(res.stats.sums[n]["abs"] for n in rec["nodes"]), a, rtol=2e-5, atol=1e-6,
                                   err_msg=key)
        np.testing.assert_allclose(sum(res.stats.sums[n]["sq"] for n in rec["nodes"]), s, rtol=2e-5, atol=1e-6,
                                   err_msg=key)
        assert tuple(rec["shape"]) == tuple(dict(net.named_parameters())[key].shape)
        if rec["op"] == "MatMul":
            continue
        if "nofold" in case[4]:                        # the stored parameter itself, in PyTorch's layout
            assert rec["onnx"] == key and rec["layout"] == {"transpose": None}
            continue
        gates = rec["layout"]["recurrent"]["gate_order"]
        assert gates["torch"] == {"lstm": "ifgo", "gru": "rzn", "rnn": "h"}[case[0]]


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7], CASES[9]],
                         ids=["lstm-legacy", "gru-legacy", "lstm-dynamo", "rnn-dynamo-unrolled"])
@pytest.mark.parametrize("score", ["fps", "wanda"])
def test_masks_match_oracle(exported, case, score, tmp_path):
    net, path, dpath = exported(*case)
    ref = oracle(net, data())
    params = dict(net.named_parameters())
    for k in (1, 2):
        res = select(path, dpath, score=score, k=k)
        for key, (a, s, cnt) in ref.items():
            stat = a / cnt if score == "fps" else np.sqrt(s / cnt)
            want = topk_oracle(np.abs(params[key].detach().double().numpy()) * stat[None, :], k)
            got = np.zeros(want.size, dtype=bool)
            got[res.indices[key]] = True
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"{key} k={k}")


def test_initial_state_from_static_inputs(tmp_path):
    """A non-zero h0/c0, fed once for every batch as static inputs, enters R's statistics exactly."""
    net = build("lstm", 2, True, True, state=True)
    hx = state_inputs(net, B)
    path = export(net, tmp_path / "m.onnx", False, hx)
    np.save(tmp_path / "x.npy", data())
    for i, h in enumerate(hx):
        np.save(tmp_path / f"h{i}.npy", h)
    static = {"h0": str(tmp_path / "h0.npy"), "c0": str(tmp_path / "h1.npy")}
    res = select(path, tmp_path / "x.npy", static=static)
    ref = oracle(net, data(), hx)
    for key, rec in res.tensors.items():
        np.testing.assert_allclose(res.stats.sums[rec["nodes"][0]]["abs"], ref[key][0], rtol=2e-5, atol=1e-6)
        assert res.stats.counts[rec["nodes"][0]] == ref[key][2]
    assert res.stats.num_samples == N


def test_inspect_lists_biases_and_layouts(exported):
    net, path, _ = exported("lstm", 2, True, True, "legacy")
    view = describe(make_plan(path))
    names = sorted(layer["name"] for layer in view["layers"])
    assert names == sorted(k for k in dict(net.named_parameters()) if "weight" in k)
    assert any("recurrent biases are not scored" in s["reason"] for s in view["skipped"])
    assert not any("not scored by this version" in s["reason"] for s in view["skipped"])


def _hand_lstm(tmp_path: Path, seq_lens: bool = False, op: str = "LSTM", lbr: int = 1) -> Path:
    gates = {"LSTM": 4, "GRU": 3}[op]
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1, gates * HID, IN)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, gates * HID, HID)).astype(np.float32), "R")
    inputs = ["x", "W", "R", "", "seq" if seq_lens else ""]
    attrs = {"hidden_size": HID}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, inputs, ["Y"], name="rec", **attrs)
    graph_inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [T, "b", IN])]
    if seq_lens:
        graph_inputs.append(helper.make_tensor_value_info("seq", onnx.TensorProto.INT32, ["b"]))
    g = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
                          [w, r])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / f"{op}_{seq_lens}_{lbr}.onnx"
    onnx.save(m, p)
    return p


def test_sequence_lens_is_scored(tmp_path):
    """W and R of a node with sequence_lens are scored (statistics: tests/test_recurrent_seq.py)."""
    plan = make_plan(_hand_lstm(tmp_path, seq_lens=True))
    assert sorted(getattr(layer, "part") for layer in plan.layers) == ["hh", "ih"]
    assert all(getattr(layer, "seq") == "seq" for layer in plan.layers)
    assert not any("sequence_lens" in s.reason for s in plan.skipped)


def test_gru_without_linear_before_reset_scores_only_w(tmp_path):
    plan = make_plan(_hand_lstm(tmp_path, op="GRU", lbr=0))
    assert [getattr(layer, "part") for layer in plan.layers] == ["ih"]
    assert any("linear_before_reset=0" in s.reason for s in plan.skipped)


def test_lstm_cell_weights_traced_through_slices(tmp_path):
    """nn.LSTMCell (legacy export): gates are sliced from weight_ih and concatenated in ONNX order; traced back."""

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.LSTMCell(IN, HID)

        def forward(self, x):
            return self.cell(x)[0]

    torch.manual_seed(0)
    net = Cell().eval()
    path = tmp_path / "cell.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(B, IN),), str(path), input_names=["x"], dynamo=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, IN)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = run_select(path, str(tmp_path / "x.npy"), SelectOptions(batch_size=B, provider="cpu", k=1))
    plan = make_plan(path)
    layers = {layer.weight: layer for layer in plan.layers}
    weight = plan.model.tensor(next(w for w in layers if "weight_ih" in w))
    np.testing.assert_array_equal(weight, net.cell.weight_ih.detach().numpy())
    stat = np.abs(x.astype(np.float64)).mean(0)
    key = next(k for k in res.indices if "weight_ih" in k)
    want = topk_oracle(np.abs(net.cell.weight_ih.detach().double().numpy()) * stat[None], 1)
    got = np.zeros(want.size, dtype=bool)
    got[res.indices[key]] = True
    np.testing.assert_array_equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6], CASES[7], CASES[10], CASES[11]],
                         ids=["lstm-legacy", "gru-legacy", "rnn-legacy", "lstm-dynamo", "lstm-legacy-nofold",
                              "gru-dynamo-nofold"])
def test_apply_writes_trained_delta_back_with_gate_order(exported, case, tmp_path):
    """Train-side deltas on weight_ih/hh and full biases, applied to the ONNX file: ONNX output == PyTorch."""
    import onnxruntime as ort

    from fps_graph.graph.apply import apply_delta
    from fps_graph.selection.pipeline import write_result
    from fps_graph.training.sparse import attach, save_delta

    net, path, dpath = exported(*case)
    res = select(path, dpath, k=2)
    masks = tmp_path / "masks.safetensors"
    write_result(res, masks)
    tuned = build(*case[:4])
    handle = attach(tuned, str(masks))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    delta = tmp_path / "delta.safetensors"
    save_delta(handle, delta)
    out = tmp_path / "tuned.onnx"
    apply_delta(path, delta, out)
    x = data()[:B]
    with torch.no_grad():
        want = tuned(torch.from_numpy(x)).numpy()
        before = net(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(want - before).max() > 1e-3          # the delta changes the output
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert load_masks(masks)                           # masks keyed by PyTorch names load back


def _silero_model() -> Path | None:
    """silero-vad's default ONNX model from its pip wheel (``pip install --no-deps silero-vad``), found without
    importing the package (its __init__ imports torch utilities)."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    return path if path.is_file() else None


@pytest.mark.skipif(_silero_model() is None, reason="silero-vad wheel not installed (pip install --no-deps silero-vad)")
def test_silero_vad_conv_and_lstm_from_audio_and_static_state(tmp_path):
    """The default silero-vad model: Conv layers and the LSTM inside If bodies, from audio chunks plus its state
    and sample rate given once as static inputs; R's statistics are exactly those of the state fed (T=1)."""
    rng = np.random.default_rng(0)
    chunks = 12
    audio = (0.1 * rng.standard_normal((chunks, 512))).astype(np.float32)
    state = rng.standard_normal((2, 1, 128)).astype(np.float32)
    np.save(tmp_path / "audio.npy", audio)
    np.save(tmp_path / "state.npy", state)
    np.save(tmp_path / "sr.npy", np.array(16000, dtype=np.int64))
    static = {"state": str(tmp_path / "state.npy"), "sr": str(tmp_path / "sr.npy")}
    res = run_select(_silero_model(), str(tmp_path / "audio.npy"),
                     SelectOptions(batch_size=1, provider="cpu", k=1, static=static), stats_out=True)
    keys = sorted(res.tensors)
    convs = [k for k in keys if "encoder" in k]
    assert len(convs) == 4 and all(k.startswith("If_0_then_branch") for k in convs)   # sr == 16000 branch
    hh = "If_0_then_branch__Inline_0__decoder.rnn.weight_hh"
    ih = "If_0_then_branch__Inline_0__decoder.rnn.weight_ih"
    assert {hh, ih} <= set(keys)
    assert res.tensors[hh]["shape"] == [512, 128] and res.tensors[hh]["layout"]["transpose"] is None
    # the two LSTM nodes of the inner If (batch of one or not) share the weights: one mask entry, pooled
    nodes = res.tensors[hh]["nodes"]
    assert len(nodes) == 2
    counts = sum(res.stats.counts.get(n, 0) for n in nodes)
    sums = sum(res.stats.sums[n]["abs"] for n in nodes)
    assert counts == chunks
    np.testing.assert_allclose(sums, chunks * np.abs(state[0, 0].astype(np.float64)), rtol=1e-6)   # h_(-1) = state[0]
    assert sum(res.stats.counts.get(n, 0) for n in res.tensors[ih]["nodes"]) == chunks
    assert all(res.tensors[k]["selected"] == res.tensors[k]["shape"][0] for k in keys)            # k=1 per row
    assert any("never taken" in w or "no calibration data" in w or "saw no" in w for w in res.warnings)


def test_static_state_with_another_batch_size_says_what_to_do(tmp_path):
    from fps_graph.errors import FpsGraphError

    net = build("gru", 1, False, True, state=True)
    hx = state_inputs(net, B)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(B, T, IN), torch.from_numpy(hx[0])), str(path), input_names=["x", "h0"],
                          dynamic_axes={"x": {0: "b"}, "h0": {1: "b"}}, dynamo=False)
    np.save(tmp_path / "x.npy", data())
    np.save(tmp_path / "h0.npy", hx[0])
    with pytest.raises(FpsGraphError, match=r"h0 \[1, 4, 4\].*must match the batch size 3: set --batch-size"):
        select(path, tmp_path / "x.npy", static={"h0": str(tmp_path / "h0.npy")}, batch_size=3)


def _layout_pair(tmp_path: Path, op: str) -> tuple[Path, Path, np.ndarray]:
    """The same bidirectional node as layout=0 (after a Transpose) and layout=1, with h0 given; and h0 [D, B, H]."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((2, gates * HID, IN)).astype(np.float32), "W")
    r = numpy_helper.from_array((0.5 * rng.standard_normal((2, gates * HID, HID))).astype(np.float32), "R")
    h0 = rng.standard_normal((2, B, HID)).astype(np.float32)
    attrs = {"hidden_size": HID, "direction": "bidirectional"}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    paths = []
    for layout in (0, 1):
        nodes = []
        x = "x"
        if layout == 0:
            nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]))
            x = "xt"
        nodes.append(helper.make_node(op, [x, "W", "R", "", "", "h0"], ["Y"], name="rec", layout=layout, **attrs))
        hshape = [2, B, HID] if layout == 0 else [B, 2, HID]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", T, IN]),
                                           helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, hshape)],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], [w, r])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        p = tmp_path / f"{op}_layout{layout}.onnx"
        onnx.save(m, p)
        paths.append(p)
    return paths[0], paths[1], h0


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_hand_built_bidirectional_node_matches_numpy(tmp_path, op):
    """R's statistics equal a NumPy reference on the node's own Y and a given h0 (h_(t-1) = h0, Y[:-1] forward;
    Y[1:], h0 reverse); W's are E|x_t|. (ONNX Runtime's CPU kernels refuse layout=1, so only layout=0 runs.)"""
    import onnxruntime as ort

    p0, _, h0 = _layout_pair(tmp_path, op)
    x = data()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "h0.npy", h0)
    res = select(p0, tmp_path / "x.npy", static={"h0": str(tmp_path / "h0.npy")})
    assert len(res.tensors) == 4
    sess = ort.InferenceSession(str(p0), providers=["CPUExecutionProvider"])
    ys = [sess.run(None, {"x": x[s:s + B], "h0": h0})[0] for s in range(0, N, B)]   # [T, 2, B, H] each
    for key, rec in res.tensors.items():
        node = rec["nodes"][0]
        assert res.stats.counts[node] == N * T
        d = 1 if key.endswith("_reverse") else 0
        if "weight_ih" in key:
            want = np.abs(x.astype(np.float64)).sum((0, 1))
        else:
            want = np.zeros(HID)
            for y in ys:
                y = y[:, d]
                prev = np.concatenate([h0[d][None], y[:-1]]) if d == 0 else np.concatenate([y[1:], h0[d][None]])
                want += np.abs(prev.astype(np.float64)).sum((0, 1))
        np.testing.assert_allclose(res.stats.sums[node]["abs"], want, rtol=1e-5, err_msg=key)


@pytest.mark.skipif(_silero_model() is None, reason="silero-vad wheel not installed (pip install --no-deps silero-vad)")
def test_silero_vad_zero_state_warns_that_r_scores_tie(tmp_path):
    np.save(tmp_path / "audio.npy", (0.1 * np.random.default_rng(1).standard_normal((3, 512))).astype(np.float32))
    np.save(tmp_path / "state.npy", np.zeros((2, 1, 128), np.float32))
    np.save(tmp_path / "sr.npy", np.array(16000, dtype=np.int64))
    static = {"state": str(tmp_path / "state.npy"), "sr": str(tmp_path / "sr.npy")}
    res = run_select(_silero_model(), str(tmp_path / "audio.npy"),
                     SelectOptions(batch_size=1, provider="cpu", k=1, static=static))
    notes = [w for w in res.warnings if "every h_(t-1) it multiplied was zero" in w]
    assert len(notes) == 1 and notes[0].startswith("If_0_then_branch__Inline_0__decoder.rnn.weight_hh:")


def test_module_called_twice_is_one_pooled_entry(tmp_path):
    """The same nn.GRU applied twice (legacy export: two GRU nodes on the same initializers): one key per weight,
    statistics pooled over both calls (counts add up; sums equal the two calls' PyTorch inputs)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(IN, IN, batch_first=True)

        def forward(self, x):
            return self.rnn(self.rnn(x)[0])[0]

    torch.manual_seed(0)
    net = Twice().eval()
    path = tmp_path / "twice.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(B, T, IN),), str(path), input_names=["x"], dynamo=False)
    np.save(tmp_path / "x.npy", data())
    res = select(path, tmp_path / "x.npy")
    assert sorted(res.tensors) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    rec = res.tensors["rnn.weight_ih_l0"]
    assert len(rec["nodes"]) == 2
    with torch.no_grad():
        x = torch.from_numpy(data())
        h1 = net.rnn(x)[0]
    want = np.abs(x.double().numpy()).sum((0, 1)) + np.abs(h1.double().numpy()).sum((0, 1))
    got = sum(res.stats.sums[n]["abs"] for n in rec["nodes"])
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert sum(res.stats.counts[n] for n in rec["nodes"]) == 2 * N * T
