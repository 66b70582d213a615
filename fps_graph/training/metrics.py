"""What a run measures, in one schema for every task and adapter, and its plot.

``metrics.json`` holds: ``task``, ``adapter`` (kind and settings), ``epochs`` (one record per epoch:
``train_loss``, the task's metrics prefixed ``train_``/``val_`` -- ``acc``, and ``ppl`` for causal-lm --,
``lr``, ``seconds``), ``initial`` (validation before training) and ``final``, ``trainable``
(``summary.TrainableSummary.to_json()``), ``memory`` (peak RSS of the training stretch, CUDA peak, training state),
``time`` (seconds, steps, seconds per step: mean and median, samples per second), ``machine`` (load average,
threads, device), ``samples``, ``classes``, ``data``, ``settings``, ``notes``, ``warnings`` and ``plot``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fps_graph.formats.io import atomic_output

__all__ = ["PeakMemory", "StepTimer", "plot_curves", "machine"]


class PeakMemory:
    """Peak resident memory of a stretch of work: Linux's VmHWM reset at start (clear_refs), else process peak;
    on CUDA, the peak of allocated device memory."""

    def __init__(self, device: str):
        self.device = device
        self.reset_ok = False
        self.before_mb = _status_mb("VmRSS")

    def start(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.before_mb = _status_mb("VmRSS")

    def report(self) -> dict[str, Any]:
        peak = _status_mb("VmHWM")
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 ** 2)
        out = {"peak_rss_mb": round(peak, 1), "rss_before_mb": round(self.before_mb or 0.0, 1),
               "peak_increase_mb": round(max(0.0, peak - (self.before_mb or 0.0)), 1),
               "peak_rss_scope": "training" if self.reset_ok else "process"}
        if self.device.startswith("cuda"):
            import torch

            out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        return out


def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class StepTimer:
    """Wall time of each optimiser step (forward, backward, step), synchronised on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.seconds: list[float] = []

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def report(self) -> dict[str, Any]:
        s = self.seconds
        return {"steps": len(s), "seconds_per_step": round(sum(s) / len(s), 6) if s else 0.0,
                "seconds_per_step_median": round(statistics.median(s), 6) if s else 0.0}


def machine(device: str) -> dict[str, Any]:
    """The load average, torch threads and device of a run (timings taken on a shared machine say so)."""
    import torch

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    out: dict[str, Any] = {"loadavg": load, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "device": device}
    if device.startswith("cuda"):
        out["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
    return out


def plot_curves(epochs: Sequence[dict[str, Any]], path: Path, initial: dict[str, Any] | None = None) -> str | None:
    """Loss and the task's metric (accuracy, or perplexity for causal-lm) per epoch as a PNG; returns a warning
    instead when matplotlib is missing or drawing fails (a plot never loses a finished run)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed; no training-curve plot (pip install matplotlib)"
    try:
        _draw(epochs, path, initial, Figure, FigureCanvasAgg)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:
        return f"could not draw the training curve: {type(exc).__name__}: {exc}"
    return None


def _draw(epochs: Sequence[dict[str, Any]], path: Path, initial: dict[str, Any] | None, Figure: Any,
          FigureCanvasAgg: Any) -> None:
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    e = [r["epoch"] for r in epochs]
    second = "ppl" if "train_ppl" in epochs[0] else "acc"      # causal LM: perplexity
    ax1.plot(e, [r["train_loss"] for r in epochs], "o-", label="train")
    ax2.plot(e, [r[f"train_{second}"] for r in epochs], "o-", label="train")
    if "val_loss" in epochs[0]:
        ve = ([0] if initial else []) + e
        ax1.plot(ve, ([initial["val_loss"]] if initial else []) + [r["val_loss"] for r in epochs], "s-", label="val")
        ax2.plot(ve, ([initial[f"val_{second}"]] if initial else []) + [r[f"val_{second}"] for r in epochs], "s-",
                 label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax2.set_xlabel("epoch")
    if second == "ppl":
        ax2.set_ylabel("perplexity")
        ax2.set_yscale("log")
    else:
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.02)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("fps-graph train")
    fig.tight_layout()
    with atomic_output(path, force=True) as tmp:
        fig.savefig(str(tmp), format="png")
