"""CalibrationInfo's split of the pass: time inside ONNX Runtime's run and time adding its outputs up on the host."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import fps_graph.runtime.calibrate as calibrate
from fps_graph.graph.discover import find_layers
from fps_graph.graph.model import load_model
from fps_graph.runtime.calibrate import collect_stats
from fps_graph.selection.pipeline import SelectOptions, run_select

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
PAUSE = 0.02


def _batches(n: int = 4):
    rng = np.random.default_rng(5)
    return [{"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


def test_host_time_is_the_window_sums_and_runtime_time_the_run(monkeypatch):
    """A pause in every conv window sum lands in host_seconds, not in runtime_seconds; both lie within seconds."""
    model = load_model(SAMPLE)
    layers, _ = find_layers(model)
    convs = [la for la in layers if la.op == "Conv" and la.conv and any(k > 1 for k in la.conv["kernel"])]
    assert convs, "the sample needs a non-pointwise conv"
    _, before = collect_stats(model, layers, _batches())
    calls = []

    def slowed(real):
        def slow(*args):
            calls.append(1)
            time.sleep(PAUSE)
            return real(*args)
        return slow

    for name in ("conv_window_sums", "conv_col_window_sums"):     # whole maps, or the graph's column sums
        monkeypatch.setattr(calibrate, name, slowed(getattr(calibrate, name)))
    _, info = collect_stats(model, layers, _batches())
    assert calls and info.host_seconds >= PAUSE * len(calls)
    assert info.runtime_seconds < before.runtime_seconds + PAUSE * len(calls) / 2
    for i in (before, info):
        assert 0 < i.runtime_seconds and 0 < i.host_seconds
        assert i.runtime_seconds + i.host_seconds <= i.seconds


def test_select_summary_reports_the_split(tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.concatenate([b["input"] for b in _batches()]))
    res = run_select(str(SAMPLE), str(data), SelectOptions(k=1, batch_size=2))
    s = res.summary
    assert s["calibration_runtime_seconds"] == res.calibration.runtime_seconds > 0
    assert s["calibration_host_seconds"] == res.calibration.host_seconds > 0
    assert s["calibration_runtime_seconds"] + s["calibration_host_seconds"] <= s["calibration_seconds"]
