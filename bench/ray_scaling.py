"""Calibration on Ray: 1 and 2 workers against the single-process run, on this machine.

    flock /tmp/fps-bench.lock python -m bench.ray_scaling                       # ViT-B/16, 256 samples, 2 reps
    python -m bench.ray_scaling --model tiny --samples 256 --reps 1 --name ray_tiny-quick   # a quick check

Each run is `fps-graph select` (``run_select`` + ``write_result``) in a fresh process; the Ray runs start their own
local Ray inside it (as `select --ray` does), so their time includes Ray's start-up, which is also reported on its
own. Memory: the driver's peak RSS, each worker's peak RSS (from the workers), and the peak over the whole process
tree (driver, Ray's daemons and workers) of RSS and of PSS (shared pages, such as the model file mapped by two
workers, split between them). The masks of every run are compared byte for byte.
Results: bench/results/NAME.json, NAME.md, NAME.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.meta import RunMeta
from bench.models import ROOT, ensure_data, ensure_model, onnx_variant
from bench.selection import machine_info, versions

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"local": None, "ray-1": 1, "ray-2": 2}
LABELS = {"local": "single process (fps-graph select)", "ray-1": "select --ray --workers 1",
          "ray-2": "select --ray --workers 2"}


def child(spec: dict) -> dict:
    """One run in this (fresh) process: select, write the masks, report times and memory."""
    t0 = time.perf_counter()
    from fps_graph.runtime.shards import ClusterOptions
    from fps_graph.selection.pipeline import SelectOptions, run_select, write_result

    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = spec["workers"]
    opts = SelectOptions(k=1, batch_size=spec["batch_size"], shard_size=spec["shard_size"], provider="cpu",
                         threads=None, cluster=ClusterOptions(workers=workers) if workers else None)
    res = run_select(spec["onnx"], spec["data"], opts)
    write_result(res, spec["masks"], force=True)
    s = res.summary
    return {"wall_in_process_s": time.perf_counter() - t0, "calibration_s": s["calibration_seconds"],
            "samples": s["samples"], "samples_per_s": s["samples_per_s"], "driver_peak_rss_mb": s["peak_rss_mb"],
            "driver_rss_after_imports_mb": rss_after_imports, "provider": s["provider"], "cluster": s["cluster"]}


class TreeSampler(threading.Thread):
    """Peak RSS and PSS summed over a process and all its descendants (Ray's daemons and workers included)."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss = self.peak_pss = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            rss = pss = 0.0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    m = p.memory_full_info()
                    rss += m.rss
                    pss += getattr(m, "pss", m.rss)
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss / 2 ** 20)
            self.peak_pss = max(self.peak_pss, pss / 2 ** 20)
            self.stop.wait(self.every)


def run_config(name: str, spec: dict, tmp: Path, tag: str, timeout: int) -> dict:
    """Run one configuration in a child process and return its record."""
    out, masks = tmp / f"{tag}.json", tmp / f"{tag}.safetensors"
    spec = dict(spec, workers=CONFIGS[name], masks=str(masks))
    cmd = [sys.executable, "-m", "bench.ray_scaling", "--child", json.dumps(spec), "--child-out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err = f"timed out after {timeout} s\n{err}"
    sampler.stop.set()
    sampler.join()
    rec = {"config": name, "rc": proc.returncode, "process_wall_s": time.perf_counter() - t0,
           "load_before": load_before, "load_after": os.getloadavg()[0],
           "tree_peak_rss_mb": sampler.peak_rss, "tree_peak_pss_mb": sampler.peak_pss}
    if proc.returncode == 0 and out.is_file():
        rec.update(json.loads(out.read_text()))
        rec["masks_sha"] = __import__("hashlib").sha256(masks.read_bytes()).hexdigest()
    else:
        rec["error"] = "\n".join(err.strip().splitlines()[-5:])
    return rec


def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def summarize(runs: list[dict]) -> list[dict]:
    """Median per configuration of the numbers that matter, and ratios to the single-process run."""
    rows = []
    for name in CONFIGS:
        ok = [r for r in runs if r["config"] == name and r["rc"] == 0]
        if not ok:
            continue
        cl = [r["cluster"] for r in ok if r.get("cluster")]
        row = {"config": name, "label": LABELS[name], "runs": len(ok),
               "process_wall_s": _median([r["process_wall_s"] for r in ok]),
               "calibration_s": _median([r["calibration_s"] for r in ok]),
               "samples_per_s": _median([r["samples_per_s"] for r in ok]),
               "end_to_end_samples_per_s": _median([r["samples"] / r["process_wall_s"] for r in ok]),
               "driver_peak_rss_mb": _median([r["driver_peak_rss_mb"] for r in ok]),
               "worker_peak_rss_mb": _median([max(c["worker_peak_rss_mb"]) for c in cl]) if cl else None,
               "workers_total_rss_mb": _median([sum(c["worker_peak_rss_mb"]) for c in cl]) if cl else None,
               "tree_peak_rss_mb": _median([r.get("tree_peak_rss_mb") for r in ok]),
               "tree_peak_pss_mb": _median([r.get("tree_peak_pss_mb") for r in ok]),
               "ray_init_s": _median([c["ray_init_seconds"] for c in cl]) if cl else None,
               "startup_s": _median([c["startup_seconds"] for c in cl]) if cl else None,
               "range_samples_per_s": [min(r["samples_per_s"] for r in ok), max(r["samples_per_s"] for r in ok)]}
        rows.append(row)
    base = next((r for r in rows if r["config"] == "local"), None)
    for r in rows:
        if base:
            r["speed_vs_local"] = r["samples_per_s"] / base["samples_per_s"]
            r["end_to_end_vs_local"] = base["process_wall_s"] / r["process_wall_s"]
            if r["tree_peak_pss_mb"] and base["tree_peak_pss_mb"]:
                r["tree_pss_vs_local"] = r["tree_peak_pss_mb"] / base["tree_peak_pss_mb"]
    return rows


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(res: dict) -> str:
    """The results table and the settings, for NAME.md."""
    s = res["settings"]
    lines = [f"# Ray scaling: `{res['name']}`", "", f"![{res['name']}]({res['name']}.png)", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}; {res['minutes']:.1f} min in all", "",
             "| | |", "|---|---|",
             f"| machine | {res['machine'].get('cpu', '?')}, {res['machine']['cpu_count']} cores, "
             f"{res['machine'].get('ram_gb', '?')} GB RAM |",
             f"| versions | {', '.join(f'{k} {v}' for k, v in res['versions'].items())} |",
             f"| settings | model {s['model']} ({s['onnx_name']}"
             f"{', weights in a side file' if '-ext' in s['onnx_name'] else ''}), {s['samples']} samples of "
             f"seeded standard-normal images, batch {s['batch_size']}, shards of {s['shard_size']} samples "
             f"({s['samples'] // s['shard_size']} shards), top-K 1, CPU provider; ORT threads: 2 in the single "
             "process, the worker's CPU share under Ray (2 for 1 worker, 1 each for 2); "
             f"{s['reps']} repetitions, order rotated |",
             f"| load average | {res['load']} (**shared machine: other jobs ran on the 2 cores; timings are "
             "noisy**) |",
             f"| masks | {res['masks_identical']} |"] + ([f"| note | {res['note']} |"] if res.get("note") else []) + [
             "",
             "*calibration s* and *samples/s*: the pass over the data (for Ray: from the workers being ready to "
             "the last shard added); *process s*: the whole process, imports and Ray start-up included; *Ray "
             "init*: `ray.init` starting a local instance; *start-up*: from before `ray.init` to every worker "
             "holding its ONNX Runtime session. Memory: *driver* = the select process's peak RSS; *worker* = "
             "each worker's own peak RSS (max over workers; *sum* over workers); *tree* = the peak over the "
             "driver, Ray's daemons and the workers together (RSS counts the model file mapped by each worker "
             "again, PSS splits shared pages). Cells: medians.", "",
             "| run | calibration s | samples/s | x local | process s | x local (end to end) | Ray init s | "
             "start-up s | driver MB | worker MB (max / sum) | tree RSS MB | tree PSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["summary"]:
        lines.append(
            f"| {r['label']} | {_f(r['calibration_s'])} | {_f(r['samples_per_s'], '{:.2f}')} | "
            f"{_f(r.get('speed_vs_local'), '{:.2f}x')} | {_f(r['process_wall_s'])} | "
            f"{_f(r.get('end_to_end_vs_local'), '{:.2f}x')} | {_f(r['ray_init_s'])} | {_f(r['startup_s'])} | "
            f"{_f(r['driver_peak_rss_mb'], '{:.0f}')} | {_f(r['worker_peak_rss_mb'], '{:.0f}')} / "
            f"{_f(r['workers_total_rss_mb'], '{:.0f}')} | {_f(r['tree_peak_rss_mb'], '{:.0f}')} | "
            f"{_f(r['tree_peak_pss_mb'], '{:.0f}')} |")
    failed = [r for r in res["runs"] if r["rc"] != 0]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {r['config']}: {r.get('error', '')}" for r in failed]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> bool:
    """Samples/s, start-up and memory per configuration, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = res["summary"]
    names = [r["config"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].bar(names, [r["samples_per_s"] for r in rows], color="#4477aa")
    ax[0].set_title("calibration pass, samples/s")
    ax[1].bar(names, [r["process_wall_s"] for r in rows], color="#bbbbbb", label="whole process")
    ax[1].bar(names, [r["startup_s"] or 0 for r in rows], color="#ee6677", label="Ray start-up")
    ax[1].set_title("seconds")
    ax[1].legend(fontsize=8)
    x = np.arange(len(rows))
    if all(r["tree_peak_rss_mb"] for r in rows):
        ax[2].bar(x - 0.2, [r["tree_peak_rss_mb"] for r in rows], 0.4, label="tree RSS", color="#228833")
        ax[2].bar(x + 0.2, [r["tree_peak_pss_mb"] for r in rows], 0.4, label="tree PSS", color="#66ccee")
    else:   # runs collected with --from-runs: no process-tree sampling
        ax[2].bar(x - 0.2, [r["driver_peak_rss_mb"] for r in rows], 0.4, label="driver RSS", color="#228833")
        ax[2].bar(x + 0.2, [r["workers_total_rss_mb"] or 0 for r in rows], 0.4, label="workers RSS (sum)",
                  color="#66ccee")
    ax[2].plot(x, [r["driver_peak_rss_mb"] for r in rows], "k_", markersize=20, label="driver RSS")
    ax[2].set_xticks(x, names)
    ax[2].set_title("peak memory, MB")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"{res['name']}: {res['settings']['model']}, {res['settings']['samples']} samples, "
                 f"{res['machine']['cpu_count']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def from_runs(args: argparse.Namespace, argv: list[str] | None) -> int:
    meta = RunMeta(threads=2, model=args.model, note="summarized from an interrupted run's files")
    """Results from the per-run files of an interrupted run (no process-tree memory; process time from its log)."""
    import hashlib
    import re

    walls: dict[tuple[str, int], float] = {}
    if args.log:
        current = None
        for line in Path(args.log).read_text().splitlines():
            m = re.match(r"\[bench\] rep (\d+)/\d+ (\S+) \.\.\.", line)
            if m:
                current = (m.group(2), int(m.group(1)) - 1)
            m = re.match(r"\[bench\]\s+rc 0, .* ([0-9.]+) s$", line)
            if m and current:
                walls[current] = float(m.group(1))
    runs = []
    for path in sorted(Path(args.from_runs).glob("*-[0-9]*.json")):
        cfg, rep_ = path.stem.rsplit("-", 1)
        rec = json.loads(path.read_text())
        masks = path.with_suffix(".safetensors")
        runs.append(dict(rec, config=cfg, rep=int(rep_), rc=0,
                         process_wall_s=walls.get((cfg, int(rep_)), rec["wall_in_process_s"]),
                         masks_sha=hashlib.sha256(masks.read_bytes()).hexdigest()))
    info = ensure_model(args.model)
    onnx_path = onnx_variant(info, "external") if args.model != "tiny" else info["onnx"]
    name = args.name or f"ray_{args.model}_n{args.samples}-cpu"
    shas = {r["masks_sha"] for r in runs}
    res = {"name": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": "python -m bench.ray_scaling " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "minutes": sum(r["process_wall_s"] for r in runs) / 60, "machine": machine_info("cpu"),
           "versions": versions(),
           "settings": {"model": args.model, "onnx_name": Path(onnx_path).name, "samples": args.samples,
                        "batch_size": args.batch_size, "shard_size": args.shard_size,
                        "reps": len({r["rep"] for r in runs})},
           "load": f"{os.getloadavg()[0]:.2f} when summarized (the runs' own loads are in the log)",
           "masks_identical": ("byte-identical in every run" if len(shas) == 1 else f"{len(shas)} different files"),
           "note": "collected with --from-runs from an interrupted run: no process-tree memory sampling",
           "runs": runs}
    res["summary"] = summarize(runs)
    res["meta"] = meta.finish()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(res))
    plot(res, RESULTS / f"{name}.png")
    print(markdown(res))
    return 0 if len(shas) == 1 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--name", default=None)
    ap.add_argument("--from-runs", default=None, metavar="DIR",
                    help="Summarize the per-run files an interrupted run left in DIR (its temporary folder) instead "
                         "of measuring; --log FILE adds the process times from its stderr")
    ap.add_argument("--log", default=None, help="With --from-runs: the interrupted run's stderr.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(json.loads(args.child))))
        return 0
    if args.from_runs:
        return from_runs(args, argv)
    meta = RunMeta(threads=2, model=args.model)
    t0 = time.perf_counter()
    info = ensure_model(args.model)
    onnx_path = onnx_variant(info, "external") if args.model != "tiny" else info["onnx"]
    data, _ = ensure_data(args.model, args.samples)
    name = args.name or f"ray_{args.model}_n{args.samples}-cpu"
    spec = {"onnx": onnx_path, "data": data, "batch_size": args.batch_size, "shard_size": args.shard_size}
    configs = [c for c in args.configs.split(",") if c]
    runs, loads = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="fpsg-ray-bench-") as tmp:
        for rep in range(args.reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for cfg in order:
                print(f"[bench] rep {rep + 1}/{args.reps} {cfg} ...", file=sys.stderr, flush=True)
                rec = run_config(cfg, spec, Path(tmp), f"{cfg}-{rep}", args.timeout)
                rec["rep"] = rep
                runs.append(rec)
                loads.append(os.getloadavg()[0])
                print(f"[bench]   rc {rec['rc']}, {rec.get('samples_per_s', 0):.2f} samples/s, "
                      f"{rec['process_wall_s']:.1f} s", file=sys.stderr, flush=True)
    shas = {r["masks_sha"] for r in runs if r["rc"] == 0}
    res = {"name": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": "python -m bench.ray_scaling " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "minutes": (time.perf_counter() - t0) / 60, "machine": machine_info("cpu"), "versions": versions(),
           "settings": dict(spec, model=args.model, onnx_name=Path(onnx_path).name, samples=args.samples,
                            reps=args.reps),
           "load": f"{loads[0]:.2f} at start, {loads[-1]:.2f} at end, up to {max(loads):.2f} between runs",
           "masks_identical": ("byte-identical in every run" if len(shas) == 1 else f"{len(shas)} different files"),
           "runs": runs}
    res["summary"] = summarize(runs)
    res["meta"] = meta.finish()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(res))
    plot(res, RESULTS / f"{name}.png")
    print(markdown(res))
    return 0 if all(r["rc"] == 0 for r in runs) and len(shas) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
