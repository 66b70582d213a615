"""Where the time and memory of an ONNX Runtime selection pass go: per-op-type profile and RSS per batch.

    python -m bench.profile_ort --model vit-b16 --mode graph --batch-size 32 --batches 2 [--no-arena] [--no-pattern]

mode: graph (fps-graph's observed graph with in-graph reducers), host (raw activations as outputs) or plain (the
unmodified model). Prints the op types by total kernel time, the slowest nodes, and RSS after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict

import numpy as np

from bench.worker import maxrss_mb, rss_mb


def build_session(onnx_path: str, mode: str, threads: int, arena: bool, pattern: bool, opt_level: str,
                  profile_dir: str | None, extra: dict[str, str], order: str | None = None):
    import onnxruntime as ort

    from fps_graph.graph.observe import augment, plan_observers
    from fps_graph.graph.discover import find_layers
    from fps_graph.graph.model import load_model
    from fps_graph.runtime.session import _options

    model = load_model(onnx_path)
    proto = model.proto
    if mode != "plain":
        layers, _ = find_layers(model)
        observers, _ = plan_observers(layers)
        proto = augment(model.proto, observers, mode=mode, stats=("abs",))
    so = _options(opt_level, threads)
    so.enable_cpu_mem_arena = arena
    so.enable_mem_pattern = pattern
    if order:   # else whatever fps_graph.runtime.session sets
        so.execution_order = {"default": ort.ExecutionOrder.DEFAULT, "priority": ort.ExecutionOrder.PRIORITY_BASED,
                              "memory": ort.ExecutionOrder.MEMORY_EFFICIENT}[order]
    for k, v in extra.items():
        so.add_session_config_entry(k, v)
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "ort")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess


def summarize(profile_path: str, top: int = 15) -> None:
    events = json.load(open(profile_path))
    order = [e["name"][:-len("_kernel_time")] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    order = order[len(order) // 2:] if order else order   # the last run
    reducers = [i for i, n in enumerate(order) if n.startswith("fpsg_") and not n.endswith(("_size", "_shape"))]
    if reducers:
        print(f"execution order: {len(order)} kernels in the last run; reducers at positions "
              f"{reducers[:6]} ... {reducers[-3:]}")
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"] / 1e3
        by_node[e["name"][:-len("_kernel_time")]] += e["dur"] / 1e3
        count[op] += 1
    total = sum(by_op.values())
    print(f"kernel time {total:.0f} ms")
    for op, ms in sorted(by_op.items(), key=lambda x: -x[1])[:top]:
        print(f"  {op:24s} {ms:9.1f} ms {100 * ms / total:5.1f}%  ({count[op]} runs)")
    print("slowest nodes:")
    for n, ms in sorted(by_node.items(), key=lambda x: -x[1])[:top]:
        print(f"  {n:50s} {ms:9.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit-b16")
    p.add_argument("--mode", default="graph", choices=["graph", "host", "plain"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--opt-level", default="all")
    p.add_argument("--no-arena", action="store_true")
    p.add_argument("--no-pattern", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--order", default=None, choices=["default", "priority", "memory"],
                   help="SessionOptions.execution_order")
    p.add_argument("--config", action="append", default=[], help="ORT session config entry KEY=VALUE")
    a = p.parse_args()
    from bench.models import SPECS, ensure_model

    info = ensure_model(a.model)
    tmp = tempfile.mkdtemp() if a.profile else None
    base = rss_mb()
    t0 = time.perf_counter()
    sess = build_session(info["onnx"], a.mode, a.threads, not a.no_arena, not a.no_pattern, a.opt_level, tmp,
                         dict(kv.split("=", 1) for kv in a.config), a.order)
    print(f"session: {time.perf_counter() - t0:.1f} s, rss {rss_mb():.0f} MB (baseline {base:.0f}), "
          f"maxrss {maxrss_mb():.0f} MB")
    x = np.random.default_rng(0).standard_normal((a.batch_size, *SPECS[a.model].input_shape), dtype=np.float32)
    name = sess.get_inputs()[0].name
    for i in range(a.batches):
        t = time.perf_counter()
        out = sess.run(None, {name: x})
        print(f"batch {i}: {time.perf_counter() - t:.2f} s, outputs {sum(o.nbytes for o in out) / 2**20:.1f} MB, "
              f"rss {rss_mb():.0f} MB, maxrss {maxrss_mb():.0f} MB")
        del out
    if a.profile:
        summarize(sess.end_profiling())


if __name__ == "__main__":
    main()
