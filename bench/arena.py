"""ONNX Runtime's CPU arena settings against micro-batching: peak RSS of fps-graph's calibration pass.

    python -m bench.arena --model vit-b16-eager --batch-size 32 --samples 64 --micro 0,8

Each cell runs in its own process: ``BatchStats`` (fps-graph's observed graph, in-graph reducers) over the same
seeded images, with the arena on (ORT's default, extends by powers of two), off (``enable_cpu_mem_arena=False``) or
a shared environment arena that extends by what is requested (``kSameAsRequested``), whole batches (micro 0) or
micro-batches. Results: bench/results/NAME.json and NAME.md (peak RSS, RSS after the session, pass seconds).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.meta import RunMeta

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODES = ("on", "off", "same")

CHILD = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
import fps_graph.runtime.session as S
onnx_path, data, mode, micro, batch, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
orig = S._options
def options(*a, **k):
    so = orig(*a, **k)
    if mode == "off":
        so.enable_cpu_mem_arena = False
    if mode == "same":
        so.add_session_config_entry("session.use_env_allocators", "1")
    return so
S._options = options
if mode == "same":
    ort.create_and_register_allocator(
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
        ort.OrtArenaCfg({"arena_extend_strategy": 1}))   # 1 = kSameAsRequested
from fps_graph.graph.model import load_model
from fps_graph.graph.layers import find_layers
from fps_graph.runtime.calibrate import BatchStats
from fps_graph.runtime.config import RuntimeConfig
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
m = load_model(onnx_path)
layers, _ = find_layers(m)
step = BatchStats(m, layers, runtime=RuntimeConfig(provider="cpu", threads=2, micro_batch=micro or None))
after_session = rss()
x = np.load(data, mmap_mode="r")
t = time.perf_counter()
for i in range(0, samples, batch):
    step({"input": np.ascontiguousarray(x[i:i + batch])})
print(json.dumps({"mode": mode, "micro": micro, "after_session_mb": after_session, "pass_s": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-b16-eager")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--micro", default="0,8", help="comma list; 0 = whole batches")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    meta = RunMeta(threads=2, model=a.model)
    from bench.models import ensure_data, ensure_model, onnx_variant

    info = ensure_model(a.model)
    onnx_path = onnx_variant(info, "external")
    data, _ = ensure_data(a.model, a.samples)
    runs = []
    for mode in a.modes.split(","):
        for micro in [int(v) for v in a.micro.split(",")]:
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, "-c", CHILD, onnx_path, data, mode, str(micro), str(a.batch_size),
                                  str(a.samples)], capture_output=True, text=True, cwd=str(ROOT),
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
            rec = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"mode": mode, "micro": micro, "error": out.stderr.strip().splitlines()[-1:]}
            rec["load_before"] = load
            runs.append(rec)
            print(rec, file=sys.stderr, flush=True)
    name = a.name or f"{a.model}_b{a.batch_size}_n{a.samples}_arena-cpu"
    res = {"name": name, "command": "python -m bench.arena " + " ".join(argv if argv is not None else sys.argv[1:]),
           "created": datetime.datetime.now().isoformat(timespec="seconds"), "model": a.model, "runs": runs, "meta": meta.finish()}
    out_dir = HERE / "results"
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))
    label = {"on": "arena on (default, power-of-two extension)", "off": "arena off",
             "same": "env arena, kSameAsRequested"}
    lines = [f"# {name}", "", f"Command: `{res['command']}`  ", f"Date: {res['created']}", "",
             "| arena | micro-batch | peak RSS MB | RSS after session MB | pass s | load before |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {label[r['mode']]} | {r['micro'] or 'whole'} | failed | | | |")
            continue
        lines.append(f"| {label[r['mode']]} | {r['micro'] or 'whole batch'} | {r['peak_rss_mb']:.0f} | "
                     f"{r['after_session_mb']:.0f} | {r['pass_s']:.1f} | {r['load_before']:.1f} |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
