"""Shared machinery of the selection-quality experiments: selections, the training loop, reporting.

Selections
* ONNX path (the product): fps, gd-fps, wanda, magnitude, random through ``fps_graph.selection.pipeline.run_select`` on the
  exported model; statistics are collected once per data set (``stats_out``) and reused (``stats_in``), exactly as
  ``fps-graph select --stats-out/--stats-in`` does.
* GPS-style gradient selection (``gps``): |sum of the training loss's gradients over one pass of the training
  split| per weight entry, ranked by the same ``fps_graph.selection.ranking.select`` (top-K per output neuron, conv kernels
  flattened to [out, in*kh*kw]) and written with the ONNX masks' own tensor records, so every method has exactly
  the same keys, layouts and counts.

Training: ``fps_graph.training.job.run_train`` (the project's trainer, ``fps-graph train``) with one recipe for every
method; the experiment's own metric is computed on the trained model it returns.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from bench.meta import RunMeta

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CACHE = BENCH / ".cache" / "quality"

SELECT_METHODS = ("fps", "gd-fps", "wanda", "gps", "magnitude", "random")
VARIANT_METHODS = ("fps-cover", "fps-sample", "act-sample", "gd-diff")   # fps_graph/selection/scores/
ONNX_SCORES = ("fps", "gd-fps", "wanda", "magnitude", "random") + VARIANT_METHODS
REFERENCES = ("none", "bias", "bias+head", "full")
LABELS = {"fps": "FPS", "gd-fps": "GD-FPS", "wanda": "Wanda (l2)", "gps": "GPS (grad)", "magnitude": "magnitude",
          "random": "random", "fps-cover": "FPS-cover", "fps-sample": "FPS-sample", "act-sample": "act-sample",
          "gd-diff": "GD-diff", "none": "no fine-tuning", "bias": "biases only", "bias+head": "biases + head",
          "full": "full fine-tuning", "head": "head only (linear probe)"}


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ------------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class Point:
    """One selection size: top-K per output neuron, or a budget (fraction of scored weights) at a granularity."""

    k: int | None = None
    budget: float | None = None
    granularity: str = "neuron"

    @property
    def label(self) -> str:
        if self.k is not None:
            return f"K={self.k}"
        return f"{self.budget * 100:g}% ({self.granularity})"

    def select_kwargs(self) -> dict[str, Any]:
        from fps_graph.selection.ranking import Budget

        if self.k is not None:
            return {"k": self.k, "budget": None, "granularity": "neuron"}
        return {"k": None, "budget": Budget(fraction=self.budget), "granularity": self.granularity}


# -------------------------------------------------------------------------------------------- export


def export_unfolded(model: Any, example: Any, path: Path) -> Path:
    """torch.onnx.export (dynamo, optimize=False, dynamic batch): initializers keep their state_dict names and
    values. fps_graph.integrations.torch_export.export runs the dynamo optimiser, which folds a BatchNorm that directly follows a
    Conv into that Conv's weight while keeping the name `conv.weight`, so FPS/magnitude scores would see
    W * gamma / sigma instead of the PyTorch weight (per-neuron top-K is unaffected, layer budgets are not)."""
    import contextlib
    import io
    import logging
    import warnings

    import torch

    model.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, optimize=False, input_names=["input"],
                          output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},),
                          verbose=False)
    return Path(path)


def check_geometry(onnx_path: Path, template: Path, model: Any) -> dict[str, Any]:
    """Masks keys == the model's scored weights (every >=2-D weight), and every scored ONNX initializer equals its
    PyTorch tensor in the recorded layout (no BatchNorm folded in, no name mix-up)."""
    import onnx
    from onnx import numpy_helper

    tensors, _ = read_template(template)
    params = {k: v.detach().cpu().numpy() for k, v in model.named_parameters()}
    proto = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    want = sorted(k for k, v in params.items() if k.endswith("weight") and v.ndim >= 2)
    problems = []
    if sorted(tensors) != want:
        problems.append(f"masks keys {sorted(tensors)} != model weights {want}")
    for k, rec in tensors.items():
        w = inits.get(rec.get("onnx"))
        if w is None:
            problems.append(f"{k}: ONNX initializer {rec.get('onnx')!r} not found")
            continue
        perm = (rec.get("layout") or {}).get("transpose")
        if perm:
            w = w.transpose(perm)
        if k not in params or w.shape != params[k].shape or not np.array_equal(w, params[k]):
            problems.append(f"{k}: ONNX weight {rec.get('onnx')} differs from the PyTorch weight")
    return {"keys": sorted(tensors), "problems": problems}


# -------------------------------------------------------------------------------------------- selections


class Selector:
    """Masks files for every method and point on one exported model, statistics collected once per data set."""

    def __init__(self, onnx_path: Path, calib: Path, anchor: Path | None, workdir: Path, threads: int = 1,
                 batch_size: int = 64):
        from fps_graph.selection.pipeline import SelectOptions, run_select, write_stats

        self.onnx = Path(onnx_path)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.batch_size = batch_size
        self.seconds: dict[str, float] = {}
        self.stats = self.workdir / "stats.safetensors"
        self.anchor_stats = self.workdir / "anchor_stats.safetensors" if anchor is not None else None
        t0 = time.perf_counter()
        base = SelectOptions(score="fps", k=1, provider="cpu", threads=threads, batch_size=batch_size)
        res = run_select(self.onnx, str(calib), base, stats_out=True)
        write_stats(res.stats, self.stats, force=True)
        self.seconds["calibration"] = time.perf_counter() - t0
        self.num_samples = res.stats.num_samples
        if anchor is not None:
            t0 = time.perf_counter()
            res = run_select(self.onnx, str(anchor), base, stats_out=True)
            write_stats(res.stats, self.anchor_stats, force=True)
            self.seconds["anchor_calibration"] = time.perf_counter() - t0
        self.template: Path | None = None

    def onnx_masks(self, score: str, point: Point, seed: int = 0) -> Path:
        """fps-graph select through the product path (statistics from the saved files)."""
        from fps_graph.selection.pipeline import SelectOptions, run_select, write_result
        from fps_graph.selection.scores import get_score

        out = self.workdir / f"masks_{score}_{_slug(point.label)}_s{seed}.safetensors"
        kw = point.select_kwargs()
        opts = SelectOptions(score=score, provider="cpu", threads=self.threads, seed=seed,
                             stats_in=[str(self.stats)] if get_score(score).needs_stats else [],
                             anchor_stats_in=[str(self.anchor_stats)] if get_score(score).anchor else [], **kw)
        res = run_select(self.onnx, None, opts)
        write_result(res, out, force=True)
        if self.template is None:
            self.template = out
        return out

    def template_masks(self) -> Path:
        if self.template is None:
            self.onnx_masks("magnitude", Point(k=1))
        assert self.template is not None
        return self.template


def read_template(template: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The per-key tensor records and header metadata of a masks file."""
    from fps_graph.formats.masks import read_metadata

    meta = read_metadata(template)
    return meta["tensors"], meta


def canonical_shape(shape: Sequence[int]) -> tuple[int, int]:
    """[out, fan_in] of a PyTorch weight: Linear [out, in]; Conv [out, in/groups*kh*kw] (GPS's reshape)."""
    return int(shape[0]), int(np.prod(shape[1:])) if len(shape) > 1 else 1


def select_from_scores(scores: dict[str, np.ndarray], point: Point) -> dict[str, np.ndarray]:
    """Flat indices (PyTorch layout, sorted) per key of the top entries of arbitrary per-weight scores, ranked by
    the product's own fps_graph.selection.ranking.select (same K / budget / granularity rules, same tie-breaking)."""
    from fps_graph.selection.ranking import select

    keys = list(scores)
    shapes = [canonical_shape(scores[k].shape) for k in keys]
    mats = [np.asarray(scores[k], dtype=np.float64).reshape(shapes[i]) for i, k in enumerate(keys)]
    chosen, _ = select(len(keys), shapes, lambda i: mats[i], names=keys, **point.select_kwargs())
    return {k: np.sort(np.asarray(c, dtype=np.int64)) for k, c in zip(keys, chosen)}


def write_masks_like(template: Path, indices: dict[str, np.ndarray], out: Path, score: str,
                     extra: dict[str, Any] | None = None) -> Path:
    """A masks file with the template's keys and tensor records, holding these indices."""
    from fps_graph.formats.io import atomic_output
    from fps_graph.formats.masks import write_masks

    tensors, meta = read_template(template)
    if set(indices) != set(tensors):
        raise ValueError(f"keys differ from the template: {sorted(set(indices) ^ set(tensors))}")
    recs = {}
    for k, rec in tensors.items():
        r = dict(rec)
        r["selected"] = int(len(indices[k]))
        recs[k] = r
    keep = ("fps_graph_version", "model_sha256", "model", "total")
    m = {k: meta[k] for k in keep if k in meta}
    m.update({"score": score, "stat": "none", "selected": str(int(sum(len(v) for v in indices.values())))})
    m.update(extra or {})
    with atomic_output(out, force=True) as tmp:
        write_masks(tmp, {k: np.asarray(v, dtype=np.int64) for k, v in indices.items()}, recs, m)
    return out


def gradient_scores(model: Any, batches: Iterable[tuple[Any, Any]], loss_fn: Callable[[Any, Any], Any],
                    keys: Sequence[str]) -> dict[str, np.ndarray]:
    """GPS-style importance: |sum over batches of d loss / d W| for each named weight (one pass, eval mode,
    normalisation statistics frozen). GPS accumulates gradients over the training epoch and ranks by magnitude."""
    import torch

    model.eval()
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in keys)
        p.grad = None
    try:
        for x, y in batches:
            loss = loss_fn(model(x), y)
            loss.backward()
        return {k: params[k].grad.detach().abs().double().numpy().copy() for k in keys}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def mask_overlap(a: Path, b: Path) -> dict[str, float]:
    """Per key: |A & B| / |A| (A and B select the same number of entries per key for K points)."""
    from fps_graph.formats.masks import load_indices

    ia, ib = load_indices(a), load_indices(b)
    out = {}
    for k in ia:
        if len(ia[k]):
            out[k] = float(len(np.intersect1d(ia[k], ib[k]))) / len(ia[k])
    tot_a = sum(len(v) for v in ia.values())
    out["all"] = float(sum(len(np.intersect1d(ia[k], ib[k])) for k in ia)) / max(tot_a, 1)
    return out


def chance_overlap(template: Path, point: Point) -> float:
    """Expected overlap of a uniformly random selection of the same size per neuron/tensor (K points)."""
    tensors, _ = read_template(template)
    if point.k is None:
        return float("nan")
    sel = tot = 0.0
    for rec in tensors.values():
        rows, cols = canonical_shape(rec["shape"])
        k = min(point.k, cols)
        sel += rows * k
        tot += rows * k * (k / cols)
    return tot / sel


# ------------------------------------------------------------------------------------------------ training


@dataclass
class Recipe:
    """One training recipe for every method (fps_graph.training.config.OptimConfig knobs)."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0


def train_run(factory: str, weights: Path, masks: Path | dict, data: Path, recipe: Recipe, seed: int, workdir: Path,
              train_head: bool, train_full: Sequence[str] = (), train_bias: bool = True, threads: int = 1,
              num_classes: int | None = None) -> tuple[Any, dict[str, Any]]:
    """fps-graph train (run_train) with the recipe; returns the trained model (eval mode) and the run's metrics."""
    from fps_graph.training.job import run_train, train_job

    workdir.mkdir(parents=True, exist_ok=True)
    job = train_job(factory, str(masks) if isinstance(masks, Path) else masks, str(data), str(workdir),
                    weights=str(weights), epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                    optimizer=recipe.optimizer, weight_decay=recipe.weight_decay,
                    warmup_epochs=recipe.warmup_epochs, label_smoothing=recipe.label_smoothing, seed=seed,
                    train_bias=train_bias, train_head=train_head, train_full=tuple(train_full), plot=False,
                    threads=threads, force=True, num_classes=num_classes)
    res = run_train(job)
    model = res.handle.model
    model.eval()
    return model, res.metrics


# ------------------------------------------------------------------------------------------------ reporting


def env_info() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def aggregate(runs: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds for each (model, method, point)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r.get("model", ""), r["method"], r["point"]), []).append(r)
    out = []
    for (model, method, point), rs in groups.items():
        rec: dict[str, Any] = {"model": model, "method": method, "point": point, "seeds": len(rs),
                               "trainable": int(np.mean([r["trainable"] for r in rs])),
                               "selected": int(np.mean([r["selected"] for r in rs]))}
        for m in metrics:
            v = np.array([r["metrics"][m] for r in rs], dtype=np.float64)
            rec[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "values": [float(x) for x in v]}
        out.append(rec)
    return out


def fmt(m: dict[str, float], scale: float = 100.0) -> str:
    return f"{m['mean'] * scale:.1f} ± {m['std'] * scale:.1f}"


def markdown_table(agg: list[dict[str, Any]], points: Sequence[str], metric: str, methods: Sequence[str],
                   refs: Sequence[str], model: str = "") -> str:
    """Methods as rows, points as columns (mean ± std in %), references below with their own trainable counts."""
    rows = [r for r in agg if r["model"] == model]
    by = {(r["method"], r["point"]): r for r in rows}
    trainable = {p: next((by[(m, p)]["trainable"] for m in methods if (m, p) in by), None) for p in points}
    head = "| method | " + " | ".join(f"{p} ({_count(trainable[p])})" for p in points) + " |"
    lines = [head, "|" + " --- |" * (len(points) + 1)]
    for m in methods:
        cells = [fmt(by[(m, p)][metric]) if (m, p) in by else "" for p in points]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    for m in refs:
        r = next((by[(m, p)] for (mm, p) in by if mm == m), None)
        if r is None:
            continue
        lines.append(f"| *{LABELS.get(m, m)}* ({_count(r['trainable'])}) | " + fmt(r[metric]) + " |"
                     + " |" * (len(points) - 1))
    return "\n".join(lines)


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


def plot(agg: list[dict[str, Any]], metric: str, methods: Sequence[str], refs: Sequence[str], path: Path,
         title: str, models: Sequence[str] = ("",), ylabel: str = "accuracy") -> None:
    """Accuracy against trainable parameters, one line per method (solid: top-K per output neuron; dashed: layer
    budgets), error bars: std over seeds, methods slightly offset sideways; references as black markers; one panel
    per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.6 * len(models), 4.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes[0], models):
        rows = [r for r in agg if r["model"] == model]
        for i, m in enumerate(methods):
            jitter = 1.0 + 0.025 * (i - (len(methods) - 1) / 2)
            for kind, style, marker in (("K", "-", "o"), ("budget", "--", "s")):
                rs = sorted((r for r in rows if r["method"] == m and (r["point"].startswith("K=") == (kind == "K"))),
                            key=lambda r: r["trainable"])
                if not rs:
                    continue
                x = [r["trainable"] * jitter for r in rs]
                y = [100 * r[metric]["mean"] for r in rs]
                e = [100 * r[metric]["std"] for r in rs]
                ax.errorbar(x, y, yerr=e, marker=marker, ms=4, capsize=2, ls=style, color=colors[i % 10],
                            lw=2.2 if m in ("fps", "gps") else 1.1, elinewidth=0.8,
                            label=LABELS.get(m, m) if kind == "K" else None)
        markers = {"none": "x", "bias": "s", "bias+head": "D", "full": "*", "head": "v"}
        for m in refs:
            for r in (r for r in rows if r["method"] == m):
                ax.errorbar([max(r["trainable"], 1)], [100 * r[metric]["mean"]], yerr=[100 * r[metric]["std"]],
                            marker=markers.get(m, "^"), ms=9, color="k", ls="none", capsize=3,
                            label=LABELS.get(m, m), alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (selected entries + biases + head)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{title}{' - ' + model if model else ''}\n(solid: top-K per neuron; dashed: layer budgets)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def replot(json_path: Path, metric: str, title: str, ylabel: str) -> None:
    """Redraw an experiment's PNG from its JSON."""
    doc = json.loads(Path(json_path).read_text())
    agg = doc["aggregate"]
    methods = [m for m in SELECT_METHODS + VARIANT_METHODS if any(r["method"] == m for r in agg)]
    refs = [m for m in ("none", "head", "bias", "bias+head", "full") if any(r["method"] == m for r in agg)]
    models = list(dict.fromkeys(r["model"] for r in agg))
    plot(agg, metric, methods, refs, Path(json_path).with_suffix(".png"), title, models=models, ylabel=ylabel)


_META = RunMeta()   # this process: the study's runs happen between its import and the write


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically; a results document (a dict) gets this process's ``meta`` block (bench/meta.py), the
    blocks of earlier processes that wrote it (runs merged from several invocations) kept in ``meta_previous``."""
    if isinstance(obj, dict):
        old = obj.get("meta")
        if old:
            obj["meta_previous"] = [*obj.get("meta_previous", []), old][-20:]
        obj["meta"] = _META.finish()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def paired_diff(runs: list[dict[str, Any]], a: str, b: str, metric: str, model: str = "") -> dict[str, Any]:
    """Mean and std of (a - b) over every (point, seed) pair both methods ran, and the share where a >= b."""
    idx = {(r["method"], r["point"], r["seed"]): r["metrics"][metric] for r in runs if r.get("model", "") == model}
    d = [idx[(a, p, s)] - idx[(b, p, s)] for (m, p, s) in idx if m == a and (b, p, s) in idx]
    if not d:
        return {"n": 0}
    d = np.array(d)
    return {"n": int(d.size), "mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "sem": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0,
            "a_ge_b": float(np.mean(d >= 0))}


def clean_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


__all__ = ["Point", "Selector", "Recipe", "train_run", "select_from_scores", "gradient_scores", "write_masks_like",
           "aggregate", "markdown_table", "plot", "write_json", "paired_diff", "mask_overlap", "chance_overlap"]
