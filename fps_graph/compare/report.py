"""The quality tables and plot of a comparison: ``fps-graph compare`` and the LM study (bench/quality_lm) write the
same files from the same run records.

A run record (one training run, ``runs.train_run``) holds at least ``model``, ``task``, ``method``, ``lr``,
``seed``, ``extra.budget`` (a label such as ``0.5%``, or ``-`` for a reference that has no budget), ``trainable``,
``seconds_per_step``, ``memory.peak_rss_mb``, ``diverged`` (when the loss became non-finite) and ``metrics``
(per split: ``loss``, ``acc``, and ``ppl`` for causal-lm). ``report`` groups the records by (model, task) and writes:

* ``STEM.md``: per experiment, the chosen learning rates; the score of every method at every budget at its chosen
  rate (mean ± standard deviation over seeds; references such as ``head`` and ``full`` once); trainable counts; the
  paired difference of every method to ``random`` and to ``fps`` over seeds (``stats.paired_seeds``: mean ±
  standard error, bold when at least two standard errors from 0); the learning-rate sweep on validation; time per
  step and peak memory of each method in the same runs.
* ``STEM.json``: the same numbers, every run, the plan, and ``meta`` (``RunMeta``: git commit where the package
  is a git checkout, machine, threads, load average at the start and at the end, package versions).
* ``STEM.png``: per experiment, the score against the trainable count (one line per method over the budgets,
  references as horizontal lines) and the validation score against the learning rate (the sweep).

Scores: accuracy for seq-cls; for causal-lm the loss per token (lower is better; tables show perplexity, and
paired differences are in loss per token x 100, signed so that positive means better, like accuracy points).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fps_graph import __version__
from fps_graph.compare.stats import format_paired, paired_seeds
from fps_graph.formats.io import atomic_output

__all__ = ["REFERENCES", "RunMeta", "score", "value", "budget_label", "load_now", "report", "sections"]

REFERENCES = ("full", "head", "none")      # methods without a budget: shown once, as lines in the plot
NO_BUDGET = "-"
CODE_PATHS = ("fps_graph", "cli", "bench", "pyproject.toml")   # a change here can change a result


def budget_label(fraction: float) -> str:
    """0.005 -> '0.5%' (the label runs and tables use)."""
    return f"{fraction * 100:g}%"


def score(rec: dict[str, Any], split: str) -> float:
    """The number a method is judged by, higher is better: accuracy (seq-cls), minus the loss per token
    (causal-lm). A diverged run scores worst (accuracy 0; loss -inf)."""
    m = rec["metrics"][split]
    causal = "ppl" in m
    if rec.get("diverged") or not math.isfinite(m["loss"]):
        return float("-inf") if causal else 0.0
    return -float(m["loss"]) if causal else float(m["acc"])


def value(rec: dict[str, Any], split: str) -> float:
    """The number tables show: accuracy in % (seq-cls), perplexity (causal-lm)."""
    m = rec["metrics"][split]
    return float(m["ppl"]) if "ppl" in m else 100.0 * float(m["acc"])


def load_now() -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes; above the core count, jobs wait for a core)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict[str, Any]:
    """The commit of the fps-graph code that ran, where it runs from a git checkout (None from an installed
    package), and whether its code differed from that commit (then: which files)."""
    root = Path(__file__).resolve().parents[2]
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else ""
    if not commit:
        return {"commit": None, "short": None, "dirty": None, "changed": []}
    porcelain = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *CODE_PATHS],
                               capture_output=True, text=True, timeout=20).stdout
    changed = [line[3:] for line in porcelain.splitlines() if line.strip()]
    return {"commit": commit, "short": commit[:9], "dirty": bool(changed), "changed": changed[:50]}


def machine() -> dict[str, Any]:
    """CPU model and count, memory, OS and Python."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 2 ** 20, 1)
    except (OSError, StopIteration):
        pass
    return info


def versions() -> dict[str, Any]:
    """Versions of fps-graph and of the packages the run used (those imported by now; nothing is imported here)."""
    out: dict[str, Any] = {"fps_graph": __version__}
    for name in ("torch", "transformers", "peft", "onnxruntime", "onnx", "tokenizers", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", None)
    return out


class RunMeta:
    """The ``meta`` block of a results file (the same block as bench/meta.py's): made at the start of a run,
    completed by ``finish``: git commit, machine, threads, load before and after, whether the machine was under
    load (timings then are slower than alone), start, end, duration, command line, package versions.

    Args:
        threads (`int`, *optional*): the threads the run asked for (torch / ONNX Runtime intra-op).
        **extra: anything else worth keeping beside it, stored under ``"extra"``.
    """

    def __init__(self, threads: int | None = None, **extra: Any):
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self._t0 = time.perf_counter()
        self.load_before = load_now()
        self.threads, self.extra = threads, extra
        self.git, self.machine = git_state(), machine()

    def finish(self) -> dict[str, Any]:
        """The block, with the load after the run and its duration; JSON-ready."""
        after = load_now()
        cpus = self.machine.get("cpus_usable") or 1
        env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
        return {"git": self.git, "machine": self.machine, "threads": {"requested": self.threads, "env": env},
                "load_before": self.load_before, "load_after": after,
                "under_load": max(self.load_before[:1] + after[:1], default=0.0) > 0.5 * cpus,
                "started": self.started.isoformat(timespec="seconds"),
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - self._t0, 3),
                "argv": [Path(sys.argv[0]).name, *sys.argv[1:]], "versions": versions(), "extra": self.extra}


# ------------------------------------------------------------------------------------------------- tables


def _fmt(rs: Sequence[dict[str, Any]], causal: bool, split: str) -> str:
    if not rs:
        return ""
    v = np.array([value(r, split) for r in rs])
    if len(v) == 1:
        return f"{v[0]:.2f}" if causal else f"{v[0]:.1f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if causal else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def _count(n: Any) -> str:
    if n is None:
        return "?"
    n = int(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _order(methods: Sequence[str], seen: Sequence[str]) -> list[str]:
    first = [m for m in methods if m in seen]
    return first + [m for m in dict.fromkeys(seen) if m not in first]


def sections(runs: Sequence[dict[str, Any]], plan: dict[str, Any], split: str = "test"
             ) -> tuple[dict[str, Any], list[str]]:
    """Per (model, task): the JSON section and the Markdown lines (see the module docstring).

    ``plan``: ``lrs`` ({"model/task": {method: lr}}, the chosen rates), ``budgets`` (fractions), ``sweep_budget``
    (the budget of the sweep), ``methods`` (the order of the rows)."""
    ok = [r for r in runs if split in r.get("metrics", {})]
    out: dict[str, Any] = {}
    lines: list[str] = []
    for (model, task) in sorted({(r["model"], r["task"]) for r in ok}):
        rs = [r for r in ok if r["model"] == model and r["task"] == task]
        causal = "ppl" in rs[0]["metrics"][split]
        chosen = plan.get("lrs", {}).get(f"{model}/{task}", {})
        main = [dict(r) for r in rs if chosen.get(r["method"]) is None or r["lr"] == chosen[r["method"]]]
        budgets = [b for b in (budget_label(x) for x in plan.get("budgets", ()))
                   if any(r["extra"].get("budget") == b for r in main)]
        methods = _order(plan.get("methods", ()), [r["method"] for r in main])
        refs = [m for m in REFERENCES if any(r["method"] == m for r in main)]
        for r in main:
            r["point"] = r["extra"].get("budget")
            r["metrics"] = dict(r["metrics"], score=score(r, split))
        sec: dict[str, Any] = {"lrs": chosen, "split": split, "runs": rs, "cells": {}, "paired": {}, "sweep": {}}
        lines += [f"## {model} / {task}", "",
                  "Learning rates (chosen on validation, seed 0, middle budget): "
                  + ", ".join(f"{m} {lr:g}" for m, lr in sorted(chosen.items()) if lr is not None), ""]
        lines += ["| method | " + " | ".join(budgets) + " |", "|" + " --- |" * (len(budgets) + 1)]
        for m in [x for x in methods if x not in refs]:
            cells = []
            for b in budgets:
                vals = [r for r in main if r["method"] == m and r["point"] == b]
                cells.append(_fmt(vals, causal, split))
                sec["cells"][f"{m}@{b}"] = {"values": [value(r, split) for r in vals],
                                           "seeds": [r["seed"] for r in vals],
                                           "trainable": [r.get("trainable") for r in vals]}
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        for m in refs:
            vals = [r for r in main if r["method"] == m]
            sec["cells"][m] = {"values": [value(r, split) for r in vals], "seeds": [r["seed"] for r in vals],
                               "trainable": [r.get("trainable") for r in vals]}
            lines.append(f"| *{m}* ({_count(vals[0].get('trainable'))} trainable) | {_fmt(vals, causal, split)} |"
                         + " |" * (len(budgets) - 1))
        shown = [m for m in ("fps", "lora") if any(r["method"] == m for r in main)]
        def trainable(m: str, b: str) -> str:
            return _count(next((r.get("trainable") for r in main if r["method"] == m and r["point"] == b), None))

        lines += ["", "Trainable values per budget: " + ", ".join(
            f"{b}: " + "/".join(f"{m} {trainable(m, b)}" for m in shown) for b in budgets), ""]
        pts = [r for r in main if r["point"] in budgets]
        lines += [f"Paired difference to random, {split} score (accuracy pp; causal-lm: loss per token x 100, "
                  "sign so that positive = better), mean ± SE over seeds:", "",
                  "| method | difference to random | to fps |", "| --- | --- | --- |"]
        for m in methods:
            if m in refs:
                continue
            a = paired_seeds(pts, m, "random", "score", budgets) if m != "random" else {"n": 0}
            b = paired_seeds(pts, m, "fps", "score", budgets) if m != "fps" else {"n": 0}
            sec["paired"][m] = {"random": a, "fps": b}
            lines.append(f"| {m} | {format_paired(a)} | {format_paired(b)} |")
        sweep_b = budget_label(plan.get("sweep_budget", 0.005))
        sweep = [r for r in rs if r["seed"] == 0 and r["extra"].get("budget") in (sweep_b, NO_BUDGET)
                 and "val" in r["metrics"]]
        lrs = sorted({r["lr"] for r in sweep if r["lr"] is not None})
        lines += ["", "Learning-rate sweep (validation, seed 0, middle budget):", "",
                  "| method | " + " | ".join(f"{x:g}" for x in lrs) + " |", "|" + " --- |" * (len(lrs) + 1)]
        for m in methods:
            row = []
            for x in lrs:
                v = [r for r in sweep if r["method"] == m and r["lr"] == x]
                row.append(("diverged" if v[0].get("diverged") else _fmt(v, causal, "val")) if v else "")
                if v:
                    sec["sweep"].setdefault(m, {})[f"{x:g}"] = None if v[0].get("diverged") else value(v[0], "val")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines += ["", "Cost per method (same runs; medians: seconds per training step, peak RSS of the training "
                  "stretch and its increase over what the process held before it; see meta for the load):", "",
                  "| method | trainable | s/step | peak RSS MB | increase MB |", "| --- | --- | --- | --- | --- |"]
        for m in methods:
            v = [r for r in main if r["method"] == m and r.get("seconds_per_step")]
            if v:
                rise = [r["memory"]["peak_increase_mb"] for r in v if "peak_increase_mb" in r["memory"]]
                up = f"{np.median(rise):.0f}" if rise else ""
                lines.append(f"| {m} | {_count(v[0].get('trainable'))} | "
                             f"{np.median([r['seconds_per_step'] for r in v]):.2f} | "
                             f"{np.median([r['memory']['peak_rss_mb'] for r in v]):.0f} | {up} |")
        lines.append("")
        out[f"{model}/{task}"] = sec
    return out, lines


def report(runs: Sequence[dict[str, Any]], stem: str | os.PathLike, plan: dict[str, Any], *,
           header: Sequence[str], meta: dict[str, Any], split: str = "test") -> dict[str, Any]:
    """Write STEM.json, STEM.md and STEM.png (see the module docstring); returns the JSON document.

    ``header``: the Markdown lines above the tables (title, how the file was made); ``meta``: the run's
    ``RunMeta(...).finish()`` block (git commit, machine, threads, load). The plot is skipped, with
    ``plot_warning`` in the document, when matplotlib is missing or drawing fails; the tables never depend on it."""
    stem = Path(stem)
    experiments, lines = sections(runs, plan, split)
    doc: dict[str, Any] = {"meta": meta, "plan": plan, "experiments": experiments}
    png = stem.with_name(stem.name + ".png")
    warning = plot(doc, png)
    if warning:
        doc["plot_warning"] = warning
    with atomic_output(stem.with_name(stem.name + ".json"), force=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    with atomic_output(stem.with_name(stem.name + ".md"), force=True) as tmp:
        tmp.write_text("\n".join(list(header) + [""] + lines) + "\n")
    return doc


# --------------------------------------------------------------------------------------------------- plot


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Score against trainable count, and the learning-rate sweep, per experiment; a warning instead of a plot
    when matplotlib is missing or drawing fails."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed; no plot (pip install matplotlib)"
    exps = list(doc["experiments"])
    if not exps:
        return "no finished runs to plot"
    try:
        fig = Figure(figsize=(11, 4.2 * len(exps)), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(exps), 2, squeeze=False)
        for (ax, ax2), name in zip(axes, exps):
            _panels(ax, ax2, name, doc["experiments"][name])
        fig.tight_layout()
        with atomic_output(path, force=True) as tmp:
            fig.savefig(str(tmp), format="png")
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:
        return f"could not draw the plot: {type(exc).__name__}: {exc}"
    return None


def _panels(ax: Any, ax2: Any, name: str, sec: dict[str, Any]) -> None:
    split = sec.get("split", "test")
    causal = any("ppl" in r["metrics"].get(split, {}) for r in sec["runs"])
    unit = "perplexity (lower is better)" if causal else "accuracy %"
    series: dict[str, list[tuple[float, float, float, list[float]]]] = {}
    for key, c in sec["cells"].items():
        if "@" not in key or not c["values"]:
            continue
        m, _ = key.split("@", 1)
        x = float(np.mean([t for t in c["trainable"] if t] or [1]))
        series.setdefault(m, []).append((x, float(np.mean(c["values"])),
                                         float(np.std(c["values"], ddof=1)) if len(c["values"]) > 1 else 0.0,
                                         list(c["values"])))
    names = list(dict.fromkeys([*series, *sec.get("sweep", {})]))      # the table's order
    colour = {m: f"C{i % 10}" for i, m in enumerate(names)}
    one_budget = all(len(p) == 1 for p in series.values())
    for i, (m, pts) in enumerate(series.items()):
        pts.sort()
        wide = m in ("fps", "random", "lora")
        if one_budget:          # one budget: methods side by side, each seed a dot, mean ± sd
            ax.scatter([i] * len(pts[0][3]), pts[0][3], s=12, color=colour[m], alpha=0.5)
            ax.errorbar([i], [pts[0][1]], yerr=[pts[0][2]], marker="o", ms=7, capsize=4, color=colour[m],
                        lw=2.2 if wide else 1.1, label=f"{m} ({_count(pts[0][0])} trainable)")
        else:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                        capsize=2, lw=2.2 if wide else 1.1, color=colour[m], label=m)
    for i, ref in enumerate(REFERENCES):
        c = sec["cells"].get(ref)
        if c and c["values"]:
            ax.axhline(float(np.mean(c["values"])), color="k", ls=(":", "--", "-.")[i], lw=1,
                       label=f"{ref} (reference)")
    if one_budget:
        ax.set_xticks(range(len(series)), list(series))
        ax.set_xlim(-0.6, len(series) - 0.4)
        ax.set_xlabel("method, at its chosen learning rate (dots: seeds)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("trainable values (selection or LoRA, + head)")
    ax.set_ylabel(f"{split} {unit}")
    ax.set_title(f"{name}: each method at its chosen learning rate (± sd over seeds)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    for j, (m, by_lr) in enumerate(sec.get("sweep", {}).items()):
        xs = sorted(by_lr, key=float)
        ax2.plot([float(x) for x in xs], [np.nan if by_lr[x] is None else by_lr[x] for x in xs],
                 marker="osD^v<>"[j % 7], ls=("-", "--", "-.", ":")[j % 4], color=colour.get(m), label=m)
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel(f"validation {unit}")
    ax2.set_title("learning-rate sweep (seed 0, middle budget; gaps: diverged)", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    if sec.get("sweep"):
        ax2.legend(fontsize=7)
