"""Peak memory figures belong to the process that reports them: a select started from a big parent (a benchmark
driver that exported the model, a notebook) must not report the parent's peak, as ``ru_maxrss`` does across
fork + exec on Linux."""
from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")

CHILD = "from fps_graph.runtime.memory import peak_rss_mb; print(peak_rss_mb())"


def test_a_child_of_a_big_parent_reports_its_own_peak():
    ballast = np.ones(400 * 2 ** 20 // 8)          # 400 MB, touched: the parent's peak is at least that
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert parent_peak > 400
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    child_peak = float(out.stdout)
    del ballast
    # the child imports numpy and onnx (~100 MB); ru_maxrss would have said >= the parent's 400+ MB
    assert 10 < child_peak < 250, (child_peak, parent_peak)


def test_peak_is_at_least_the_current_rss():
    from fps_graph.runtime.memory import peak_rss_mb, status_mb

    keep = np.ones(50 * 2 ** 20 // 8)
    assert peak_rss_mb() >= status_mb("VmRSS") - 1 > 50
    del keep
