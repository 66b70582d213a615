"""External weights are read as read-only memory maps of their file (no copy), equal to onnx's own reader."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph.graph.model import load_model


@pytest.fixture()
def external_model(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((64, 32)).astype(np.float32),
              "f16": rng.standard_normal((8, 5)).astype(np.float16),
              "i8": rng.integers(-128, 127, (7, 3)).astype(np.int8),
              "i64": rng.integers(-9, 9, (5,)).astype(np.int64),
              "f64": rng.standard_normal((3, 3))}
    inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    bf = helper.make_tensor("bf16", TensorProto.BFLOAT16, [4], [1.0, 2.0, -3.0, 0.5])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "f32"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits + [bf])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    return path, arrays


def test_external_tensors_are_mapped_and_equal(external_model):
    path, arrays = external_model
    model = load_model(path)
    for name, want in arrays.items():
        got = model.tensor(name)
        assert isinstance(got, np.memmap) and not got.flags.writeable, name
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want), name
        ref = numpy_helper.to_array(model.initializers[name], base_dir=str(path.parent))
        assert np.array_equal(got, ref), name
    bf = model.tensor("bf16")                      # packed types are decoded by onnx's reader, not mapped
    assert not isinstance(bf, np.memmap) and bf.shape == (4,)


def test_embedded_tensors_are_read_as_before(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "e.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    got = load_model(path).tensor("w")
    assert not isinstance(got, np.memmap) and np.array_equal(got, w)
