"""Provider choice: the CUDA probe is a one-node model; no session is built for the model on CUDA where the probe
fails (onnxruntime-gpu lists CUDA on machines without a GPU, and the fallback loads the whole model once more)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fps_graph.errors import FpsGraphError
from fps_graph.runtime import session as session_mod


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.fixture
def sessions(monkeypatch):
    """Record the providers of every InferenceSession built for a model with a weight (not the probe)."""
    built: list[list[str]] = []
    real = ort.InferenceSession

    def spy(source, *args, **kwargs):
        sess = real(source, *args, **kwargs)
        if isinstance(source, bytes) and b"probe" not in source:
            built.append(list(kwargs.get("providers") or []))
        return sess

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return built


def test_no_model_session_on_cuda_when_the_probe_fails(monkeypatch, sessions):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session_mod, "cuda_usable", lambda: False)
    s = session_mod.create_session(_model(), provider="auto")
    assert s.provider == "cpu"
    assert sessions == [["CPUExecutionProvider"]]   # one session, on CPU; none tried on CUDA
    y = s.session.run(None, {"x": np.ones((2, 3), np.float32)})[0]
    assert np.array_equal(y, np.ones((2, 3), np.float32) @ np.arange(6, dtype=np.float32).reshape(3, 2))


def test_cuda_asked_but_probe_fails_is_one_clear_error(monkeypatch, sessions):
    monkeypatch.setattr(session_mod, "cuda_usable", lambda: False)
    with pytest.raises(FpsGraphError, match="CUDA provider requested but not usable"):
        session_mod.create_session(_model(), provider="cuda")
    assert sessions == []


def test_probe_ok_but_model_falls_back_still_runs_on_cpu(monkeypatch, sessions):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session_mod, "cuda_usable", lambda: True)
    monkeypatch.setattr(session_mod, "_try_cuda", lambda *a, **k: None)
    assert session_mod.create_session(_model(), provider="auto").provider == "cpu"


def test_probe_is_asked_once_per_process():
    session_mod.cuda_usable.cache_clear()
    first = session_mod.cuda_usable()
    assert session_mod.cuda_usable() == first
    assert session_mod.cuda_usable.cache_info().hits >= 1
