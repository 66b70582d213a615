"""What every benchmark results file records about its run: git commit, machine, versions, threads, load.

Two spellings of one record:

    from bench.meta import run_meta, load_now
    meta = run_meta(threads=2)           # at the start: commit, machine, versions, load
    ...
    meta["load_end"] = load_now()        # at the end

    from bench.meta import RunMeta
    meta = RunMeta(threads=2)            # at the start (the same record, plus the start time)
    ...
    res["meta"] = meta.finish()          # at the end: load_end, seconds, finished, under_load

Versions are read in a child process, so the driver never imports torch (a child's ``ru_maxrss`` starts from its
parent's RSS at fork). Timings taken while other jobs share the machine are "under load": the load averages before
and after say so, and ``under_load`` flags a run whose 1-minute load exceeded half the cores.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("onnxruntime", "onnx", "numpy", "torch", "transformers", "tokenizers", "fps_graph")


def load_now() -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes; 2 cores: above 2 means contention)."""
    return [round(v, 2) for v in os.getloadavg()]


def git_commit() -> dict:
    """The checkout's commit and whether the library or CLI had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "fps_graph", "cli", "bench")
    return {"commit": git("rev-parse", "HEAD"), "short": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(dirty), "dirty_files": dirty.splitlines()[:20]}


def machine() -> dict:
    """CPU model, cores, memory, platform (and the GPU where nvidia-smi answers)."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["ram_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
                    break
    except OSError:
        pass
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if gpu.returncode == 0 and gpu.stdout.strip():
            info["gpu"] = gpu.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def versions() -> dict:
    """Package versions, read in a child process."""
    code = ("import json, importlib\nv = {}\n"
            f"for m in {PACKAGES!r}:\n"
            "    try:\n        v[m] = importlib.import_module(m).__version__\n"
            "    except Exception:\n        v[m] = None\nprint(json.dumps(v))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:
        return {}


def run_meta(threads: int | None = None, command: str | None = None) -> dict:
    """The record a results file starts with (add ``load_end`` when the run ends)."""
    return {"command": command if command is not None else " ".join([Path(sys.executable).name, *sys.argv]),
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": git_commit(), "machine": machine(), "versions": versions(), "threads": threads,
            "load_start": load_now()}


class RunMeta:
    """``run_meta`` taken at the start of a run and completed by ``finish`` at its end.

    Args:
        threads (`int`, *optional*): the threads the benchmark asked for (ONNX Runtime / torch intra-op).
        command (`str`, *optional*): how the run was started (default: this process's command line).
        **extra: anything else worth keeping beside it (device, model), stored under ``"extra"``.
    """

    def __init__(self, threads: int | None = None, command: str | None = None, **extra):
        self._t0 = time.perf_counter()
        self.block = run_meta(threads, command)
        self.extra = extra

    def finish(self) -> dict:
        """The record, with the load at the end, the run's duration and whether the machine was loaded."""
        out = dict(self.block)
        out["load_end"] = load_now()
        out["seconds"] = round(time.perf_counter() - self._t0, 3)
        out["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        peak = max(out["load_start"][:1] + out["load_end"][:1], default=0.0)
        out["under_load"] = peak > 0.5 * cores     # more runnable work than half the cores: timings are noisy
        out["extra"] = self.extra
        return out
