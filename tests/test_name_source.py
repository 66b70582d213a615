"""The masks' `torch` field holds PyTorch names only; the summary says where statistics came from."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph.formats.masks import read_metadata


def _model(path, names: list[str], producer: str, branch_name: str | None = None) -> None:
    """x [B, 4] -> MatMul by each named [4, 4] weight in turn; optionally one more inside an If branch."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in names]
    nodes, cur = [], "x"
    for i, n in enumerate(names):
        nodes.append(helper.make_node("MatMul", [cur, n], [f"h{i}"], name=f"mm{i}"))
        cur = f"h{i}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])]
    if branch_name:
        w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), branch_name)
        then = helper.make_graph([helper.make_node("MatMul", [cur, branch_name], ["t"], name="then_mm")], "then",
                                 [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)], [w])
        other = helper.make_graph([helper.make_node("Identity", [cur], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
        nodes.append(helper.make_node("If", ["c"], ["out"], name="if0", then_branch=then, else_branch=other))
        cur = "out"
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name=producer)
    m.ir_version = 8
    onnx.save(m, str(path))


def _select(*args) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "select", *map(str, args)], capture_output=True,
                       text=True)
    return p.returncode, p.stderr


def test_paddle2onnx_node_names_mark_a_stripped_producer(tmp_path):
    """PP-OCRv4's files carry no producer name; their p2o.* node names still say paddle2onnx wrote them."""
    path = tmp_path / "m.onnx"
    _model(path, ["fc1.weight"], "")
    m = onnx.load(str(path))
    m.graph.node[0].name = "p2o.MatMul.0"
    onnx.save(m, str(path))
    out = tmp_path / "masks.safetensors"
    assert _select(path, "-o", out, "--score", "magnitude", "-q")[0] == 0
    rec = read_metadata(out)["tensors"]["fc1.weight"]
    assert rec["torch"] is None and rec["name_source"] == "onnx-name"


@pytest.mark.parametrize("producer,names,torch_names", [
    ("pytorch", ["fc1.weight", "blocks.0.fc2.weight"], ["fc1.weight", "blocks.0.fc2.weight"]),
    ("tf2onnx", ["model/dense/kernel:0", "dense_1.kernel"], [None, None]),          # TensorFlow's own paths
    ("PaddlePaddle", ["conv2d_0.w_0", "linear_1.w_0"], [None, None]),               # looks dotted, is Paddle's
    ("pytorch", ["fc1.weight", "If_0_then_branch__Inline_0__fc.weight"], ["fc1.weight", None]),  # inliner-made
    ("", ["W", "fc.weight"], [None, "fc.weight"]),
    ("", ["conv2d_transpose_0.w_0", "fc.weight"], [None, "fc.weight"]),    # Paddle's names, producer stripped
])
def test_torch_field_only_for_pytorch_names(tmp_path, producer, names, torch_names):
    path = tmp_path / "m.onnx"
    _model(path, names, producer)
    out = tmp_path / "masks.safetensors"
    code, err = _select(path, "-o", out, "--score", "magnitude", "-q")
    assert code == 0, err
    tensors = read_metadata(out)["tensors"]
    assert sorted(tensors) == sorted(names)                  # keys stay the graph's names either way
    for name, want in zip(names, torch_names):
        assert tensors[name]["torch"] == want, (name, tensors[name])
        assert tensors[name]["name_source"] == ("initializer-name" if want else "onnx-name")


def test_branch_constant_named_by_inliner_is_not_a_torch_name(tmp_path):
    path = tmp_path / "m.onnx"
    _model(path, ["fc1.weight"], "pytorch", branch_name="If_0_then_branch__Inline_0__fc.weight")
    out = tmp_path / "masks.safetensors"
    assert _select(path, "-o", out, "--score", "magnitude", "-q")[0] == 0
    rec = read_metadata(out)["tensors"]["If_0_then_branch__Inline_0__fc.weight"]
    assert rec["torch"] is None and rec["name_source"] == "onnx-name"


def test_summary_without_data_says_so(tmp_path):
    path = tmp_path / "m.onnx"
    _model(path, ["fc1.weight"], "pytorch")
    out = tmp_path / "masks.safetensors"
    code, err = _select(path, "-o", out, "--score", "magnitude", "--k", "1")
    assert code == 0, err
    assert "0 samples" not in err and "samples/s" not in err and " none " not in err
    assert "no data read (--score magnitude uses none)" in err
    data = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    st = tmp_path / "st.safetensors"
    code, err = _select(path, tmp_path / "d.npy", "-o", out, "--stats-out", st, "--force")
    assert code == 0, err
    assert "10 samples on cpu at" in err
    code, err = _select(path, "-o", out, "--stats-in", st, "--force")
    assert code == 0, err
    assert "statistics of 10 samples read from --stats-in" in err and "samples/s" not in err
