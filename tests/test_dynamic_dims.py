"""A batch dimension declared as -1 (PaddlePaddle exports) or 0 is dynamic, like a named or unset one."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph.formats.masks import load_masks, read_metadata
from fps_graph.graph.model import input_shape


def _model(path, batch_dim: int) -> np.ndarray:
    """x [batch_dim, 6] -> MatMul W [6, 5]; the batch axis declared as an integer dim_value (-1, 0)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 5])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g", [x], [y],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return w


@pytest.mark.parametrize("dim", [-1, 0])
def test_non_positive_batch_is_dynamic(tmp_path, dim):
    path = tmp_path / "m.onnx"
    w = _model(path, dim)
    assert input_shape(onnx.load(str(path)).graph.input[0]) == (None, 6)
    rng = np.random.default_rng(4)
    data = (rng.standard_normal((21, 6)) * np.arange(1, 7) + 0.2).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    out = tmp_path / "masks.safetensors"
    p = subprocess.run([sys.executable, "-m", "fps_graph_cli.main", "select", str(path), str(tmp_path / "d.npy"),
                        "--batch-size", "8", "--k", "2", "-o", str(out), "--stats-out", str(tmp_path / "st.safetensors")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "fixed" not in p.stderr and "left over" not in p.stderr     # no batch size taken from the -1 / 0
    meta = read_metadata(out)
    assert meta["num_samples"] == 21 and meta["options"]["batch_size"] == 8    # 8 + 8 + 5: nothing dropped
    from fps_graph.selection.stats import Stats

    st = Stats.load(tmp_path / "st.safetensors")
    np.testing.assert_allclose(st.sums["fc"]["abs"], np.abs(data.astype(np.float64)).sum(0), rtol=1e-6)
    assert st.counts["fc"] == 21
    score = np.abs(w.T.astype(np.float64)) * np.abs(data.astype(np.float64)).mean(0)[None, :]   # [out, in]
    want = np.zeros_like(score, dtype=bool)
    for r in range(score.shape[0]):
        want[r, np.argsort(-score[r], kind="stable")[:2]] = True
    assert np.array_equal(load_masks(out)["W"], want.T)


def test_max_memory_with_minus_one_batch(tmp_path):
    """Micro-batching sizes slices from the -1 axis like from a named one."""
    path = tmp_path / "m.onnx"
    _model(path, -1)
    data = np.random.default_rng(5).standard_normal((16, 6)).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    from fps_graph.selection.pipeline import SelectOptions, run_select

    a = run_select(path, str(tmp_path / "d.npy"), SelectOptions(k=1, batch_size=8, provider="cpu", micro_batch=3))
    b = run_select(path, str(tmp_path / "d.npy"), SelectOptions(k=1, batch_size=8, provider="cpu"))
    assert a.calibration.micro_batch == 3
    np.testing.assert_allclose(a.stats.sums["fc"]["abs"], b.stats.sums["fc"]["abs"], rtol=1e-6)
