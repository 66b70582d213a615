"""Recurrent nodes with sequence_lens against nn.LSTM/GRU/RNN on packed sequences: only the steps a sequence runs
count, for W (x_t) and R (h_(t-1)), forward, reverse and bidirectional."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from fps_graph.selection.pipeline import SelectOptions, describe, make_plan, run_select  # noqa: E402

from oracle import topk_oracle  # noqa: E402

IN, HID, T, N, B = 5, 4, 7, 12, 4
LENS = np.array([7, 3, 1, 5, 6, 2, 7, 4, 1, 3, 5, 2], dtype=np.int32)
CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
TO_ONNX = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}     # ONNX gate blocks as PyTorch blocks


def _onnx_rows(op: str, w: np.ndarray) -> np.ndarray:
    return np.concatenate([w[b * HID:(b + 1) * HID] for b in TO_ONNX[op]])


def module(op: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mod = CLASSES[op](IN, HID, bidirectional=True)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mod.eval()


def build(path: Path, op: str, direction: str, mod: nn.Module, h0: bool) -> list[str]:
    """x [B, T, in] (+ lens [B], h0 [B, D, H]) -> Transpose -> one ONNX node with sequence_lens; the node's
    directions take the module's forward and/or reverse weights. Returns the PyTorch suffix of each direction."""
    sfx = {"forward": [""], "reverse": ["_reverse"], "bidirectional": ["", "_reverse"]}[direction]
    get = lambda n: getattr(mod, n).detach().numpy()    # noqa: E731
    w = np.stack([_onnx_rows(op, get(f"weight_ih_l0{s}")) for s in sfx])
    r = np.stack([_onnx_rows(op, get(f"weight_hh_l0{s}")) for s in sfx])
    bias = np.stack([np.concatenate([_onnx_rows(op, get(f"bias_ih_l0{s}")), _onnx_rows(op, get(f"bias_hh_l0{s}"))])
                     for s in sfx])
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w, "W"), (r, "R"), (bias, "Bias"))]
    nodes = [helper.make_node("Transpose", ["x"], ["X"], perm=[1, 0, 2], name="tx")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", T, IN]),
              helper.make_tensor_value_info("lens", TensorProto.INT32, ["b"])]
    if h0:
        nodes.append(helper.make_node("Transpose", ["h0"], ["H0"], perm=[1, 0, 2], name="th"))
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["b", len(sfx), HID]))
    attrs = {"hidden_size": HID, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    nodes.append(helper.make_node(op, ["X", "W", "R", "Bias", "lens", "H0" if h0 else ""], ["Y"], name="rec",
                                  **attrs))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return sfx


def data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """x with large values past each length (a leak would show) and h0 [N, 2, H]."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, T, IN)) * rng.uniform(0.5, 2.0, IN) + 0.3).astype(np.float32)
    for b, n in enumerate(LENS):
        x[b, n:] = 1000.0
    h0 = (0.7 * rng.standard_normal((N, 2, HID))).astype(np.float32)
    return x, h0


def reference(op: str, mod: nn.Module, x: np.ndarray, h0: np.ndarray | None, sfx: list[str]) -> dict:
    """{(part, suffix): (sum |a|, count)} from the module on packed sequences: x_t for t < len; h_(t-1) of each
    direction: h0 then outputs 0..len-2 (forward); outputs 1..len-1 then h0 (reverse, which starts at len-1)."""
    packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(LENS.astype(np.int64)), batch_first=True,
                                  enforce_sorted=False)
    hx = torch.zeros(2, N, HID)          # the module is bidirectional; the node's directions take their states
    for j, s in enumerate(sfx if h0 is not None else []):
        hx[0 if s == "" else 1] = torch.from_numpy(h0[:, j])
    with torch.no_grad():
        out, _ = mod(packed, (hx, torch.zeros_like(hx)) if op == "LSTM" else hx)
    out = pad_packed_sequence(out, batch_first=True, total_length=T)[0].double().numpy()   # [N, T, 2H]
    hx = hx.double().numpy()
    ref = {}
    xa = sum(np.abs(x[b, :n].astype(np.float64)).sum(0) for b, n in enumerate(LENS))
    for s in sfx:
        ref[("ih", s)] = (xa, int(LENS.sum()))
        d = 0 if s == "" else 1
        acc = np.zeros(HID)
        for b, n in enumerate(LENS):
            y = out[b, :, d * HID:(d + 1) * HID]
            for t in range(n):
                if d == 0:
                    prev = hx[d, b] if t == 0 else y[t - 1]
                else:
                    prev = hx[d, b] if t == n - 1 else y[t + 1]
                acc += np.abs(prev)
        ref[("hh", s)] = (acc, int(LENS.sum()))
    return ref, out


CASES = [("LSTM", "forward", False), ("LSTM", "reverse", True), ("LSTM", "bidirectional", True),
         ("GRU", "bidirectional", False), ("GRU", "reverse", False), ("RNN", "forward", True),
         ("RNN", "bidirectional", True)]


@pytest.mark.parametrize("op,direction,h0", CASES, ids=[f"{o}-{d}-{'h0' if h else 'zero'}" for o, d, h in CASES])
def test_sequence_lens_statistics_and_masks_match_packed_pytorch(tmp_path, op, direction, h0):
    import onnxruntime as ort

    mod = module(op)
    path = tmp_path / "m.onnx"
    sfx = build(path, op, direction, mod, h0)
    x, h = data()
    hd = h[:, :len(sfx)] if h0 else None
    feeds = {"x": x, "lens": LENS}
    if h0:
        feeds["h0"] = hd
    np.savez(tmp_path / "d.npz", **feeds)
    ref, out = reference(op, mod, x, hd if h0 else None, sfx)
    # the ONNX node computes what the packed module does (valid steps), zeros past each length
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, feeds)[0]                                           # [T, D, N, H]
    for j, s in enumerate(sfx):
        d = 0 if s == "" else 1
        got = y[:, j].transpose(1, 0, 2)
        for b, n in enumerate(LENS):
            np.testing.assert_allclose(got[b, :n], out[b, :n, d * HID:(d + 1) * HID], rtol=1e-4, atol=1e-5)
            assert not got[b, n:].any()
    res = run_select(path, str(tmp_path / "d.npz"), SelectOptions(batch_size=B, provider="cpu", k=2))
    assert len(res.tensors) == 2 * len(sfx)
    for key, rec in res.tensors.items():
        info = rec["layout"]["recurrent"]
        s = sfx[info["direction"]]
        node = rec["nodes"][0]
        a, cnt = ref[(info["part"], s)]
        assert res.stats.counts[node] == cnt, key
        np.testing.assert_allclose(res.stats.sums[node]["abs"], a, rtol=1e-5, err_msg=key)
        w = getattr(mod, f"weight_{info['part']}_l0{s}").detach().double().numpy()    # PyTorch gate order
        want = topk_oracle(np.abs(w) * (a / cnt)[None, :], 2)
        got = np.zeros(want.size, dtype=bool)
        got[res.indices[key]] = True
        np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=key)


def test_batch_first_with_sequence_lens_is_refused_per_weight(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1, 4 * HID, IN)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, 4 * HID, HID)).astype(np.float32), "R")
    node = helper.make_node("LSTM", ["x", "W", "R", "", "lens"], ["Y"], name="rec", hidden_size=HID, layout=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", T, IN]),
                                        helper.make_tensor_value_info("lens", TensorProto.INT32, ["b"])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [w, r])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "m.onnx"))
    view = describe(make_plan(tmp_path / "m.onnx"))
    assert view["layers"] == []
    assert any("sequence_lens" in s["reason"] and "layout=1" in s["reason"] for s in view["skipped"])
