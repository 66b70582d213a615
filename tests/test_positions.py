"""Selected positions mapped by coordinate arithmetic == the full-size index arrays they replaced, on every layout:
Conv (grouped, depthwise, 1-D, DequantizeLinear), Gemm transB=1/0 (and transA), transposed MatMul from both
exporters, keys transposed back to the state_dict layout, Reshape/Squeeze/Unsqueeze/Flatten/Transpose chains."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph.selection.pipeline import make_plan
from fps_graph.selection.positions import canonical_to_key, canonical_to_stored

from test_graph_shapes import build_model


def _old_to_key(layer, info, pos: np.ndarray) -> np.ndarray:
    """The replaced implementation: full-size canonical index, key index and its inverse."""
    stored_pos = layer.canonical_index().reshape(-1)[pos]
    key_index = info.key_index(layer.stored_shape)
    inverse = np.empty_like(key_index)
    inverse[key_index] = np.arange(key_index.size)
    return np.sort(inverse[stored_pos])


def _check_plan(plan) -> int:
    """Every position of every scored layer (all consumers, not only the primary) maps as before."""
    checked = 0
    for group in plan.groups:
        info = plan.names[group.weight]
        for layer in group.layers:
            n = int(np.prod(layer.canonical_shape))
            every = np.arange(n, dtype=np.int64)
            assert np.array_equal(canonical_to_stored(layer, every), layer.canonical_index().reshape(-1))
            rng = np.random.default_rng(n)
            some = np.sort(rng.choice(n, size=min(n, 7), replace=False)).astype(np.int64)
            for pos in (every, some, every[:0]):
                new = canonical_to_key(layer, pos, info.perm)
                assert new.dtype == np.int64
                assert np.array_equal(new, _old_to_key(layer, info, pos)), (layer.node, info.key)
            checked += 1
    return checked


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("with_state_dict", [False, True])
def test_exported_layouts(exported, name, exporter, with_state_dict):
    model, path, _, _ = exported(name, exporter)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()} if with_state_dict else None
    plan = make_plan(path, state_dict=sd)
    perms = [plan.names[g.weight].perm for g in plan.groups]
    if with_state_dict and name != "cnn":
        assert any(p is not None for p in perms)   # transposed MatMul weights keyed back in [out, in]
    assert _check_plan(plan) == len(plan.layers)


def test_hand_built_chains(tmp_path):
    path = tmp_path / "shapes.onnx"
    build_model(path)   # Constant, DequantizeLinear, fp16 + Cast, Reshape + Transpose, Conv1d, Gemm transA
    plan = make_plan(path)
    assert _check_plan(plan) == 5


def test_squeeze_unsqueeze_flatten_chains(tmp_path):
    """W[1,3,4] -Squeeze-> [3,4] -Transpose-> [4,3] (MatMul); V[2,3,2,2] -Flatten(2)-> [6,4] (Gemm transB=0);
    U[8,18] -Reshape-> [8,2,3,3] (Conv); T[5,4] -Unsqueeze(0)-> -Squeeze(0)-> -Transpose-> (Gemm transB=1)."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((1, 3, 4)), "V": rng.standard_normal((2, 3, 2, 2)),
             "U": rng.standard_normal((8, 18)), "T": rng.standard_normal((5, 4))}
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
    tensors += [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in
                {"ax0": [0], "u_shape": [8, 2, 3, 3]}.items()]
    nodes = [
        helper.make_node("Squeeze", ["W", "ax0"], ["W2"]),
        helper.make_node("Transpose", ["W2"], ["W3"], perm=[1, 0]),
        helper.make_node("MatMul", ["a", "W3"], ["a_out"], name="mm"),
        helper.make_node("Flatten", ["V"], ["V2"], axis=2),
        helper.make_node("Gemm", ["b", "V2"], ["b_out"], name="gemm0"),
        helper.make_node("Reshape", ["U", "u_shape"], ["U2"]),
        helper.make_node("Conv", ["c", "U2"], ["c_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Unsqueeze", ["T", "ax0"], ["T2"]),
        helper.make_node("Squeeze", ["T2", "ax0"], ["T3"]),
        helper.make_node("Transpose", ["T3"], ["T4"], perm=[1, 0]),
        helper.make_node("Gemm", ["d", "T4"], ["d_out"], name="gemm1", transB=1),
    ]
    g = helper.make_graph(
        nodes, "chains",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 6]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 2, 5, 5]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a_out", "b_out", "c_out", "d_out")],
        tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "chains.onnx")
    plan = make_plan(tmp_path / "chains.onnx")
    chains = {l.node: [s["op"] for s in l.chain] for l in plan.layers}
    assert chains == {"mm": ["Squeeze", "Transpose"], "gemm0": ["Flatten"], "conv": ["Reshape"],
                      "gemm1": ["Unsqueeze", "Squeeze", "Transpose"]}
    assert _check_plan(plan) == 4
