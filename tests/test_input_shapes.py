"""Declared input shapes: a dim of -1 (paddle2onnx's dynamic batch) is dynamic, not a fixed batch size."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fps_graph.graph.model import input_shape, load_model
from fps_graph.selection.pipeline import SelectOptions, run_select


def test_minus_one_dim_is_dynamic(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    assert input_shape(load_model(tmp_path / "m.onnx").graph.input[0]) == (None, 4)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32))
    res = run_select(tmp_path / "m.onnx", str(tmp_path / "x.npy"), SelectOptions(k=1, provider="cpu", batch_size=4))
    assert res.stats.num_samples == 10 and not any("fixed" in w for w in res.warnings)
    want = np.abs(np.load(tmp_path / "x.npy").astype(np.float64)).sum(0)
    np.testing.assert_allclose(res.stats.sums["mm"]["abs"], want, rtol=1e-6)
