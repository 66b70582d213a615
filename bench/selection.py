"""Selection memory and speed, side by side: fps-graph against GPS-style selection and the alternatives.

    python -m bench.selection --quick                     # tiny sample + a small ViT-B/16 run (~3 min on 2 cores)
    python -m bench.selection --model vit-b16 --batch-size 32 --samples 256 # one configuration, 3 repetitions
    python -m bench.selection --model vit-b16 --batch-size 32 --samples 64,256,1024   # time vs data, memory flat
    python -m bench.selection --model resnet50 --batch-size 16,32,64 --samples 256
    python -m bench.selection ... --device cuda                             # CUDA provider against torch on CUDA

Every measurement is its own fresh process (bench/worker.py); repetitions are interleaved across methods and
configurations (the method order rotates each repetition), so that a slow spell on a shared machine does not land
on one method. Results go to bench/results/NAME.json, NAME.md and NAME.png (NAME from --name or the settings).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.meta import load_now, run_meta
from bench.models import ROOT, SPECS, ensure_data, ensure_model, onnx_variant

METHODS = ("ours", "ours-lean", "ours-whole", "host", "hooks", "gps", "plain")
RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) / 2 ** 20, 1)
                break
    except OSError:
        pass
    if device == "cuda":
        try:
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True,
                                         timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["gpu"] = "unknown"
    return info


def versions() -> dict:
    out = {}
    code = ("import json, importlib\n"
            "v = {}\n"
            "for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'numpy', 'fps_graph'):\n"
            "    try:\n"
            "        v[m] = importlib.import_module(m).__version__\n"
            "    except Exception as e:\n"
            "        v[m] = 'missing'\n"
            "print(json.dumps(v))")
    try:   # in a child: this process never imports torch
        out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        timeout=120).stdout.strip().splitlines()[-1])
    except Exception:
        pass
    try:
        out["git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "fps_graph", "cli"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            out["git"] += " (+ uncommitted changes in fps_graph/ or cli/)"
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def run_one(method: str, model: str, info: dict, onnx_path: str, data: tuple[str, str], batch: int, samples: int,
            args, workdir: Path, tag: str) -> dict:
    out = workdir / f"{tag}.json"
    masks = workdir / f"{tag}.safetensors"
    cmd = [sys.executable, "-m", "bench.worker", "--method", method, "--model", model, "--onnx", onnx_path,
           "--weights", info["weights"], "--data", data[0], "--labels", data[1], "--batch-size", str(batch),
           "--samples", str(samples), "--threads", str(args.threads), "--k", str(args.k), "--device", args.device,
           "--masks", str(masks), "--out", str(out)]
    if method == "ours-lean":
        cmd += ["--max-memory", str(args.max_memory)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))   # torch's OpenMP pool: the same count as ORT's
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    load_before = os.getloadavg()[0]
    load1 = load_now()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {args.timeout} s"
    wall = time.perf_counter() - t0
    rec: dict = {"method": method, "model": model, "batch_size": batch, "samples": samples, "rc": rc,
                 "process_wall_s": wall, "load_before": load_before, "load_after": os.getloadavg()[0],
                 "loads_before": load1, "loads_after": load_now()}
    if rc == 0 and out.is_file():
        rec.update(json.loads(out.read_text()))
        rec["masks_file"] = str(masks)
    else:
        rec["error"] = "\n".join(err.strip().splitlines()[-5:])
    return rec


def agreement(a: str, b: str) -> float | None:
    """Fraction of a's selected indices that b selects too, over the keys both have (None if no common key)."""
    from fps_graph.formats.masks import load_indices   # the selected indices only (not the per-entry scales)

    try:
        x, y = load_indices(a), load_indices(b)
    except Exception:
        return None
    common = sorted(set(x) & set(y))
    if not common:
        return None
    same = sum(np.intersect1d(x[k], y[k]).size for k in common)
    total = sum(x[k].size for k in common)
    return same / total if total else None


def stats(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)), "n": len(v)}


METRICS = ("total_s", "cpu_s", "pass_s", "samples_per_s", "peak_rss_mb", "peak_above_baseline_mb",
           "baseline_rss_mb", "session_rss_mb", "micro_batch", "cuda_max_allocated_mb", "smi_peak_mb")


def summarize(runs: list[dict], configs: list[tuple], methods: list[str]) -> tuple[list[dict], list[dict]]:
    summary, ratios = [], []
    for model, batch, samples in configs:
        per = {}
        for m in methods:
            rs = [r for r in runs if (r["model"], r["batch_size"], r["samples"], r["method"]) ==
                  (model, batch, samples, m) and r["rc"] == 0]
            failed = [r for r in runs if (r["model"], r["batch_size"], r["samples"], r["method"]) ==
                      (model, batch, samples, m) and r["rc"] != 0]
            row = {"model": model, "batch_size": batch, "samples": samples, "method": m, "ok": len(rs),
                   "failed": len(failed)}
            if failed:
                row["error"] = failed[0].get("error", "")
            for key in METRICS:
                if any(key in r for r in rs):
                    row[key] = stats([r.get(key) for r in rs])
            summary.append(row)
            per[m] = row

        def ratio(num: str, den: str, key: str) -> float | None:
            a, b = per.get(num, {}).get(key), per.get(den, {}).get(key)
            if not a or not b or not a["median"] or not b["median"]:
                return None
            return a["median"] / b["median"]

        rec = {"model": model, "batch_size": batch, "samples": samples}
        for name, (num, den) in {"gps/ours": ("gps", "ours"), "hooks/ours": ("hooks", "ours"),
                                 "host/ours": ("host", "ours"), "ours/plain": ("ours", "plain"),
                                 "ours-whole/plain": ("ours-whole", "plain"), "gps/ours-whole": ("gps", "ours-whole"),
                                 "gps/ours-lean": ("gps", "ours-lean"), "ours-lean/plain": ("ours-lean", "plain"),
                                 "plain/ours-lean": ("plain", "ours-lean")}.items():
            rec[name] = {k: ratio(num, den, k) for k in ("total_s", "cpu_s", "pass_s", "peak_rss_mb",
                                                          "peak_above_baseline_mb", "cuda_max_allocated_mb",
                                                          "smi_peak_mb")}
        lean, plain = per.get("ours-lean", {}), per.get("plain", {})
        if lean.get("peak_rss_mb") and plain.get("session_rss_mb"):
            rec["floor"] = lean["peak_rss_mb"]["median"] / plain["session_rss_mb"]["median"]
        ratios.append(rec)
    return summary, ratios


def targets(ratios: list[dict], device: str) -> list[dict]:
    """The issue's targets, read off the results (ViT-B/16, batch 32, CPU)."""
    out = []
    for r in ratios:
        if not r["model"].startswith("vit-b16") or r["batch_size"] != 32 or device != "cpu":
            continue
        g, p = r["gps/ours-lean"], r["ours-lean/plain"]
        who = "ours --max-memory auto"
        checks = [
            ("peak memory: ours (default) <= plain inference (peak RSS)", r["ours/plain"]["peak_rss_mb"], "<=", 1.0),
            ("peak memory GPS >= 9x ours (peak RSS)", g["peak_rss_mb"], ">=", 9.0),
            ("peak memory GPS >= 9x ours (peak RSS above the post-import baseline)", g["peak_above_baseline_mb"],
             ">=", 9.0),
            ("time GPS >= 2x ours (total)", g["total_s"], ">=", 2.0),
            ("time GPS >= 2x ours (pass over the data)", g["pass_s"], ">=", 2.0),
            ("time ours <= 1.2x plain inference (total)", p["total_s"], "<=", 1.2),
            ("time ours <= 1.2x plain inference (CPU seconds)", p.get("cpu_s"), "<=", 1.2),
            ("time ours <= 1.2x plain inference (pass over the data)", p["pass_s"], "<=", 1.2),
            ("time: ours (default) <= 1.2x plain inference (total)", r["ours/plain"]["total_s"], "<=", 1.2),
            ("peak memory ours <= 1.3x the floor (plain's RSS once its session is built)", r.get("floor"),
             "<=", 1.3),
        ]
        for what, value, op, bound in checks:
            if value is None:   # a method was not run
                continue
            met = None if value is None else (value >= bound if op == ">=" else value <= bound)
            out.append({"model": r["model"], "samples": r["samples"],
                        "target": what if "(default)" in what else what.replace("ours", who),
                        "value": value, "bound": f"{op} {bound}", "met": met})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="vit-b16", help=f"comma list of {', '.join(SPECS)}")
    p.add_argument("--batch-size", default="32", help="comma list (a grid with --samples)")
    p.add_argument("--samples", default="256", help="comma list")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-memory", default="auto", help="MB or auto, for method ours-lean (--max-memory)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads = torch threads (CPU)")
    p.add_argument("--k", type=int, default=1, help="top-K inputs per output neuron (all methods)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layout", default="external", choices=["external", "embedded"],
                   help="ONNX weights in a side file (default) or inside the .onnx (bench/README.md)")
    p.add_argument("--quick", action="store_true", help="tiny sample (b32, n256) + ViT-B/16 (b16, n16), 3 reps")
    p.add_argument("--name", default=None, help="results file stem (default from the settings)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--timeout", type=int, default=3600, help="per measurement, seconds")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}")
    if args.quick:
        configs = [("tiny", 32, 256), ("vit-b16", 16, 16)]
    else:
        models = [m.strip() for m in args.model.split(",")]
        for m in models:
            if m not in SPECS:
                p.error(f"unknown model {m!r} (use {', '.join(SPECS)})")
        configs = list(itertools.product(models, _ints(args.batch_size), _ints(args.samples)))
    if args.device == "cuda":
        check = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() "
                                "else 1)"], capture_output=True)
        if check.returncode != 0:
            print("error: --device cuda needs a CUDA GPU visible to torch (torch.cuda.is_available() is False)",
                  file=sys.stderr)
            return 2
    name = args.name or ("quick" if args.quick else "_".join([
        "-".join(sorted({c[0] for c in configs})),
        "b" + "-".join(map(str, sorted({c[1] for c in configs}))),
        "n" + "-".join(map(str, sorted({c[2] for c in configs})))])) + ("" if args.layout == "external"
                                                                        else "-embedded") + f"-{args.device}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model_info, onnx_paths, data = {}, {}, {}
    for model, batch, samples in configs:
        if model not in model_info:
            model_info[model] = ensure_model(model, log=log)
            onnx_paths[model] = onnx_variant(model_info[model], args.layout)
        data[(model, samples)] = ensure_data(model, samples)

    command = "python -m bench.selection " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                else sys.argv[1:]))
    result = {"name": name, "command": command, "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(args.device), "versions": versions(),
              "settings": {"threads": args.threads, "k": args.k, "device": args.device, "layout": args.layout,
                           "reps": args.reps, "methods": methods, "configs": configs,
                           "torch_threads": f"torch.set_num_threads({args.threads}), OMP_NUM_THREADS={args.threads}",
                           "ort_threads": f"intra_op_num_threads={args.threads}"},
              "models": {m: {**i, "onnx_used": onnx_paths[m], "description": SPECS[m].description}
                         for m, i in model_info.items()},
              "load_start": os.getloadavg(), "meta": run_meta(args.threads, command), "runs": []}
    total = len(configs) * len(methods) * args.reps
    done = 0
    keep = Path(tempfile.mkdtemp(prefix="fpsg-bench-"))
    t_start = time.perf_counter()
    for rep in range(args.reps):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]
        for model, batch, samples in configs:
            for method in order:
                done += 1
                tag = f"{model}-b{batch}-n{samples}-{method}-r{rep}"
                rec = run_one(method, model, model_info[model], onnx_paths[model], data[(model, samples)], batch,
                              samples, args, keep, tag)
                rec["rep"] = rep
                if rep > 0:
                    rec.pop("timeline", None)   # one memory timeline per method and configuration is enough
                result["runs"].append(rec)
                status = (f"{rec['total_s']:7.1f} s  peak {rec['peak_rss_mb']:7.0f} MB" if rec["rc"] == 0
                          else f"FAILED: {rec.get('error', '')}")
                log(f"[{done}/{total}] {tag:34s} {status}  (load {rec['load_before']:.1f})")
    result["load_end"] = os.getloadavg()
    result["bench_seconds"] = time.perf_counter() - t_start

    summary, ratios = summarize(result["runs"], configs, methods)
    agree = []
    for model, batch, samples in configs:
        files = {r["method"]: r.get("masks_file") for r in result["runs"]
                 if (r["model"], r["batch_size"], r["samples"], r.get("rep")) == (model, batch, samples, 0)}
        rec = {"model": model, "batch_size": batch, "samples": samples}
        for other in ("ours-lean", "ours-whole", "hooks", "host", "gps"):
            if files.get("ours") and files.get(other):
                rec[f"ours~{other}"] = agreement(files["ours"], files[other])
        agree.append(rec)
    for r in result["runs"]:
        r.pop("masks_file", None)
    result.update({"summary": summary, "ratios": ratios, "agreement": agree,
                   "targets": targets(ratios, args.device)})
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    from bench.report import render

    md, png = render(json_path, with_plot=not args.no_plot)
    log(f"wrote {json_path}, {md}" + (f", {png}" if png else ""))
    print(Path(md).read_text())
    return 0 if all(r["rc"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
