"""Long documents: packed rows (`select --pack LENGTH`) against equal-length batches (exact per document).

    python -m bench.text_pack                          # 64 long documents, pack 512 and 2048, batch 8, 3 reps
    python -m bench.text_pack --docs 16 --reps 1       # a quick check of the script (~1 min)

Data: whole docstrings of Python standard-library modules and classes of 150 to 1,500 words (real English; every
document its own length: 200 to ~2,000 tokens), seeded order. Model: a Llama-architecture decoder (4 layers, hidden
384, GQA 6/2 heads, vocab 30522, 2048 positions; random perturbed weights; empty past_key_values inputs; MiniLM's
tokenizer, documents joined with its [SEP]). Methods, each in its own process (peak RSS is its own), interleaved,
the order rotated every repetition:

* ``bucketed``: `fps-graph select MODEL docs.txt --max-length 2048` (each document whole and exact; with every
  document its own length, every batch holds one sequence);
* ``pack-L``: `fps-graph select MODEL docs.txt --pack L` (rows of exactly L tokens, full batches; windows, not
  documents).

Reported: the pass over the data and the whole call (s), tokens per second of the pass, peak RSS, and how far the
packed statistics and top-1 picks are from the exact ones. Results: bench/results/text_pack-cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.meta import load_now, run_meta
from bench.text_padding import CACHE, STDLIB, export_llama

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
POSITIONS = 2048


def long_documents(n: int, seed: int = 0, low: int = 150, high: int = 1500) -> list[str]:
    """n whole docstrings of low..high words (standard library modules and their public objects), seeded order."""
    docs: set[str] = set()
    for name in STDLIB:
        mod = importlib.import_module(name)
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and low <= len(doc.split()) <= high:
                docs.add(" ".join(doc.split()))
    items = sorted(docs)
    rng = np.random.default_rng(seed)
    return [items[i] for i in rng.permutation(len(items))[:n]]


def model_folder() -> Path:
    folder = export_llama(CACHE / f"llama-4L-384-p{POSITIONS}", positions=POSITIONS)
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():   # MiniLM's tokenizer: documents end with its [SEP] (config.json's ids are Llama's)
        cfg.write_text(json.dumps({"eos_token": "[SEP]"}))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# one method in this process


def worker(a) -> dict:
    from bench.worker import Sampler, cpu_s, maxrss_mb, rss_mb
    from fps_graph.data.text import TextOptions
    from fps_graph.selection.pipeline import SelectOptions, run_select, write_result, write_stats

    baseline = rss_mb()
    c0 = cpu_s()
    t0 = time.perf_counter()
    sampler = Sampler(t0, interval=0.02)
    sampler.start()
    text = TextOptions(pack=a.pack) if a.pack else TextOptions(max_length=POSITIONS)
    res = run_select(a.model, a.data, SelectOptions(k=1, batch_size=a.batch_size, provider="cpu", threads=a.threads,
                                                    stat="mean-abs", text=text))
    write_result(res, a.masks, force=True)
    write_stats(res.stats, a.stats, force=True)
    total = time.perf_counter() - t0
    cpu = cpu_s() - c0
    sampler.stop()
    rec = res.metadata["data"]
    tokens = rec["tokens"]
    return {"total_s": total, "pass_s": res.summary["calibration_seconds"], "cpu_s": cpu,
            "peak_rss_mb": maxrss_mb(), "baseline_rss_mb": baseline, "samples": res.summary["samples"],
            "tokens": tokens, "tokens_per_s": tokens / res.summary["calibration_seconds"],
            "packing": rec.get("packing"), "truncated": rec.get("truncated"), "warnings": res.warnings,
            "timeline": sampler.timeline(200)}


# ---------------------------------------------------------------------------------------------------------------
# driver


def run_method(method: str, folder: Path, data: Path, a, work: Path, tag: str) -> dict:
    out, masks, stats = work / f"{tag}.json", work / f"{tag}.safetensors", work / f"{tag}.stats.safetensors"
    cmd = [sys.executable, "-m", "bench.text_pack", "--worker", "--model", str(folder / "model.onnx"),
           "--data", str(data), "--batch-size", str(a.batch_size), "--threads", str(a.threads),
           "--masks", str(masks), "--stats", str(stats), "--out", str(out)]
    if method.startswith("pack-"):
        cmd += ["--pack", method.split("-", 1)[1]]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(ROOT))
    load = load_now()
    p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=a.timeout)
    rec = {"method": method, "rc": p.returncode, "load_before": load, "load_after": load_now()}
    if p.returncode == 0:
        rec.update(json.loads(out.read_text()))
        rec["masks_file"], rec["stats_file"] = str(masks), str(stats)
    else:
        rec["error"] = "\n".join(p.stderr.strip().splitlines()[-6:])
    return rec


def compare(exact_stats: str, exact_masks: str, stats: str, masks: str) -> dict:
    """How far one run's mean |x| and top-1 picks are from the exact (bucketed) run."""
    from safetensors.numpy import load_file

    from fps_graph.selection.stats import Stats

    a, b = Stats.load(exact_stats), Stats.load(stats)
    rel = []
    for node, sums in a.sums.items():
        x = sums["abs"] / a.counts[node]
        y = b.sums[node]["abs"] / b.counts[node]
        rel.append(np.abs(y - x) / np.maximum(np.abs(x), 1e-12))
    r = np.concatenate(rel)
    ma, mb = load_file(exact_masks), load_file(masks)
    differ = sum(int(np.setxor1d(ma[k], mb[k]).size) // 2 for k in ma)
    total = sum(int(v.size) for v in ma.values())
    return {"median_rel_err": float(np.median(r)), "max_rel_err": float(r.max()), "picks_differ": differ,
            "picks": total}


def summarize(runs: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        ok = [r for r in runs if r["method"] == m and r["rc"] == 0]
        if not ok:
            out[m] = {"ok": 0, "error": next((r.get("error") for r in runs if r["method"] == m), "")}
            continue
        row = {"ok": len(ok)}
        for key in ("total_s", "pass_s", "cpu_s", "tokens_per_s", "peak_rss_mb"):
            v = sorted(r[key] for r in ok)
            row[key] = {"median": v[len(v) // 2], "min": v[0], "max": v[-1]}
        row.update({k: ok[0][k] for k in ("samples", "tokens", "packing", "truncated")})
        out[m] = row
    return out


def markdown(res: dict) -> str:
    s, b = res["summary"], res["summary"].get("bucketed", {})
    m = res["meta"]
    lines = [f"# {res['name']}: long documents, packed rows vs equal-length batches", "",
             f"Command: `{m['command']}`  ", f"Date: {m['created']}; commit {m['git']['short']}"
             f"{' (uncommitted changes)' if m['git']['dirty'] else ''}; {m['machine'].get('cpu', '?')}, "
             f"{m['machine']['cores']} cores, {m['threads']} threads; load average {m['load_start'][0]:.2f} at "
             f"start, {res['load_end'][0]:.2f} at end" + (" (a loaded machine: wall times are noisy)"
                                                            if max(m['load_start'][0], res['load_end'][0]) > 1.5
                                                            else ""), "",
             f"{res['docs']} documents, {res['doc_tokens']['total']:,} tokens (each document {res['doc_tokens']['min']}"
             f"-{res['doc_tokens']['max']} tokens, median {res['doc_tokens']['median']:.0f}, "
             f"{res['doc_tokens']['distinct']} distinct lengths); batch size {res['batch_size']}; "
             f"{res['reps']} repetitions, median (min-max); each method its own process.", "",
             "| method | exact | rows | tokens used | pass s | tokens/s | whole call s | peak RSS MB | "
             "time / bucketed | mean abs x: median (max) rel. diff | top-1 picks differ |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in s.items():
        if not r.get("ok"):
            lines.append(f"| {name} | failed: {str(r.get('error'))[:80]} |||||||||")
            continue
        c = res["vs_exact"].get(name)
        ratio = r["total_s"]["median"] / b["total_s"]["median"] if b.get("ok") else float("nan")
        diff = "-" if c is None else f"{c['median_rel_err']:.1e} ({c['max_rel_err']:.1e})"
        picks = "-" if c is None else f"{c['picks_differ']} of {c['picks']} ({100 * c['picks_differ'] / c['picks']:.0f}%)"
        lines.append(f"| {name} | {'yes' if name == 'bucketed' else 'no (windows)'} | {r['samples']} | "
                     f"{r['tokens']:,} | {r['pass_s']['median']:.1f} ({r['pass_s']['min']:.1f}-{r['pass_s']['max']:.1f})"
                     f" | {r['tokens_per_s']['median']:.0f} | {r['total_s']['median']:.1f} | "
                     f"{r['peak_rss_mb']['median']:.0f} | {ratio:.2f}x | {diff} | {picks} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = {k: v for k, v in res["summary"].items() if v.get("ok")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    names = list(s)
    colors = ["#1f77b4" if n == "bucketed" else "#ff7f0e" for n in names]
    axes[0].bar(names, [s[n]["tokens_per_s"]["median"] for n in names], color=colors)
    axes[0].set_ylabel("tokens / s (pass)")
    axes[1].bar(names, [s[n]["peak_rss_mb"]["median"] for n in names], color=colors)
    axes[1].set_ylabel("peak RSS MB")
    for r in res["runs"]:
        if r["rc"] == 0 and r.get("timeline") and r.get("rep") == 0:
            axes[2].plot([p[0] for p in r["timeline"]], [p[1] for p in r["timeline"]], label=r["method"])
    axes[2].set_xlabel("s")
    axes[2].set_ylabel("RSS MB")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{res['name']}: packed rows (orange) vs equal-length batches (blue, exact)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--masks")
    ap.add_argument("--stats")
    ap.add_argument("--out")
    ap.add_argument("--pack", default=None, help="row lengths to compare (comma list; default 512,2048)")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--name", default="text_pack-cpu")
    ap.add_argument("--work", default="/tmp/fpsg-text-pack")
    a = ap.parse_args(argv)
    if a.worker:
        a.pack = int(a.pack) if a.pack else None
        Path(a.out).write_text(json.dumps(worker(a)))
        return 0
    argv_list = argv if argv is not None else sys.argv[1:]
    meta = run_meta(a.threads, "python -m bench.text_pack " + " ".join(argv_list))
    folder = model_folder()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    docs = long_documents(a.docs)
    data = work / "docs.txt"
    data.write_text("\n".join(docs) + "\n")
    from fps_graph.data.text import load_tokenizer, tokenize

    lengths = tokenize(load_tokenizer(folder / "tokenizer.json"), docs, None).lengths
    methods = ["bucketed"] + [f"pack-{int(v)}" for v in (a.pack or "512,2048").split(",") if v.strip()]
    res = {"name": a.name, "meta": meta, "docs": len(docs), "batch_size": a.batch_size, "reps": a.reps,
           "doc_tokens": {"total": int(lengths.sum()), "min": int(lengths.min()), "max": int(lengths.max()),
                          "median": float(np.median(lengths)), "distinct": int(np.unique(lengths).size)},
           "methods": methods, "runs": []}
    t0 = time.time()
    for rep in range(a.reps):
        for m in methods[rep % len(methods):] + methods[:rep % len(methods)]:
            rec = run_method(m, folder, data, a, work, f"{m}-r{rep}")
            rec["rep"] = rep
            if rep:
                rec.pop("timeline", None)
            res["runs"].append(rec)
            print(f"[rep {rep}] {m:10s} " + (f"pass {rec['pass_s']:6.1f} s, total {rec['total_s']:6.1f} s, "
                                             f"{rec['tokens_per_s']:6.0f} tok/s, peak {rec['peak_rss_mb']:5.0f} MB"
                                             if rec["rc"] == 0 else "FAILED " + rec["error"])
                  + f" (load {rec['load_before'][0]:.1f})", file=sys.stderr, flush=True)
    res["load_end"] = load_now()
    res["bench_seconds"] = time.time() - t0
    res["summary"] = summarize(res["runs"], methods)
    first = {r["method"]: r for r in res["runs"] if r["rep"] == 0 and r["rc"] == 0}
    res["vs_exact"] = {}
    if "bucketed" in first:
        for m in methods[1:]:
            if m in first:
                res["vs_exact"][m] = compare(first["bucketed"]["stats_file"], first["bucketed"]["masks_file"],
                                             first[m]["stats_file"], first[m]["masks_file"])
    for r in res["runs"]:
        r.pop("masks_file", None)
        r.pop("stats_file", None)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    (OUT / f"{a.name}.md").write_text(markdown(res))
    plot(res, OUT / f"{a.name}.png")
    print(markdown(res))
    return 0 if all(r["rc"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
