"""The variant study (issue 13): every selection rule on every experiment, paired, plus the diagnosis behind it.

    python -m bench.quality [--quick] [--experiments crepe-noise,crepe-phone,vit,cnn] [--seeds N] [--jobs 2]
    python -m bench.quality --experiments cnn --first-seed 4 --seeds 2     # more seeds, merged into the results

Rules: the paper's ``fps``, ``random`` (``magnitude`` with --methods), GPS-style gradients (``gps``, the reference that sees the
task loss) and the variants of fps_graph/selection/variants.py (``fps-cover``, ``fps-sample``, ``act-sample``,
``gd-diff``), all through ``fps-graph select`` except ``gps``. Paired design: per experiment and seed, every rule
gets the same training split, calibration data, trainer (``fps-graph train``), recipe, order and number of
trainable entries per tensor; the report gives paired differences over (point, seed) with standard errors.

Experiments (each a few minutes per seed on one core):
* ``crepe-noise``: pretrained CREPE tiny adapting to white/pink noise at -15..-5 dB (bench/quality/crepe.py).
* ``crepe-phone``: the same model adapting to a new shift, telephone band 300-3400 Hz + noise + soft clipping,
  where low voices lose their fundamental (pretrained RPA ~70%).
* ``vit``, ``cnn``: few-shot transfer MNIST 0-5 -> scikit-learn digits 6-9 (bench/quality/vision.py).

Diagnosis logged per seed, without training: per layer, the spread of the statistic over the fan-in, the
within-row rank agreement of each score with the gradient, the share of the gradient mass each selection holds
(relative to GPS's own, which holds the most possible at the same per-neuron counts), and how many distinct input
features the selection touches (input-feature coverage).

Writes bench/results/quality_variants[_quick].{json,md,png} after every training run; seeds already in the file
are kept (a rerun seed replaces its own), so long studies can be split over invocations or processes (--merge).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fps_graph.compare.stats import format_paired, paired, paired_seeds
from bench.quality.common import (CACHE, LABELS, RESULTS, Point, Recipe, Selector, canonical_shape, check_geometry,
                                  clean_dir, env_info, gradient_scores, log, select_from_scores, train_run,
                                  write_json, write_masks_like, VARIANT_METHODS)

EXPERIMENTS = ("crepe-noise", "crepe-phone", "vit", "cnn")
METHODS = ("fps", "random", "gps", "fps-cover", "fps-sample", "act-sample", "gd-diff")   # + magnitude: --methods
BASELINES = ("fps", "random")
VISION_LR = {"vit": 1e-2, "cnn": 3e-2}
CREPE_TRAIN, CREPE_EPOCHS = 192, 4       # CREPE runs cost ~5x a vision run: kept small (2 shared cores)   # tuned on validation images in the main vision run (quality_vision.json)


def points(quick: bool) -> list[Point]:
    """K=4 per neuron and a 4% per-layer budget: the sizes where the earlier runs (issue 5) saw the methods differ
    at all (at K=1 every rule is within 0.5 pp of biases-only training)."""
    return [Point(k=4), Point(budget=0.04, granularity="layer")]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


# ---------------------------------------------------------------------------------------------- experiments


class CrepeSetup:
    """One CREPE shift and seed: training split on disk, selector (statistics of it and of clean anchor tones),
    cross-entropy gradients for GPS."""

    def __init__(self, shift: str, seed: int, quick: bool, work: Path, threads: int):
        import torch

        from bench.quality import crepe as C

        self.C, self.seed, self.threads = C, seed, threads
        n_train = CREPE_TRAIN   # per seed; lr chosen for the noise shift on its validation split (crepe.py)
        self.recipe = Recipe(epochs=CREPE_EPOCHS, lr=C.RECIPE_LR, batch_size=32, warmup_epochs=1.0)
        n_test = 300
        if shift == "noise":
            train = C.make_split(n_train, C.SPLITS["train"][0] + 1000 * seed, C.SPLITS["train"][1])
            self.tests = {"rpa": C.make_split(n_test, *C.SPLITS["test_noisy"]),
                          "rpa_brown": C.make_split(n_test // 2, *C.SPLITS["test_brown"])}
        else:
            train = C.make_phone_split(n_train, 111 + 1000 * seed)
            self.tests = {"rpa": C.make_phone_split(n_test, 414)}
        work.mkdir(parents=True, exist_ok=True)
        anchor = work / "anchor.npy"
        if not anchor.is_file():
            np.save(anchor, C.make_split(256, C.SPLITS["anchor"][0], None)["x"])
        self.onnx = work / "crepe_tiny.onnx"
        if not self.onnx.is_file():
            C.export_onnx(work)
        self.dir = work / f"seed{seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.dir / "train.npz", x=train["x"], y=train["y"])
        np.save(self.dir / "calib.npy", train["x"])
        self.sel = Selector(self.onnx, self.dir / "calib.npy", anchor, self.dir / "select", threads=threads)
        self.template = self.sel.template_masks()
        base = C.load_pretrained()
        geometry = check_geometry(self.onnx, self.template, base)
        if geometry["problems"]:
            raise SystemExit("masks do not map onto the PyTorch weights: " + "; ".join(geometry["problems"]))
        self.keys = geometry["keys"]
        xb, yb = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
        batches = [(xb[i:i + 32], yb[i:i + 32]) for i in range(0, len(xb), 32)]
        self.grads = gradient_scores(base, batches, torch.nn.functional.cross_entropy, self.keys)
        self.base_metrics = self.evaluate(base)
        self.masks: dict[tuple[str, str], Path] = {}

    def evaluate(self, model: Any) -> dict[str, float]:
        C = self.C
        return {m: C.raw_pitch_accuracy(C.predict_bins(model, t["x"]), t["f0"]) for m, t in self.tests.items()}

    def masks_for(self, method: str, point: Point) -> Path:
        key = (method, point.label)
        if key not in self.masks:
            if method == "gps":
                self.masks[key] = write_masks_like(self.template, select_from_scores(self.grads, point),
                                                   self.sel.workdir / f"masks_gps_{_slug(point.label)}.safetensors",
                                                   "gps")
            elif method == "empty":
                self.masks[key] = write_masks_like(self.template, {k: np.zeros(0, np.int64) for k in self.keys},
                                                   self.sel.workdir / "masks_empty.safetensors", "none")
            else:
                self.masks[key] = self.sel.onnx_masks(method, point, seed=self.seed)
        return self.masks[key]

    def run(self, method: str, point: Point | None) -> tuple[dict[str, float], int]:
        """Fine-tune (selected entries + the scored layers' biases; 'bias': biases only) and evaluate."""
        C = self.C
        masks = self.masks_for("empty" if point is None else method, point or Point(k=1))
        model, tm = train_run(C.FACTORY, C.weights_file(), masks, self.dir / "train.npz", self.recipe, self.seed,
                              self.dir / "run", train_head=False, threads=self.threads)
        return self.evaluate(model), int(tm.get("trainable", {}).get("trainable", 0))


class VisionSetup:
    """One vision model and seed (bench/quality/vision.py's SeedSetup with the main run's tuned learning rate)."""

    def __init__(self, name: str, seed: int, quick: bool, work: Path, threads: int):
        from dataclasses import replace

        import torch

        from bench.quality import vision as V

        weights, _ = V.pretrained_weights(name, threads=threads)
        base = V.load_model(name, weights)
        work.mkdir(parents=True, exist_ok=True)
        xm, ym = V.mnist()
        anchor = work / "anchor.npy"
        if not anchor.is_file():
            idx = np.random.default_rng(7).choice(np.flatnonzero(np.isin(ym, V.PRETRAIN_CLASSES)), 256, replace=False)
            np.save(anchor, xm[idx])
        onnx_path = work / f"{name}.onnx"
        if not onnx_path.is_file():
            from bench.quality.common import export_unfolded

            export_unfolded(base, torch.from_numpy(xm[:2]), onnx_path)
        self.inner = V.SeedSetup(name, weights, onnx_path, base, 10, seed, work, anchor, threads)
        self.recipe = replace(Recipe(**V.RECIPE), lr=VISION_LR[name])
        self.sel, self.template, self.keys, self.grads = (self.inner.sel, self.inner.template, self.inner.keys,
                                                          self.inner.grads)
        self.base_metrics = {}

    def masks_for(self, method: str, point: Point) -> Path:
        return self.inner.masks_for(method, point)

    def run(self, method: str, point: Point | None) -> tuple[dict[str, float], int]:
        """Fine-tune (selected entries + biases + the new head; 'bias': biases + head) and evaluate."""
        model, tm = self.inner.train("bias+head" if point is None else method, point, self.recipe)
        return {"acc": self.inner.accuracy(model, "test")}, int(tm.get("trainable", {}).get("trainable", 0))


def make_setup(exp: str, seed: int, quick: bool, threads: int) -> Any:
    work = CACHE / ("study_quick" if quick else "study") / exp
    if exp.startswith("crepe-"):
        return CrepeSetup(exp.split("-", 1)[1], seed, quick, work, threads)
    return VisionSetup(exp, seed, quick, work, threads)


# ------------------------------------------------------------------------------------------------ diagnosis


def row_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Spearman rank correlation of two [rows, cols] score matrices (rows where either is
    constant are left out)."""
    a = np.broadcast_to(a, b.shape)
    ra = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=1, kind="stable"), axis=1).astype(np.float64)
    ok = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    ok &= den > 0
    return float(np.mean((ra * rb).sum(1)[ok] / den[ok])) if ok.any() else float("nan")


def diagnose_seed(setup: Any, pts: list[Point], methods: list[str]) -> dict[str, Any]:
    """Per layer: statistic spread, rank agreement with the gradient; per method and point: gradient mass held
    (relative to GPS), input-feature coverage and neuron coverage."""
    from fps_graph.formats.masks import load_indices
    from fps_graph.selection.pipeline import make_plan
    from fps_graph.formats.stats import load_merged

    plan = make_plan(setup.sel.onnx)
    stats = load_merged([str(setup.sel.stats)])
    layers = {}
    for g in plan.groups:
        key = plan.names[g.weight].key
        if key not in setup.grads:
            continue
        grad = setup.grads[key].reshape(canonical_shape(setup.grads[key].shape))
        if not grad.any():
            continue   # a replaced head: no gradient from a feature loss
        w = np.abs(np.asarray(g.primary.canonical_weight(plan.model), dtype=np.float64))
        act = g.primary.stat_to_canonical(stats.mean(g.primary.node, "mean-abs"))
        rms = g.primary.stat_to_canonical(stats.mean(g.primary.node, "l2"))
        a0 = np.asarray(act, dtype=np.float64)[0]
        layers[key] = {"shape": list(grad.shape), "stat_cv": float(a0.std() / max(a0.mean(), 1e-30)),
                       "rho_fps_grad": row_spearman(w * act, grad), "rho_act_grad": row_spearman(rms, grad),
                       "rho_mag_grad": row_spearman(w, grad), "rho_fps_mag": row_spearman(w * act, w)}
    sel: dict[str, dict[str, Any]] = {}
    for p in pts:
        gps = load_indices(setup.masks_for("gps", p))
        for m in methods:
            idx = load_indices(setup.masks_for(m, p))
            rec: dict[str, Any] = {}
            for key, lay in layers.items():
                rows, cols = lay["shape"]
                g = np.abs(setup.grads[key]).reshape(-1)
                best = g[gps[key]].sum()
                i = idx[key]
                used = np.unique(i % cols).size
                rec[key] = {"grad_share": float(g[i].sum() / best) if best > 0 else float("nan"),
                            "input_coverage": used / max(1, min(cols, i.size)),
                            "max_column_load": int(np.bincount(i % cols).max()) if i.size else 0,
                            "neuron_coverage": float(np.unique(i // cols).size / rows)}
            sel.setdefault(m, {})[p.label] = rec
    return {"layers": layers, "selections": sel}


# ------------------------------------------------------------------------------------------------- running


def run_experiment(exp: str, quick: bool, seeds: list[int], methods: list[str], threads: int,
                   progress: Any = None) -> dict[str, Any]:
    """Every method at every point for every seed of one experiment; returns its section of the results
    (progress(section so far) after every run: completed (point, seed) pairs of all methods are usable)."""
    import torch

    torch.set_num_threads(threads)
    pts = points(quick)
    runs: list[dict[str, Any]] = []
    diag: dict[int, Any] = {}
    base: dict[str, float] = {}
    t0 = time.perf_counter()
    for seed in seeds:
        setup = make_setup(exp, seed, quick, threads)
        base = setup.base_metrics
        diag[seed] = diagnose_seed(setup, pts, methods)
        todo = [(m, p) for p in pts for m in methods] + [("bias", None)]
        for method, point in todo:
            t1 = time.perf_counter()
            metrics, trainable = setup.run(method, point)
            runs.append({"experiment": exp, "method": method, "point": point.label if point else "-", "seed": seed,
                         "metrics": metrics, "trainable": trainable, "seconds": round(time.perf_counter() - t1, 2)})
            log(f"{exp} {method:10s} {runs[-1]['point']:12s} seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f"  ({runs[-1]['seconds']:.1f}s)")
            if progress is not None:
                progress(section(runs, diag, base, pts, sorted({r["seed"] for r in runs}), methods, t0, setup))
    return section(runs, diag, base, pts, seeds, methods, t0, setup)


def section(runs: list, diag: dict, base: dict, pts: list[Point], seeds: list[int], methods: list[str], t0: float,
            setup: Any) -> dict[str, Any]:
    """One experiment's part of the results file."""
    return {"runs": list(runs), "diagnosis": dict(diag), "pretrained": base, "points": [p.label for p in pts],
            "seeds": seeds, "methods": methods, "seconds": round(time.perf_counter() - t0, 1),
            "recipe": setup.recipe.__dict__}


def _worker(args: tuple) -> tuple[str, dict[str, Any]]:
    exp = args[0]
    return exp, run_experiment(*args)


# ------------------------------------------------------------------------------------------------ report


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """Paired differences of every method against fps and random, per experiment and granularity, and pooled."""
    out: dict[str, Any] = {}
    for exp, sec in doc["experiments"].items():
        metric = "acc" if "acc" in sec["runs"][0]["metrics"] else "rpa"
        groups = {"all": sec["points"], "K": [p for p in sec["points"] if p.startswith("K=")],
                  "layer": [p for p in sec["points"] if not p.startswith("K=")]}
        out[exp] = {b: {m: {**{g: paired(sec["runs"], m, b, metric, pts) for g, pts in groups.items() if pts},
                             "seeds": paired_seeds(sec["runs"], m, b, metric, sec["points"])}
                         for m in sec["methods"] if m != b} for b in BASELINES}
    return out


def write_report(stem: Path, doc: dict[str, Any]) -> None:
    doc["paired"] = summarise(doc)
    write_json(stem.with_suffix(".json"), doc)
    exps = [e for e in EXPERIMENTS if e in doc["experiments"]]
    quick = doc["quick"]
    md = [f"# Selection variants against FPS and random ({'quick' if quick else 'full'} run)", "",
          "Every rule gets, per experiment and seed, the same training split, calibration data, trainer, recipe and "
          "trainable count per tensor. Paired difference: mean over (point, seed) of (method - baseline) in "
          "percentage points ± standard error; **bold**: at least 2 standard errors from 0. Metric: held-out raw "
          "pitch accuracy (CREPE) or test accuracy (vision).", ""]
    methods = doc["experiments"][exps[0]]["methods"]
    for base in BASELINES:
        md += [f"## Paired difference to {LABELS.get(base, base)}, all points", "",
               "| method | " + " | ".join(exps) + " | experiments ahead by 2 se |",
               "|" + " --- |" * (len(exps) + 2)]
        for m in methods:
            if m == base:
                continue
            cells = [doc["paired"][e][base].get(m, {}).get("all", {}) for e in exps]
            ahead = sum(1 for c in cells if c.get("n") and c["mean_pp"] >= 2 * c["sem_pp"])
            behind = sum(1 for c in cells if c.get("n") and -c["mean_pp"] >= 2 * c["sem_pp"])
            md.append(f"| {LABELS.get(m, m)} | " + " | ".join(format_paired(c) for c in cells)
                      + f" | {ahead} of {len(exps)} (behind: {behind}) |")
        md.append("")
    md += ["## Per-seed paired difference (difference to random | to FPS)", "",
           "Each seed's mean over the points is one sample; ± is the standard error over seeds (n = seeds), the "
           "stricter test, since a seed's points share its training split.", "",
           "| method | " + " | ".join(exps) + " |", "|" + " --- |" * (len(exps) + 1)]
    for m in methods:
        cells = [f"{format_paired(doc['paired'][e]['random'].get(m, {}).get('seeds', {})) or '-'} \\| "
                 f"{format_paired(doc['paired'][e]['fps'].get(m, {}).get('seeds', {})) or '-'}" for e in exps]
        md.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    md.append("")
    md += ["## By granularity (difference to random | to FPS)", "",
           "| method | " + " | ".join(f"{e} K | {e} layer" for e in exps) + " |",
           "|" + " --- |" * (2 * len(exps) + 1)]
    for m in methods:
        cells = []
        for e in exps:
            for g in ("K", "layer"):
                r = doc["paired"][e]["random"].get(m, {}).get(g, {})
                f = doc["paired"][e]["fps"].get(m, {}).get(g, {})
                cells.append(f"{format_paired(r) or '-'} \\| {format_paired(f) or '-'}")
        md.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    md.append("")
    for e in exps:
        sec = doc["experiments"][e]
        metric = "acc" if "acc" in sec["runs"][0]["metrics"] else "rpa"
        md += [f"## {e}: {metric} (%), mean ± std over seeds {sec['seeds']}", ""]
        if sec.get("pretrained"):
            md.append("Pretrained, no fine-tuning: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in
                                                                 sec["pretrained"].items()) + ".")
        bias = [r["metrics"][metric] for r in sec["runs"] if r["method"] == "bias"]
        if bias:
            md.append(f"Biases{' + head' if metric == 'acc' else ''} only: {100 * np.mean(bias):.1f} ± "
                      f"{100 * np.std(bias, ddof=1) if len(bias) > 1 else 0:.1f}. Recipe: {sec['recipe']}. "
                      f"{sec['seconds'] / 60:.1f} min.")
        md += ["", "| method | " + " | ".join(sec["points"]) + " |", "|" + " --- |" * (len(sec["points"]) + 1)]
        for m in sec["methods"]:
            cells = []
            for p in sec["points"]:
                v = [r["metrics"][metric] for r in sec["runs"] if r["method"] == m and r["point"] == p]
                cells.append(f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1) if len(v) > 1 else 0:.1f}"
                             if v else "")
            md.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        md.append("")
        md += diagnosis_md(sec)
    md.append(f"Environment: {doc['env']}; load when started: {doc.get('load')}.")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot_paired(doc, stem.with_suffix(".png"))


def diagnosis_md(sec: dict[str, Any]) -> list[str]:
    """Per layer (mean over seeds): statistic spread, rank agreement with the gradient; per method: gradient mass
    held and input-feature coverage at the largest K point."""
    diags = list(sec["diagnosis"].values())
    if not diags:
        return []
    layers = list(diags[0]["layers"])
    mean = lambda f: float(np.nanmean([f(d) for d in diags]))   # noqa: E731
    md = ["Diagnosis (mean over seeds). CV: spread of E|x| over the fan-in; rho: within-row Spearman correlation "
          "with GPS's |gradient| (FPS score, input rms alone, |W|).", "",
          "| layer | shape | CV | rho FPS | rho act | rho \\|W\\| |", "| --- | --- | --- | --- | --- | --- |"]
    for k in layers:
        lay = diags[0]["layers"][k]
        md.append(f"| {k} | {lay['shape'][0]}x{lay['shape'][1]} | {mean(lambda d: d['layers'][k]['stat_cv']):.2f} | "
                  f"{mean(lambda d: d['layers'][k]['rho_fps_grad']):.2f} | "
                  f"{mean(lambda d: d['layers'][k]['rho_act_grad']):.2f} | "
                  f"{mean(lambda d: d['layers'][k]['rho_mag_grad']):.2f} |")
    md.append("")
    pts = sec["points"]
    md += ["Per method and point, mean over layers and seeds: gradient mass held relative to GPS (1 = GPS) / share "
           "of distinct input features among the entries / share of neurons with an entry.", "",
           "| method | " + " | ".join(pts) + " |", "|" + " --- |" * (len(pts) + 1)]
    for m in sec["methods"]:
        cells = []
        for p in pts:
            vals = [[d["selections"][m][p][k][f] for k in layers] for d in diags for f in
                    ("grad_share", "input_coverage", "neuron_coverage")]
            g = np.nanmean([np.nanmean(v) for v in vals[0::3]])
            c = np.nanmean([np.nanmean(v) for v in vals[1::3]])
            n = np.nanmean([np.nanmean(v) for v in vals[2::3]])
            cells.append(f"{g:.2f} / {c:.2f} / {n:.2f}")
        md.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    md.append("")
    return md


def plot_paired(doc: dict[str, Any], path: Path) -> None:
    """Paired difference to random (left) and to FPS (right) per experiment, one bar per method, ± 1 se."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = [e for e in EXPERIMENTS if e in doc["experiments"]]
    methods = doc["experiments"][exps[0]]["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, base in zip(axes, BASELINES):
        ms = [m for m in methods if m != base]
        width = 0.8 / len(ms)
        for j, m in enumerate(ms):
            xs, ys, es = [], [], []
            for i, e in enumerate(exps):
                c = doc["paired"][e][base].get(m, {}).get("all", {})
                if c.get("n"):
                    xs.append(i + (j - (len(ms) - 1) / 2) * width)
                    ys.append(c["mean_pp"])
                    es.append(c["sem_pp"])
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors[j % 10], label=LABELS.get(m, m))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(exps)), exps)
        ax.set_ylabel(f"paired difference to {LABELS.get(base, base)} (pp)")
        ax.set_title(f"method - {LABELS.get(base, base)}, mean over points x seeds, ± 1 se", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 seeds, 300 test frames: ~10 min on 2 idle cores with --jobs 2")
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma list of {', '.join(EXPERIMENTS)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=None, help="default: CNN 4, others 3 (quick: 2)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run seeds first..first+N-1 and merge them into the existing results (split long runs)")
    ap.add_argument("--jobs", type=int, default=1, help="experiments run in this many processes (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads per process")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/quality_variants[_quick])")
    ap.add_argument("--report", action="store_true", help="only rewrite the Markdown and PNG from the JSON")
    ap.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                    help="merge these results files (runs split over processes) into the results, then report")
    args = ap.parse_args(argv)
    stem = Path(args.out) if args.out else RESULTS / ("quality_variants_quick" if args.quick else "quality_variants")
    if args.report or args.merge is not None:
        path = stem.with_suffix(".json")
        doc = json.loads(path.read_text()) if path.is_file() else {"experiments": {}, "quick": args.quick,
                                                                    "env": env_info(), "variants": _variant_help()}
        for other in args.merge or []:
            for exp, sec in json.loads(Path(other).read_text())["experiments"].items():
                doc["experiments"][exp] = merge_seeds(doc["experiments"].get(exp), sec)
        write_report(stem, doc)
        return 0

    exps = [e for e in args.experiments.split(",") if e]
    bad = [e for e in exps if e not in EXPERIMENTS]
    if bad:
        ap.error(f"unknown experiment(s) {bad}; choose from {', '.join(EXPERIMENTS)}")
    methods = [m for m in args.methods.split(",") if m]
    if "gps" not in methods:
        methods.append("gps")   # the diagnosis measures every selection against the gradient
    doc: dict[str, Any] = {"experiments": {}}
    if stem.with_suffix(".json").is_file():   # earlier seeds and experiments are kept; a rerun seed replaces its own
        doc["experiments"] = json.loads(stem.with_suffix(".json").read_text()).get("experiments", {})
    import os

    doc.update({"quick": args.quick, "env": env_info(), "load": os.getloadavg(),
                "variants": _variant_help()})

    def seeds_for(e: str) -> list[int]:
        n = args.seeds or (2 if args.quick else (4 if e == "cnn" else 3))
        return list(range(args.first_seed, args.first_seed + n))

    jobs = [(e, args.quick, seeds_for(e), methods, args.threads) for e in exps]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            for exp, sec in pool.imap_unordered(_worker, jobs):
                doc["experiments"][exp] = merge_seeds(doc["experiments"].get(exp), sec)
                write_report(stem, doc)
    else:
        for job in jobs:
            before = doc["experiments"].get(job[0])

            def progress(sec: dict[str, Any], exp: str = job[0], before: Any = before) -> None:
                doc["experiments"][exp] = merge_seeds(before, sec)
                write_report(stem, doc)

            run_experiment(*job, progress=progress)
    log(f"done in {time.perf_counter() - t0:.0f}s -> {stem.with_suffix('.md')}")
    return 0


def merge_seeds(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """An experiment's section with new's seeds added to (or replacing the same seeds of) old's; the methods and
    points of both must agree, so that every comparison stays paired."""
    if not old or old.get("points") != new["points"] or old.get("methods") != new["methods"]:
        return new
    seeds = set(new["seeds"])
    out = dict(new)
    out["runs"] = [r for r in old["runs"] if r["seed"] not in seeds] + new["runs"]
    out["diagnosis"] = {**{k: v for k, v in old["diagnosis"].items() if int(k) not in seeds},
                        **{str(k): v for k, v in new["diagnosis"].items()}}
    out["seeds"] = sorted(set(old["seeds"]) | seeds)
    out["seconds"] = round(old.get("seconds", 0) + new["seconds"], 1)
    return out


def _variant_help() -> dict[str, str]:
    from fps_graph.selection.scores import get_score

    return {k: get_score(k).help for k in VARIANT_METHODS}


if __name__ == "__main__":
    sys.exit(main())
