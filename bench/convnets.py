"""Real convolutional (and small) networks at batch 1: fps-graph select against plain ONNX Runtime inference.

    python -m bench.convnets                        # every model, 32 samples each, 3 interleaved repetitions
    python -m bench.convnets --models ppocr-rec --samples 8 --reps 1      # a quick check (~1 min)

The models are the real, pretrained ONNX files that ship inside pip wheels, fetched once with
``pip download --no-deps`` into /work/cache/convnets (or $FPS_CONVNETS_CACHE) and unpacked there:

* ``ppocr-rec``: PP-OCRv4 text recognizer (a CRNN: conv backbone + sequence head), rapidocr-onnxruntime 1.4.4,
  input 3x48x320;
* ``ppocr-det``: PP-OCRv4 text detector (DBNet), the same wheel, input 3x320x320;
* ``ppocr-cls``: PP-OCR mobile v2 text-direction classifier (a MobileNet), the same wheel, input 3x48x192;
* ``magika``: Google's file-type model (magika 1.0.3), int32 byte features [2048].

Data: seeded random inputs (.npy), the same for every method. Each method runs in its own process
(bench/worker.py: ``plain`` = an InferenceSession on the model file with fps-graph's session options, one sample
per run; ``plain-nchw`` = the same with ONNX Runtime's NCHWc transformer off, as select runs these graphs;
``ours`` = `fps-graph select MODEL DATA --batch-size 1`), repetitions interleaved with the order rotated.
Results: bench/results/convnets_b1-cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from bench.meta import load_now, run_meta

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("FPS_CONVNETS_CACHE", "/work/cache/convnets"))

# plain ORT inference; the same with ORT's NCHWc layout transformer off (as select runs these graphs: the reason part
# of select's extra time); fps-graph select
METHODS = ("plain", "plain-nchw", "ours")
# name -> (wheel requirement, member in the wheel, per-sample input shape, dtype, value range, description)
MODELS = {
    "ppocr-rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  (3, 48, 320), "float32", None, "PP-OCRv4 text recognizer (CRNN), 10.9 MB"),
    "ppocr-det": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  (3, 320, 320), "float32", None, "PP-OCRv4 text detector (DBNet), 4.7 MB"),
    "ppocr-cls": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  (3, 48, 192), "float32", None, "PP-OCR mobile v2 direction classifier (MobileNet), 0.6 MB"),
    "magika": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", (2048,), "int32", (0, 257),
               "magika standard_v3_3 file-type model, 3.2 MB"),
}


def ensure_model(name: str) -> Path:
    """The model file, unpacked from its wheel (downloaded once with pip download --no-deps)."""
    req, member, *_ = MODELS[name]
    dest = CACHE / "models" / name / Path(member).name
    if dest.is_file():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    pkg = req.split("==")[0].replace("-", "_")
    wheels = sorted(CACHE.glob(f"{pkg}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", req, "-d", str(CACHE)],
                       check=True)
        wheels = sorted(CACHE.glob(f"{pkg}-*.whl"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as z:
        dest.write_bytes(z.read(member))
    return dest


def ensure_data(name: str, samples: int) -> Path:
    _, _, shape, dtype, rng_range, _ = MODELS[name]
    path = CACHE / "data" / f"{name}-n{samples}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        x = rng.integers(*rng_range, size=(samples, *shape)).astype(dtype) if rng_range else \
            rng.standard_normal((samples, *shape)).astype(dtype)
        np.save(path, x)
    return path


def run_one(method: str, name: str, model: Path, data: Path, a, work: Path, tag: str) -> dict:
    out, masks = work / f"{tag}.json", work / f"{tag}.safetensors"
    cmd = [sys.executable, "-m", "bench.worker", "--method", method, "--model", name, "--onnx", str(model),
           "--weights", "-", "--data", str(data), "--labels", "-", "--batch-size", "1", "--samples",
           str(a.samples), "--threads", str(a.threads), "--masks", str(masks), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(ROOT))
    load = load_now()
    p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=a.timeout)
    rec = {"model": name, "method": method, "rc": p.returncode, "load_before": load, "load_after": load_now()}
    if p.returncode == 0:
        rec.update(json.loads(out.read_text()))
    else:
        rec["error"] = "\n".join(p.stderr.strip().splitlines()[-6:])
    return rec


def summarize(runs: list[dict], models: list[str]) -> dict:
    out: dict = {}
    for name in models:
        row: dict = {}
        for method in METHODS:
            ok = [r for r in runs if r["model"] == name and r["method"] == method and r["rc"] == 0]
            if not ok:
                continue
            keys = ("total_s", "pass_s", "cpu_s", "peak_rss_mb") + (("ort_s", "host_s") if method == "ours" else ())
            row[method] = {k: {"median": float(np.median([r[k] for r in ok])), "min": min(r[k] for r in ok),
                               "max": max(r[k] for r in ok)} for k in keys if all(k in r for r in ok)}
            row[method]["n"] = len(ok)
        out[name] = row
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# {res['name']}: real conv nets at batch 1, select vs plain inference", "",
             f"Command: `{m['command']}`  ", f"Date: {m['created']}; commit {m['git']['short']}"
             f"{' (uncommitted changes)' if m['git']['dirty'] else ''}; {m['machine'].get('cpu', '?')}, "
             f"{m['machine']['cores']} cores, {m['threads']} threads; load {m['load_start'][0]:.2f} at start, "
             f"{res['load_end'][0]:.2f} at end", "",
             f"{res['samples']} samples per model, batch 1, {res['reps']} repetitions (median, min-max), each method "
             "in its own process. *total*: after the imports to the masks written (plain: to the last output).", "",
             "*select pass* splits into the time inside ONNX Runtime's run on the observed graph (*in ORT*) and "
             "the time adding its outputs up on the host (*host sums*: each conv's per-tap window sums, "
             "runtime/windows.py); the rest is reading the data.", "",
             "*plain, NCHWc off*: plain inference with ONNX Runtime's NCHWc layout transformer disabled, as select runs "
             "a conv net whose inner conv inputs it observes (runtime/calibrate.py: with NCHWc the observed "
             "activations stay alive to the end of the pass); the difference to *plain pass* is what that layout "
             "is worth.", "",
             "| model | plain total s | select total s | select / plain | plain pass s | plain, NCHWc off, pass s | "
             "select pass s | pass ratio | select: in ORT s | select: host sums s | plain peak MB | select peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["summary"].items():
        if "plain" not in r or "ours" not in r:
            err = next((x.get("error", "") for x in res["runs"] if x["model"] == name and x["rc"] != 0), "")
            lines.append(f"| {name} | failed: {err[:100]} |||||||||||")
            continue
        p, o = r["plain"], r["ours"]
        cell = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"   # noqa: E731
        lines.append(f"| {name} | {cell(p['total_s'])} | {cell(o['total_s'])} | "
                     f"{o['total_s']['median'] / p['total_s']['median']:.2f}x | {p['pass_s']['median']:.2f} | "
                     f"{r['plain-nchw']['pass_s']['median'] if 'plain-nchw' in r else float('nan'):.2f} | "
                     f"{o['pass_s']['median']:.2f} | {o['pass_s']['median'] / p['pass_s']['median']:.2f}x | "
                     + " | ".join(f"{o[k]['median']:.2f}" if k in o else "-" for k in ("ort_s", "host_s"))
                     + f" | {p['peak_rss_mb']['median']:.0f} | {o['peak_rss_mb']['median']:.0f} |")
    lines += ["", "Models: " + "; ".join(f"`{k}`: {MODELS[k][5]}" for k in res["summary"])]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in res["summary"].items() if "plain" in r and "ours" in r]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [res["summary"][n]["plain"]["total_s"]["median"] for n in names], 0.4, label="plain ORT")
    ax.bar(x + 0.2, [res["summary"][n]["ours"]["total_s"]["median"] for n in names], 0.4, label="fps-graph select")
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel(f"seconds, {res['samples']} samples at batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--name", default="convnets_b1-cpu")
    ap.add_argument("--work", default="/tmp/fpsg-convnets")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown models {bad} (use {', '.join(MODELS)})")
    meta = run_meta(a.threads, "python -m bench.convnets " + " ".join(argv if argv is not None else sys.argv[1:]))
    paths = {m: (ensure_model(m), ensure_data(m, a.samples)) for m in models}
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"name": a.name, "meta": meta, "samples": a.samples, "reps": a.reps, "runs": []}
    t0 = time.time()
    methods = list(METHODS)
    for rep in range(a.reps):
        for name in models:
            for method in methods[rep % len(methods):] + methods[:rep % len(methods)]:
                rec = run_one(method, name, *paths[name], a, work, f"{name}-{method}-r{rep}")
                rec["rep"] = rep
                rec.pop("timeline", None)
                res["runs"].append(rec)
                print(f"[rep {rep}] {name:10s} {method:10s} " + (f"total {rec['total_s']:6.2f} s, pass "
                      f"{rec['pass_s']:6.2f} s, peak {rec['peak_rss_mb']:5.0f} MB" if rec["rc"] == 0
                      else "FAILED " + rec["error"]) + f" (load {rec['load_before'][0]:.1f})", file=sys.stderr,
                      flush=True)
    res["load_end"] = load_now()
    res["bench_seconds"] = time.time() - t0
    res["summary"] = summarize(res["runs"], models)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    (OUT / f"{a.name}.md").write_text(markdown(res))
    plot(res, OUT / f"{a.name}.png")
    print(markdown(res))
    return 0 if all(r["rc"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
