"""Why does FPS pick differently from GPS? Diagnostics on the CREPE experiment's saved selections.

    python -m bench.quality.diagnose [--seeds N] [--no-swap] [--no-lr]
    python -m bench.quality.diagnose --experiment vision

Run after ``python -m bench.quality.crepe`` (it reads bench/.cache/quality/crepe/: the per-seed training splits,
statistics and masks). Writes bench/results/quality_crepe_diagnosis.{json,md}.

1. Statistic: per layer, the spread of FPS's activation statistic E|x_i| across a neuron's inputs (coefficient of
   variation) and within-row rank correlations (Spearman, mean over output neurons) between FPS, magnitude and
   GPS's |gradient| scores. Where E|x| is flat, FPS ranks like magnitude.
2. Which layers: at K=4, FPS's selection with one layer's entries replaced by GPS's (and GPS's with one layer
   replaced by FPS's), trained with the same recipe: how much of the FPS-GPS gap each layer carries.
3. Granularity: at the layer budgets every method gets the same count per tensor, but may spread it over few or
   many output neurons; the share of output neurons that receive at least one trainable entry, per layer.
4. Recipe: FPS and GPS at K=4 with the learning rate a factor 3 lower and higher.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality import crepe as C
from bench.quality.common import (CACHE, RESULTS, Point, Recipe, canonical_shape, gradient_scores, log,
                                  select_from_scores, train_run, write_json, write_masks_like)


def row_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Spearman rank correlation of two [rows, cols] score matrices (ties by position)."""
    ra = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=1, kind="stable"), axis=1).astype(np.float64)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    ok = den > 0
    return float(np.mean((ra * rb).sum(1)[ok] / den[ok])) if ok.any() else float("nan")


def onnx_scores(onnx_path: Path, stats_path: Path, score: str = "fps") -> dict[str, np.ndarray]:
    """fps-graph's own scores per PyTorch key, canonical [out, fan_in] (the product's score_weight)."""
    from fps_graph.selection.pipeline import make_plan
    from fps_graph.selection.scores import default_stat, score_weight
    from fps_graph.formats.stats import load_merged

    plan = make_plan(onnx_path)
    st = load_merged([str(stats_path)]) if default_stat(score) else None
    out = {}
    for g in plan.groups:
        key = plan.names[g.weight].key
        out[key] = score_weight(g, plan.model, score, st, default_stat(score))
    return out


def statistic_table(onnx_path: Path, stats_path: Path, grads: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    fps = onnx_scores(onnx_path, stats_path, "fps")
    mag = onnx_scores(onnx_path, stats_path, "magnitude")
    rows = []
    for key in sorted(fps):
        g = grads[key].reshape(canonical_shape(grads[key].shape))
        act = np.where(mag[key] > 0, fps[key] / np.where(mag[key] > 0, mag[key], 1), np.nan)
        a0 = act[np.argmax(np.isfinite(act).all(1))] if np.isfinite(act).all(1).any() else np.nanmean(act, 0)
        rows.append({"layer": key, "shape": list(fps[key].shape),
                     "act_cv": float(np.nanstd(a0) / np.nanmean(a0)),
                     "rho_fps_mag": row_spearman(fps[key], mag[key]),
                     "rho_fps_grad": row_spearman(fps[key], g),
                     "rho_mag_grad": row_spearman(mag[key], g)})
    return rows


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def channel_overlap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], shapes: dict[str, list[int]]
                    ) -> dict[str, dict[str, float]]:
    """Per layer: exact overlap of two selections, and the share of A's entries whose input channel (conv: the
    kernel's input channel; Linear: the input feature) is among the channels B chose in the same output row."""
    out = {}
    for key in a:
        rows, fan = canonical_shape(shapes[key])
        taps = int(np.prod(shapes[key][2:])) if len(shapes[key]) > 2 else 1
        ra, ca = a[key] // fan, (a[key] % fan) // taps
        rb, cb = b[key] // fan, (b[key] % fan) // taps
        chan_b = set(zip(rb.tolist(), cb.tolist()))
        same = np.mean([(r, c) in chan_b for r, c in zip(ra.tolist(), ca.tolist())]) if len(ra) else float("nan")
        out[key] = {"exact": float(len(np.intersect1d(a[key], b[key])) / max(len(a[key]), 1)),
                    "channel": float(same)}
    return out


def coverage(sdir: Path, seed: int, label: str) -> dict[str, dict[str, float]]:
    """Per method and layer: the share of output neurons with at least one selected entry at a point."""
    from fps_graph.formats.masks import load_indices, read_metadata

    out: dict[str, dict[str, float]] = {}
    for method in ("fps", "gd-fps", "wanda", "gps", "magnitude", "random"):
        names = [f"masks_gps_{_slug(label)}.safetensors", f"masks_gps_{_slug(label)}_.safetensors"] \
            if method == "gps" else [f"masks_{method}_{_slug(label)}_s{seed}.safetensors"]
        found = [sdir / "select" / n for n in names if (sdir / "select" / n).is_file()]
        if not found:
            continue
        path = found[0]
        tensors = read_metadata(path)["tensors"]
        row = {}
        for key, idx in load_indices(path).items():
            rows, fan = canonical_shape(tensors[key]["shape"])
            row[key] = float(np.unique(idx // fan).size / rows)
        out[method] = row
    return out


def vision_statistics(seeds: int, work: Path) -> None:
    """The statistic table (and neuron coverage at the layer budgets) for the vision models of the main run."""
    from fps_graph.formats.masks import load_indices

    from bench.quality import vision as V

    full = json.loads((RESULTS / "quality_vision.json").read_text())
    md = ["# Vision: why FPS and GPS differ (statistics of the main run's selections)", "",
          "CV: coefficient of variation of FPS's E|x_i| over a neuron's inputs. rho: within-row Spearman rank "
          "correlation of the scores (GPS: |gradient| of the supervised-contrastive loss), mean over output neurons "
          f"and seeds 0-{seeds - 1}. Coverage: share of output neurons with at least one trainable entry.", ""]
    doc: dict[str, Any] = {}
    for name in full["models"]:
        weights, _ = V.pretrained_weights(name)
        onnx_path = work / name / f"{name}.onnx"
        per_seed, cover = [], []
        for seed in range(seeds):
            sdir = work / name / f"seed{seed}"
            split = V.transfer_splits(full["shots_per_class"], seed)
            keys = sorted(load_indices(sorted((sdir / "select").glob("masks_magnitude_K_1_*.safetensors"))[0]))
            grads = V.supcon_gradient_scores(V.load_model(name, weights), split["x_train"], split["y_train"], keys,
                                             seed)
            per_seed.append(statistic_table(onnx_path, sdir / "select" / "stats.safetensors", grads))
            cover.append({p["label"]: coverage(sdir, seed, p["label"]) for p in full["points"] if p["k"] is None})
        layers = [r["layer"] for r in per_seed[0]]
        rows = []
        for i, layer in enumerate(layers):
            rs = [ps[i] for ps in per_seed]
            rows.append({"layer": layer, "shape": rs[0]["shape"],
                         **{k: float(np.mean([r[k] for r in rs])) for k in ("act_cv", "rho_fps_mag", "rho_fps_grad",
                                                                             "rho_mag_grad")}})
        doc[name] = {"statistic": rows, "coverage_per_seed": cover}
        label = next(iter(cover[0]), None)
        md += [f"## {name}", "", "| layer | shape | CV of E\\|x\\| | rho(FPS, mag) | rho(FPS, GPS) | rho(mag, GPS) | "
               + (f"coverage at {label}: FPS / GPS / random |" if label else ""),
               "| --- | --- | --- | --- | --- | --- |" + (" --- |" if label else "")]
        for r in rows:
            cov = ""
            if label:
                cv = [np.mean([c[label][m][r["layer"]] for c in cover]) for m in ("fps", "gps", "random")]
                cov = f" {cv[0]:.2f} / {cv[1]:.2f} / {cv[2]:.2f} |"
            md.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['act_cv']:.2f} | {r['rho_fps_mag']:.2f} |"
                      f" {r['rho_fps_grad']:.2f} | {r['rho_mag_grad']:.2f} |" + cov)
        md.append("")
    write_json(RESULTS / "quality_vision_diagnosis.json", doc)
    (RESULTS / "quality_vision_diagnosis.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", choices=("crepe", "vision"), default="crepe",
                    help="vision: only the statistics and coverage tables (no training)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the main run to diagnose (default 2)")
    ap.add_argument("--reverse", action="store_true", help="also GPS with one layer taken from FPS")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-swap", action="store_true")
    ap.add_argument("--no-lr", action="store_true")
    ap.add_argument("--work", default=str(CACHE / "crepe"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.experiment == "vision":
        vision_statistics(args.seeds, CACHE / "vision")
        return 0
    work = Path(args.work)
    full = json.loads((RESULTS / "quality_crepe.json").read_text())
    rec = full["recipe"]
    recipe = Recipe(epochs=rec["epochs"], lr=rec["lr"], batch_size=rec["batch_size"],
                    warmup_epochs=rec["warmup_epochs"])
    sizes = full["data"]["sizes"]
    tests = {name: C.make_split(sizes[name], *C.SPLITS[name]) for name in C.TESTS.values()}
    onnx_path = work / "crepe_tiny.onnx"
    point = Point(k=4)
    t_start = time.perf_counter()
    out: dict[str, Any] = {"point": point.label, "recipe": recipe.__dict__, "seeds": list(range(args.seeds))}

    stat_rows, runs, cover = [], [], []
    previous = RESULTS / "quality_crepe_diagnosis.json"
    if args.no_swap and args.no_lr and previous.is_file():
        runs = json.loads(previous.read_text()).get("runs", [])   # statistics only: keep the earlier training runs
    for seed in range(args.seeds):
        sdir = work / f"seed{seed}"
        tr = np.load(sdir / "train.npz")
        xb, yb = torch.from_numpy(tr["x"]), torch.from_numpy(tr["y"])
        batches = [(xb[i:i + recipe.batch_size], yb[i:i + recipe.batch_size])
                   for i in range(0, len(xb), recipe.batch_size)]
        template = sorted((sdir / "select").glob("masks_magnitude_K_1_*.safetensors"))[0]
        from fps_graph.formats.masks import load_indices

        keys = sorted(load_indices(template))
        grads = gradient_scores(C.load_pretrained(), batches, torch.nn.functional.cross_entropy, keys)
        stat_rows.append(statistic_table(onnx_path, sdir / "select" / "stats.safetensors", grads))
        from fps_graph.formats.masks import read_metadata

        shapes = {k: v["shape"] for k, v in read_metadata(template)["tensors"].items()}
        cover.append({p["label"]: coverage(sdir, seed, p["label"]) for p in full["points"] if p["k"] is None})
        fps = load_indices(sdir / "select" / f"masks_fps_K_4_s{seed}.safetensors")
        gps = select_from_scores(grads, point)
        chan = channel_overlap(fps, gps, shapes)
        for row in stat_rows[-1]:
            row["k4_exact_overlap"] = chan[row["layer"]]["exact"]
            row["k4_channel_overlap"] = chan[row["layer"]]["channel"]

        def train(label: str, idx: dict[str, np.ndarray], r: Recipe = recipe) -> None:
            mp = write_masks_like(template, idx, sdir / "select" / "diag_masks.safetensors", "diagnosis")
            t0 = time.perf_counter()
            model, tm = train_run(C.FACTORY, C.weights_file(), mp, sdir / "train.npz", r, seed, sdir / "run",
                                  train_head=False, threads=args.threads)
            m = C.evaluate(model, tests)
            runs.append({"run": label, "seed": seed, "metrics": m, "lr": r.lr})
            log(f"{label:28s} seed {seed}: rpa_noisy {m['rpa_noisy']:.3f}  {time.perf_counter() - t0:.0f}s")

        if not args.no_swap:
            for key in keys:
                train(f"fps + gps@{key}", {k: (gps[k] if k == key else fps[k]) for k in keys})
                if args.reverse:
                    train(f"gps + fps@{key}", {k: (fps[k] if k == key else gps[k]) for k in keys})
        if not args.no_lr:
            for f in (1 / 3, 3):
                r = replace(recipe, lr=recipe.lr * f)
                train(f"fps lr x{f:.2g}", fps, r)
                train(f"gps lr x{f:.2g}", gps, r)
        write(out, stat_rows, runs, cover, full, t_start)
    write(out, stat_rows, runs, cover, full, t_start, final=True)
    return 0


def write(out: dict[str, Any], stat_rows: list[list[dict[str, Any]]], runs: list[dict[str, Any]],
          cover: list[dict[str, Any]], full: dict[str, Any], t_start: float, final: bool = False) -> None:
    layers = [r["layer"] for r in stat_rows[0]]
    stat = []
    for i, layer in enumerate(layers):
        rs = [s[i] for s in stat_rows]
        stat.append({"layer": layer, "shape": rs[0]["shape"],
                     **{k: float(np.mean([r[k] for r in rs])) for k in ("act_cv", "rho_fps_mag", "rho_fps_grad",
                                                                         "rho_mag_grad", "k4_exact_overlap",
                                                                         "k4_channel_overlap")}})
    base = {}
    for r in full["runs"]:
        if r["point"] == out["point"] and r["method"] in ("fps", "gps") and r["seed"] in out["seeds"]:
            base[(r["method"], r["seed"])] = r["metrics"]["rpa_noisy"]
    agg: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r["run"] for r in runs):
        rs = [r for r in runs if r["run"] == label]
        v = np.array([r["metrics"]["rpa_noisy"] for r in rs])
        ref = "gps" if label.startswith("gps") else "fps"
        d = np.array([r["metrics"]["rpa_noisy"] - base.get((ref, r["seed"]), np.nan) for r in rs])
        agg[label] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "diff_vs_" + ref: float(np.nanmean(d)), "n": int(len(v))}
    doc = {**out, "final": final, "statistic": stat, "statistic_per_seed": stat_rows, "coverage_per_seed": cover,
           "runs": runs, "aggregate": agg,
           "baseline_k4": {f"{m}/{s}": v for (m, s), v in base.items()}, "seconds": round(time.perf_counter() - t_start)}
    write_json(RESULTS / "quality_crepe_diagnosis.json", doc)
    md = [f"# CREPE: why FPS and GPS differ ({'final' if final else 'partial'})", "",
          "## Statistic: spread of E|x| and within-row rank agreement (mean over seeds)", "",
          "rho: within-row Spearman rank correlation of two scores, mean over output neurons. Overlap at K=4: the "
          "share of FPS's entries that GPS also chose (exact), or whose input channel GPS also chose in that row "
          "(channel).", "",
          "| layer | shape [out, fan_in] | CV of E\\|x\\| over the fan-in | rho(FPS, magnitude) | rho(FPS, GPS) | "
          "rho(magnitude, GPS) | overlap K=4 exact / channel |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in stat:
        md.append(f"| {s['layer']} | {s['shape'][0]}x{s['shape'][1]} | {s['act_cv']:.2f} | {s['rho_fps_mag']:.2f} | "
                  f"{s['rho_fps_grad']:.2f} | {s['rho_mag_grad']:.2f} | {s['k4_exact_overlap']:.2f} / "
                  f"{s['k4_channel_overlap']:.2f} |")
    for label in (cover[0] if cover else {}):
        methods = list(cover[0][label])
        md += ["", f"## Granularity: share of output neurons with a trainable entry at {label} (mean over seeds)", "",
               "| layer | " + " | ".join(methods) + " |", "|" + " --- |" * (len(methods) + 1)]
        for s in stat:
            k = s["layer"]
            md.append(f"| {k} | " + " | ".join(f"{np.mean([c[label][m][k] for c in cover]):.2f}" for m in methods)
                      + " |")
    seeds_run = sorted({r["seed"] for r in runs})
    fk = {k: v for k, v in base.items() if k[1] in seeds_run}
    if fk:
        f = np.mean([v for (m, _), v in fk.items() if m == "fps"]) if any(m == "fps" for m, _ in fk) else float("nan")
        g = np.mean([v for (m, _), v in fk.items() if m == "gps"]) if any(m == "gps" for m, _ in fk) else float("nan")
        md += ["", f"## Swaps and learning rates at {out['point']} (noisy RPA %, mean ± std over seeds)", "",
               f"Main run at {out['point']}, seeds {seeds_run}: FPS {100 * f:.1f}, GPS {100 * g:.1f}. "
               "'vs. its base': paired difference to the main run's FPS (or GPS) at the same seed.", "",
               "| run | RPA | vs. its base (pp) | n |", "| --- | --- | --- | --- |"]
        for label, a in agg.items():
            d = a.get("diff_vs_fps", a.get("diff_vs_gps"))
            md.append(f"| {label} | {100 * a['mean']:.1f} ± {100 * a['std']:.1f} | {100 * d:+.1f} | {a['n']} |")
    (RESULTS / "quality_crepe_diagnosis.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
