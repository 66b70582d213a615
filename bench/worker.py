"""One benchmark measurement: one method, run in this (fresh) process, result written as JSON.

    python -m bench.worker --method ours --model vit-b16 --onnx M.onnx --weights W.safetensors \
        --data X.npy --labels Y.npy --batch-size 32 --samples 256 --threads 2 --out result.json

Methods (all read the same .npy through fps_graph's Loader, same batch size, same samples, same thread count):

* ``ours``  - fps_graph.selection.pipeline.run_select + write_result, i.e. exactly ``fps-graph select`` (in-graph reduction);
* ``ours-lean`` - the same with ``--max-memory auto`` (or MB): micro-batches near the memory floor, same masks;
* ``ours-whole`` - the same with whole batches (no micro-batching: the behaviour before lean-by-default);
* ``host``  - the same with ``--reduce host`` (raw activations leave ONNX Runtime, reduced in NumPy);
* ``hooks`` - FPS the obvious PyTorch way: forward pre-hooks on every nn.Linear / nn.Conv2d under torch.no_grad(),
  sum |x| per input feature (Conv: F.unfold windows), then |W| * E|x| and top-K per output neuron;
* ``gps``   - GPS-style: forward + backward (cross-entropy on the labels) over all batches, .grad accumulated,
  then top-K |grad| per output neuron;
* ``plain`` - ONNX Runtime inference of the unmodified model file (InferenceSession(path), the session options
  fps-graph uses) over the same data: the floor.

Memory: RSS after the imports (``baseline``), the process high-water RSS (``ru_maxrss``) at the end (``peak``),
and an RSS timeline sampled every 10 ms. On CUDA, torch.cuda.max_memory_allocated/reserved for the PyTorch methods
and, for every method, this process's device memory polled with nvidia-smi.
Time: ``total_s`` from after the imports to the masks written (model load, session creation or model build, the
pass over the data and the top-K), ``pass_s`` for the pass over the data alone (samples/s is taken from it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

T_START = time.perf_counter()
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2 ** 20


def maxrss_mb() -> float:
    """This process image's peak RSS: VmHWM, which starts again at exec. ``ru_maxrss`` keeps the parent's peak
    across fork + exec, so a driver that exported the model first inflated every child's figure (2,108 MB for a
    ~550 MB select). Read here, not from fps_graph.runtime.memory, so the plain-inference worker imports no
    fps_graph."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_used_mb() -> float | None:
    """The GPU's memory.used (MB) from nvidia-smi, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.strip().splitlines()[0])
    except Exception:
        return None


def cpu_s() -> float:
    """User + system CPU seconds of this process, all threads (less sensitive than wall time to other jobs)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Sampler(threading.Thread):
    """RSS (and, on CUDA, this process's device memory via nvidia-smi) sampled in the background."""

    def __init__(self, t0: float, interval: float = 0.01, smi: bool = False, smi_base: float | None = None):
        super().__init__(daemon=True)
        self.t0, self.interval, self.smi = t0, interval, smi
        self.smi_base = smi_base   # device memory.used before this process touched CUDA
        self.samples: list[tuple[float, float]] = []
        self.smi_peak_mb = 0.0
        self.smi_how = ""
        self._halt = threading.Event()
        self._smi_thread = None

    def run(self) -> None:
        if self.smi:
            self._smi_thread = threading.Thread(target=self._poll_smi, daemon=True)
            self._smi_thread.start()
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss_mb()))
            self._halt.wait(self.interval)

    def _poll_smi(self) -> None:
        pid = os.getpid()
        base = self.smi_base
        while not self._halt.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=5).stdout
                mine = [float(line.split(",")[1]) for line in out.strip().splitlines()
                        if line.strip() and int(line.split(",")[0]) == pid]
                if mine:
                    self.smi_how = "nvidia-smi per-process used_memory"
                    self.smi_peak_mb = max(self.smi_peak_mb, sum(mine))
                else:   # pid namespaces can hide our pid: fall back to device-wide used memory minus the start
                    dev = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout
                    used = float(dev.strip().splitlines()[0])
                    if base is None:
                        base = used
                    if not self.smi_how.startswith("nvidia-smi per-process"):
                        self.smi_how = "nvidia-smi device memory.used minus its value at process start"
                        self.smi_peak_mb = max(self.smi_peak_mb, used - base)
            except Exception:
                pass
            self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        if self._smi_thread is not None:
            self._smi_thread.join()

    def timeline(self, points: int = 400) -> list[tuple[float, float]]:
        s = self.samples
        if len(s) <= points:
            return [(round(t, 3), round(m, 1)) for t, m in s]
        step = len(s) / points
        out = []
        for i in range(points):   # keep the max of every bucket so the peak survives the downsampling
            chunk = s[int(i * step): int((i + 1) * step)] or [s[-1]]
            t, m = max(chunk, key=lambda x: x[1])
            out.append((round(t, 3), round(m, 1)))
        return out


# ----------------------------------------------------------------------------------------------------------------
# ONNX Runtime methods


def run_ours(a, reduce: str, max_memory_mb: float | str | None = None, whole: bool = False) -> dict:
    from fps_graph.selection.pipeline import SelectOptions, run_select, write_result

    opts = SelectOptions(k=a.k, reduce=reduce, provider=a.provider, threads=a.threads, batch_size=a.batch_size,
                         max_samples=a.samples, opt_level=a.opt_level, max_memory_mb=max_memory_mb,
                         micro_batch=a.batch_size if whole else None)
    res = run_select(a.onnx, a.data, opts)
    write_result(res, a.masks, force=True)
    s = res.summary
    return {"pass_s": s["calibration_seconds"], "ort_s": s["calibration_runtime_seconds"],
            "host_s": s["calibration_host_seconds"], "provider": s["provider"], "selected": s["selected"],
            "samples_seen": s["samples"], "micro_batch": s.get("micro_batch", 0), "max_memory_mb": max_memory_mb}


def run_plain(a, disabled: tuple[str, ...] = ()) -> dict:
    """What a user would write: an InferenceSession on the model file, same options as fps-graph's sessions.
    ``disabled``: ONNX Runtime optimizers turned off (``plain-nchw``: NchwcTransformer, as select runs a conv net
    whose inner conv inputs it observes: runtime/calibrate.py), to measure what that costs plain inference."""
    import onnxruntime as ort

    import numpy as np

    from fps_graph.data.dispatch import open_source
    from fps_graph.data.sources import InputSpec, Loader
    from fps_graph.runtime.session import _options

    so = _options(a.opt_level, a.threads)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if a.device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(a.onnx, so, providers=providers, disabled_optimizers=list(disabled) or None)
    session_rss = rss_mb()   # weights as ONNX Runtime holds them + the runtime: the floor before any activation
    provider = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    if a.device == "cuda" and provider != "cuda":
        raise SystemExit("plain: the CUDA provider is not usable")
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
    specs = [InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), np.dtype(types[i.type]))
             for i in sess.get_inputs()]
    loader = Loader(open_source(a.data, specs), batch_size=a.batch_size, max_samples=a.samples)
    names = [i.name for i in sess.get_inputs()]
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        sess.run(None, {k: batch[k] for k in names})
        n += int(next(iter(batch.values())).shape[0])
    pass_s = time.perf_counter() - t0
    return {"pass_s": pass_s, "provider": provider, "selected": 0, "samples_seen": n, "session_rss_mb": session_rss}


# ----------------------------------------------------------------------------------------------------------------
# PyTorch methods


def _scored_modules(model):
    import torch.nn as nn

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _canonical_stat(m, stat):
    """The per-input statistic broadcast to the weight's [out, fan_in] layout (grouped convs respected)."""
    import torch.nn as nn

    w = m.weight
    if isinstance(m, nn.Linear):
        return stat[None, :]
    g = m.groups
    cg = w.shape[1]
    per = stat.reshape(g, cg * w.shape[2] * w.shape[3])          # [groups, in/g * kh * kw]
    return per.repeat_interleave(w.shape[0] // g, dim=0)          # [out, fan_in]


def _topk_indices(score, k: int):
    import torch

    rows, cols = score.shape
    k = min(k, cols)
    top = torch.topk(score, k, dim=1).indices
    flat = (top + torch.arange(rows, device=score.device)[:, None] * cols).reshape(-1)
    return torch.sort(flat).values.to(torch.int32).cpu().numpy()


def _write_masks(path: str, masks: dict) -> None:
    from safetensors.numpy import save_file

    save_file(masks, path, metadata={"format": "bench-torch-masks"})


def _loader(a, model_name: str):
    """The same Loader over the same .npy as the ONNX methods (single input)."""
    from bench.models import SPECS
    from fps_graph.data.dispatch import open_source
    from fps_graph.data.sources import InputSpec, Loader
    import numpy as np

    spec = InputSpec("input", (None, *SPECS[model_name].input_shape), np.dtype(np.float32))
    return Loader(open_source(a.data, [spec]), batch_size=a.batch_size, max_samples=a.samples)


def run_torch(a, method: str) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from bench.models import load_torch

    dev = torch.device(a.device)
    model = load_torch(a.model, a.weights, device="cpu").to(dev)
    mods = _scored_modules(model)
    labels = np.load(a.labels) if method == "gps" else None
    loader = _loader(a, a.model)
    n = 0
    handles = []
    if method == "hooks":
        sums = {}
        counts = {}

        def make_hook(name, m):
            is_conv = isinstance(m, torch.nn.Conv2d)

            def hook(mod, args):
                x = args[0].detach()
                if is_conv:
                    cols = F.unfold(x.abs(), mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                                    stride=mod.stride)                  # [B, C*kh*kw, L]
                    s = cols.sum(dim=(0, 2), dtype=torch.float64)
                    c = cols.shape[0] * cols.shape[2]
                else:
                    f = x.shape[-1]
                    s = x.abs().reshape(-1, f).sum(dim=0, dtype=torch.float64)
                    c = x.numel() // f
                sums[name] = sums[name] + s if name in sums else s
                counts[name] = counts.get(name, 0) + c

            return hook

        for name, m in mods:
            handles.append(m.register_forward_pre_hook(make_hook(name, m)))
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in loader:
                x = torch.from_numpy(batch["input"]).to(dev, non_blocking=True)
                model(x)
                n += x.shape[0]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        pass_s = time.perf_counter() - t0
        for h in handles:
            h.remove()
        masks = {}
        with torch.no_grad():
            for name, m in mods:
                w = m.weight.detach()
                stat = (sums[name] / counts[name]).to(w.dtype)
                score = w.abs().reshape(w.shape[0], -1) * _canonical_stat(m, stat)
                masks[f"{name}.weight"] = _topk_indices(score, a.k)
    else:   # gps
        for p in model.parameters():
            p.requires_grad_(True)
        t0 = time.perf_counter()
        off = 0
        for batch in loader:
            x = torch.from_numpy(batch["input"]).to(dev, non_blocking=True)
            y = torch.from_numpy(labels[off:off + x.shape[0]]).to(dev, non_blocking=True)
            off += x.shape[0]
            loss = F.cross_entropy(model(x), y)
            loss.backward()          # .grad accumulates over the batches
            del loss
            n += x.shape[0]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        pass_s = time.perf_counter() - t0
        masks = {}
        with torch.no_grad():
            for name, m in mods:
                g = m.weight.grad
                masks[f"{name}.weight"] = _topk_indices(g.abs().reshape(g.shape[0], -1), a.k)
    _write_masks(a.masks, masks)
    out = {"pass_s": pass_s, "provider": a.device, "selected": int(sum(v.size for v in masks.values())),
           "samples_seen": n, "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2 ** 20
        out["gpu_name"] = torch.cuda.get_device_name()
    return out


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=["ours", "ours-lean", "ours-whole", "host", "hooks", "gps",
                                                        "plain", "plain-nchw"])
    p.add_argument("--max-memory", default=None, help="ours-lean: fps-graph select --max-memory MB|auto")
    p.add_argument("--model", required=True)
    p.add_argument("--onnx", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--opt-level", default="all")
    p.add_argument("--masks", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    a.provider = a.device

    torch_method = a.method in ("hooks", "gps")
    smi_base = device_used_mb() if a.device == "cuda" else None   # before any CUDA context of ours
    # Imports first: they are not part of the job, their memory is the baseline.
    import numpy  # noqa: F401

    import fps_graph.data.sources  # noqa: F401
    if not torch_method:
        import fps_graph.selection.pipeline  # noqa: F401
        import onnxruntime

        if a.device == "cuda" and hasattr(onnxruntime, "preload_dlls"):
            try:
                onnxruntime.preload_dlls()   # CUDA/cuDNN libraries from pip's nvidia-* packages, where installed
            except Exception:
                pass
    else:
        import torch

        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(a.threads)
        import torch._dynamo  # noqa: F401  (imported lazily by the meta-device build otherwise)
        import transformers  # noqa: F401
        import bench.models  # noqa: F401
        if a.device == "cuda":
            if not torch.cuda.is_available():
                print("CUDA is not available to torch", file=sys.stderr)
                return 3
            torch.zeros(1, device="cuda")   # create the context before the baseline
            torch.cuda.reset_peak_memory_stats()
    import_s = time.perf_counter() - T_START
    baseline = rss_mb()
    cpu0 = cpu_s()
    t0 = time.perf_counter()
    sampler = Sampler(t0, smi=a.device == "cuda", smi_base=smi_base)
    sampler.start()
    if a.method in ("ours", "host"):
        res = run_ours(a, "graph" if a.method == "ours" else "host")
    elif a.method == "ours-lean":
        res = run_ours(a, "graph", a.max_memory if a.max_memory == "auto" else float(a.max_memory))
    elif a.method == "ours-whole":
        res = run_ours(a, "graph", whole=True)
    elif a.method == "plain":
        res = run_plain(a)
    elif a.method == "plain-nchw":
        res = run_plain(a, ("NchwcTransformer",))
    else:
        res = run_torch(a, a.method)
    total_s = time.perf_counter() - t0
    cpu_total = cpu_s() - cpu0
    sampler.stop()
    peak = maxrss_mb()
    res.update({
        "method": a.method, "model": a.model, "batch_size": a.batch_size, "samples": a.samples, "k": a.k,
        "threads": a.threads, "device": a.device, "import_s": import_s, "total_s": total_s, "cpu_s": cpu_total,
        "samples_per_s": res["samples_seen"] / res["pass_s"] if res["pass_s"] > 0 else 0.0,
        "baseline_rss_mb": baseline, "peak_rss_mb": peak, "peak_above_baseline_mb": peak - baseline,
        "end_rss_mb": rss_mb(), "timeline": sampler.timeline(), "pid": os.getpid(),
    })
    if a.device == "cuda":
        res["smi_peak_mb"] = sampler.smi_peak_mb
        res["smi_how"] = sampler.smi_how
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
