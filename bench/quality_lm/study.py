"""The LM study (issue 16): does FPS's selection pay off on pretrained language models?

    python -m bench.quality_lm.assets                 # first: models and splits (bench/quality_lm/assets.py)
    python -m bench.quality_lm --quick                # SmolLM2-135M, TREC, one seed, the middle budget -> *_quick.*
    python -m bench.quality_lm                        # the study: SmolLM2-135M x {trec, shakespeare}, 3 budgets, 3 seeds
    python -m bench.quality_lm --report               # tables and plot again from the runs file

Methods, all at the same trainable count per weight on the same modules (the blocks' Linear layers; the LM head /
tied embedding is not selected): ``fps`` (the default of ``fps-graph select`` + ``train``), ``random``,
``magnitude``, ``act-sample`` (fps_graph/selection/variants.py), ``gps`` (|sum of the task loss's gradient| over one
pass of the training split, top entries per layer: bench only, it needs labels and a backward pass), ``lora``
(PEFT, rank per module matched to the selection's count: fps_graph/integrations/lora_match.py), plus the
references ``full`` (every parameter) and ``head`` (seq-cls: the new head only; causal-lm: ``none``, the
pretrained model). Selection budgets are per-layer fractions of the block Linears' weights.

Learning rates: per method, a sweep on seed 0 at the middle budget, the best on validation frozen for every
budget and seed; every run reports test. Runs are interleaved (all methods of a budget and seed together) and
run in worker processes, one thread each (bench/quality_lm/grid.py); results accumulate in a runs file
(``bench/results/quality_lm[_quick].runs.jsonl``) so the study can be stopped and resumed; the report is made
from it: ``bench/results/quality_lm[_quick].{json,md,png}`` with paired differences over seeds
(bench/quality/study.py's ``paired_seeds``), peak memory and time per step of every method in the same runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality_lm import assets
from bench.quality_lm.harness import BLOCK_LINEARS
from fps_graph.compare.report import score

RESULTS = assets.RESULTS
SELECT_SCORES = ("fps", "random", "magnitude", "act-sample", "fps-cover")
SPARSE = SELECT_SCORES + ("gps", "fps-plain")
METHODS = ("fps", "fps-plain", "random", "magnitude", "act-sample", "gps", "lora", "full", "head")
# per-layer fractions of the block Linears' weights (0.04%, 0.24%, 0.95% of all of SmolLM2-135M's weights)
BUDGETS = (0.0005, 0.003, 0.012)
SWEEP_BUDGET = 0.003
LRS = {   # swept on seed 0 at the middle budget (+ one step beyond an edge that wins); the best on validation is frozen
    "sparse": (3e-3, 1e-2, 3e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "full": (1e-5, 3e-5, 1e-4),
    "head": (3e-3, 1e-2, 3e-2),
}
TASKS = {
    "trec": dict(kind="seq-cls", max_length=64, epochs=2, batch_size=16, max_train=320),
    "sms": dict(kind="seq-cls", max_length=96, epochs=2, batch_size=16, max_train=320),
    "shakespeare": dict(kind="causal-lm", max_length=96, epochs=1, batch_size=16, max_train=320),
}
# What runs where, to fit 2 cores (a TREC run takes about 2 minutes on one core, a shakespeare run about 3-4): on TREC
# every method, the budgeted ones of the list at every budget (fps-plain, the step-scale ablation, at the middle
# one); on shakespeare every method of the list, the decision's (fps, random, LoRA) at every budget, the others
# at the middle one. Each listed (method, budget) gets every seed.
STUDY = {
    "trec": {"methods": METHODS, "every_budget": ("fps", "random", "magnitude", "act-sample", "gps", "lora")},
    "sms": {"methods": METHODS, "every_budget": ("fps", "random", "lora")},
    "shakespeare": {"methods": tuple(m for m in METHODS if m != "fps-plain"), "every_budget": ("fps", "random", "lora")},
}
EDGE_METHODS = METHODS     # a sweep edge that wins gets one more rate, for every method (no method loses to its grid)


def log(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def lr_family(method: str) -> str:
    return "sparse" if method in SPARSE else method if method in LRS else "sparse"


def budget_label(b: float) -> str:
    return f"{b * 100:g}%"


# ----------------------------------------------------------------------------------------------- selections


class Prepared:
    """Export, statistics and masks of one model and task, cached under CACHE/work/<model>/<task>/."""

    def __init__(self, model: str, task: str):
        from bench.quality_lm.export import export_body

        self.model, self.task = model, task
        self.folder = assets.model_dir(model)
        self.data = assets.task_dir(task)
        self.work = assets.CACHE / "work" / model / task
        self.work.mkdir(parents=True, exist_ok=True)
        self.onnx = export_body(self.folder, assets.CACHE / "onnx" / model)
        self.stats = self.work / "stats.safetensors"
        if not self.stats.is_file():
            self._select("fps", SWEEP_BUDGET, self.work / "masks_fps_probe.safetensors", stats_out=True)

    def _select(self, score: str, budget: float, out: Path, seed: int = 0, stats_out: bool = False) -> Path:
        cmd = [sys.executable, "-m", "fps_graph_cli.main", "select", str(self.onnx), "--score", score, "--budget",
               str(budget), "--granularity", "layer", "--seed", str(seed), "-o", str(out), "-q", "--force"]
        if stats_out:
            cmd[5:5] = [str(self.data / "train.jsonl")]
            cmd += ["--stats-out", str(self.stats), "--max-length", str(TASKS[self.task]["max_length"])]
        elif score not in ("magnitude", "random"):
            cmd += ["--stats-in", str(self.stats)]
        subprocess.run(cmd, check=True)
        return out

    def masks(self, method: str, budget: float, seed: int) -> Path:
        seeded = method in ("random", "act-sample")
        out = self.work / f"masks_{method}_{budget_label(budget)}_s{seed if seeded else 0}.safetensors"
        if out.is_file():
            return out
        if method == "gps":
            return self._gps(budget, out)
        return self._select(method, budget, out, seed=seed if seeded else 0)

    def gradients(self) -> Path:
        """|sum of the task loss's gradient| over the training file (the texts select's statistics come from), per
        block Linear weight (float32), at the pretrained weights (seq-cls: with the seed-0 head the runs start from)."""
        path = self.work / "gps_grad.safetensors"
        if path.is_file():
            return path
        from safetensors.torch import save_file

        from bench.quality_lm.harness import load_task_data
        from fps_graph.training import FullAdapter, TrainsConfig, prepare

        task = self.task_obj()
        t, model, cfg, (train, _, _), _ = load_task_data(self.folder, task, test=False)
        prepare(model, FullAdapter(TrainsConfig(train_bias=False)), t, train, seed=0)   # the head as runs have it
        keys = [n for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in BLOCK_LINEARS]
        for n, p in model.named_parameters():
            p.requires_grad_(n in keys)
        model.eval()
        for b in train.batches(task.batch_size):        # the whole training file, as select's statistics
            t.step(model, b, "cpu", 0.0).loss.backward()
        params = dict(model.named_parameters())
        save_file({k: params[k].grad.detach().abs().float().contiguous() for k in keys}, str(path))
        return path

    def _gps(self, budget: float, out: Path) -> Path:
        from safetensors.numpy import load_file

        from bench.quality.common import Point, select_from_scores, write_masks_like

        grads = load_file(str(self.gradients()))
        template = self.masks("magnitude", budget, 0)
        idx = select_from_scores({k: v.astype(np.float64) for k, v in grads.items()},
                                 Point(budget=budget, granularity="layer"))
        return write_masks_like(template, idx, out, "gps")

    def task_obj(self):
        from bench.quality_lm.harness import Task

        t = TASKS[self.task]
        return Task(self.task, t["kind"], str(self.data / "train.jsonl"), str(self.data / "val.jsonl"),
                    str(self.data / "test.jsonl"), max_length=t["max_length"], epochs=t["epochs"],
                    batch_size=t["batch_size"], max_train=t["max_train"])

    def lora_ranks(self, budget: float) -> dict[str, Any]:
        """LoRA's rank per module at the selections' count (fps_graph/integrations/lora_match.py: the nearest rank,
        at least 1). Rank 1 on all 210 block Linears of SmolLM2-135M is already 0.29% of their weights; where that
        floor makes LoRA more than 25% larger than the selection (the 0.05% budget), LoRA instead gets rank 1 on the
        q and v projections of every block (the classic LoRA targets), the count nearest the selection's that LoRA
        can have. ``note`` says which, with both totals."""
        from fps_graph.formats.masks import load_indices, read_metadata
        from fps_graph.integrations.lora_match import match_lora

        m = self.masks("magnitude", budget, 0)       # every selection has these per-layer counts
        idx = load_indices(m)
        shapes = {k: r["shape"] for k, r in read_metadata(m)["tensors"].items()}
        counts = {k: len(v) for k, v in idx.items()}
        match = match_lora(counts, shapes)
        if match.lora_total > 1.25 * match.sparse_total:
            qv = {k: shapes[k] for k in counts if k.rsplit(".", 2)[-2] in ("q_proj", "v_proj")}
            fallback = match_lora({k: sum(shapes[k]) for k in qv}, qv)       # rank 1 on each
            note = (f"rank 1 on q_proj and v_proj of every block ({fallback.lora_total:,} values; the selection "
                    f"{match.sparse_total:,}; rank 1 on every module would be {match.lora_total:,})")
            return {"ranks": fallback.ranks, "lora_total": fallback.lora_total, "sparse_total": match.sparse_total,
                    "unmatched": list(match.unmatched), "note": note}
        note = (f"rank per module ({match.lora_total:,} values; the selection {match.sparse_total:,}; "
                f"{len(match.unmatched)} modules at rank 1 above their selected count)")
        return {"ranks": match.ranks, "lora_total": match.lora_total, "sparse_total": match.sparse_total,
                "unmatched": list(match.unmatched), "note": note}


# ----------------------------------------------------------------------------------------------------- runs


def spec_line(p: Prepared, method: str, budget: float | None, seed: int, lr: float,
              splits: tuple[str, ...] = ("val", "test")) -> dict:
    t = p.task_obj()
    task = {k: getattr(t, k) for k in ("name", "kind", "train", "val", "test", "max_length", "epochs", "batch_size",
                                        "max_train")}
    spec: dict[str, Any] = {"method": method, "lr": lr, "seed": seed,
                            "extra": {"budget": budget_label(budget) if budget is not None else "-"}}
    if method == "fps-plain":         # the default selection, every entry at the learning rate (--step-scale none)
        spec.update(kind="sparse", masks=str(p.masks("fps", budget, seed)), scale="none")
    elif method in SPARSE:
        spec.update(kind="sparse", masks=str(p.masks(method, budget, seed)))
    elif method == "lora":
        spec.update(kind="lora", lora_ranks=p.lora_ranks(budget)["ranks"])
    elif method == "head" and t.kind == "causal-lm":   # nothing to train: the pretrained model (one run per seed)
        spec.update(kind="none", method="none", lr=0.0)
    else:
        spec.update(kind=method)
    return {"model": str(p.folder), "task": task, "spec": spec, "splits": list(splits)}


def run_grid(lines: list[dict], runs_file: Path, jobs: int) -> list[dict]:
    from bench.quality_lm.grid import key

    lines = list({key(x): x for x in lines}.values())       # a spec once (e.g. "none" at every rate)
    specs = runs_file.with_suffix(".specs.jsonl")
    specs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    subprocess.run([sys.executable, "-m", "bench.quality_lm.grid", str(specs), str(runs_file), "--jobs", str(jobs)],
                   check=True)
    return read_runs(runs_file)


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def best_lrs(runs: list[dict], model: str, task: str, budget: str) -> dict[str, float]:
    """Per method, the learning rate with the best validation score among the sweep's runs (seed 0)."""
    best: dict[str, tuple[float, float]] = {}
    for r in sorted(runs, key=lambda r: r.get("lr", 0.0)):     # a tie goes to the smaller rate
        if r.get("model") != model or r.get("task") != task or r.get("seed") != 0 or "metrics" not in r:
            continue
        if r["extra"].get("budget") not in (budget, "-"):
            continue
        s = score(r, "val")
        if r["method"] not in best or s > best[r["method"]][0]:
            best[r["method"]] = (s, r["lr"])
    return {m: v[1] for m, v in best.items()}


# --------------------------------------------------------------------------------------------------- report


def meta(jobs: int = 2) -> dict[str, Any]:
    """bench/meta.py's record: git commit, machine, versions, load; threads = torch threads per run."""
    from bench.meta import run_meta

    m = run_meta(threads=int(os.environ.get("GRID_THREADS", "1")))
    m["parallel_runs"] = jobs
    return m


REFS = ("full", "head", "none")
LABELS = {"fps": "fps (default: step scale input)", "fps-plain": "fps, --step-scale none (before issue 16)",
          "random": "random", "magnitude": "magnitude", "act-sample": "act-sample", "gps": "gps (gradient top-K)",
          "lora": "LoRA (PEFT, matched count)", "full": "full fine-tuning", "head": "head only (floor)",
          "none": "pretrained, no training (floor)", "fps-cover": "fps-cover", "fps-scaled": "fps-scaled"}


def task_methods(plan: dict[str, Any], task: str) -> list[str]:
    """The methods a task runs: the study's list for it, within the plan's --methods."""
    return [m for m in STUDY.get(task, {}).get("methods", METHODS) if m in plan.get("methods", METHODS)]


def runs_at(task: str, method: str, budgets: tuple[float, ...]) -> tuple[float, ...]:
    """The budgets a method runs at on a task (references: none; the others: all budgets or the middle one)."""
    if not budgeted(method):
        return ()
    if method in STUDY.get(task, {}).get("every_budget", ()) or len(budgets) == 1:
        return tuple(budgets)
    return (budgets[len(budgets) // 2],)


def expected_main(plan: dict[str, Any], task: str) -> int:
    """Main-grid runs of one model and task the plan asks for."""
    budgets = tuple(plan.get("budgets", BUDGETS))
    ms = task_methods(plan, task)
    return int(plan.get("seeds", 3)) * sum(len(runs_at(task, m, budgets)) or 1 for m in ms)


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def report(runs: list[dict], stem: Path, plan: dict[str, Any], cost_runs: list[dict] | None = None
           ) -> dict[str, Any]:
    """Tables (md, json) and the plot from the runs file; says PARTIAL while the plan's main grid is unfinished."""
    from bench.quality.study import paired_seeds

    ok = [r for r in runs if "metrics" in r and "test" in r["metrics"]]
    failed = [r for r in runs if "error" in r]
    doc: dict[str, Any] = {"meta": meta(), "plan": plan, "experiments": {}, "failed_runs": failed}
    git = doc["meta"].get("git", {})
    lines = ["# LM study (issue 16): FPS against random, LoRA and full fine-tuning on a pretrained decoder", ""]
    exps = sorted({(r["model"], r["task"]) for r in ok})
    want = sum(expected_main(plan, t) for t in plan.get("tasks", [])) * len(plan.get("models", []))
    have = 0
    body: list[str] = []
    for (model, task) in exps:
        rs = [r for r in ok if r["model"] == model and r["task"] == task]
        causal = "ppl" in rs[0]["metrics"]["test"]
        chosen = plan.get("lrs", {}).get(f"{model}/{task}", {})
        main = [r for r in rs if r["method"] in chosen and r["lr"] == chosen[r["method"]]
                or r["method"] == "none"]
        budgets = [b for b in (budget_label(x) for x in plan.get("budgets", BUDGETS))
                   if any(r["extra"].get("budget") == b for r in main)]
        main = [r for r in main if r["extra"].get("budget") in budgets + ["-"]]
        have += len(main)
        methods = [m for m in METHODS if any(r["method"] == m for r in main)]
        refs = [m for m in REFS if any(r["method"] == m for r in main)]
        total = int(rs[0].get("total_params") or 0)
        for r in main:
            r["point"] = r["extra"].get("budget")
            r["metrics"]["score"] = score(r, "test")
        sec: dict[str, Any] = {"lrs": chosen, "runs": rs, "cells": {}, "paired": {}, "per_budget": {},
                               "total_params": total, "floor": refs[-1] if refs and refs[-1] != "full" else None}
        unit = "test perplexity (lower is better)" if causal else "test accuracy %"
        body += [f"## {model} / {task}: {unit}, mean ± SD over seeds (n)", "",
                 "Learning rates (best on validation: seed 0, middle budget): "
                 + ", ".join(f"{m} {lr:g}" for m, lr in sorted(chosen.items()) if m != "none"), ""]
        pct = {}
        for b in budgets:
            sel = [r.get("selected") for r in main if r["point"] == b and r["method"] == "random"]
            pct[b] = f" ({100 * sel[0] / total:.2g}% of all weights)" if sel and sel[0] and total else ""
        body += ["| method | " + " | ".join(f"{b} per layer{pct[b]}" for b in budgets) + " |",
                 "|" + " --- |" * (len(budgets) + 1)]
        for m in [x for x in methods if x not in refs]:
            cells = []
            for b in budgets:
                vals = [r for r in main if r["method"] == m and r["point"] == b]
                cells.append(_fmt(vals, causal))
                sec["cells"][f"{m}@{b}"] = {"values": [_val(r, causal) for r in vals],
                                           "seeds": [r["seed"] for r in vals],
                                           "trainable": [r.get("trainable") for r in vals],
                                           "selected": [r.get("selected") for r in vals]}
            body.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        for m in refs:
            vals = [r for r in main if r["method"] == m]
            sec["cells"][m] = {"values": [_val(r, causal) for r in vals], "seeds": [r["seed"] for r in vals],
                               "trainable": [r.get("trainable") for r in vals]}
            body.append(f"| *{LABELS.get(m, m)}* ({_count(vals[0].get('trainable'))} trainable) | "
                        + _fmt(vals, causal) + " |" * len(budgets))
        counts = []
        for b in budgets:
            c = {m: next((r.get("trainable") for r in main if r["method"] == m and r["point"] == b), None)
                 for m in ("fps", "lora")}
            counts.append(f"{b}: fps {_count(c['fps'])} / LoRA {_count(c['lora'])}")
        body += ["", "Trainable values (adapter + what trains in full, e.g. the seq-cls head): " + "; ".join(counts)
                 + ".", ""]
        # paired differences: each seed's mean over the budgets is one sample (SE over seeds)
        pts = [r for r in main if r["point"] in budgets]
        for ref in refs:     # a reference is budget-free: pair it with every budget of the same seed
            pts += [{**r, "point": b} for r in main if r["method"] == ref for b in budgets]
        against = [b for b in ("random", "lora", "fps-plain", refs[-1] if refs else None, "full") if b in methods]
        against = list(dict.fromkeys(against))
        sign = "accuracy pp" if not causal else "loss per token x 100, sign flipped (positive = lower loss)"
        body += [f"Paired difference, row minus column, test ({sign}); mean over the budgets per seed, mean ± SE "
                 "over seeds; **bold**: at least 2 SE from zero:", "",
                 "| method | " + " | ".join(f"vs {LABELS.get(b, b).split(' (')[0]}" for b in against) + " |",
                 "|" + " --- |" * (len(against) + 1)]
        for m in [x for x in methods if x not in refs or x == "full"]:
            cells = []
            for b in against:
                c = paired_seeds(pts, m, b, "score", budgets) if b != m else {"n": 0}
                sec["paired"].setdefault(m, {})[b] = c
                cells.append(_cell(c))
            body.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        body += ["", "Per budget, fps minus each (same units, mean ± SE over seeds):", "",
                 "| fps minus | " + " | ".join(budgets) + " |", "|" + " --- |" * (len(budgets) + 1)]
        for b2 in [x for x in methods if x != "fps"]:
            cells = []
            for b in budgets:
                c = paired_seeds(pts, "fps", b2, "score", [b])
                sec["per_budget"].setdefault(b2, {})[b] = c
                cells.append(_cell(c))
            body.append(f"| {LABELS.get(b2, b2)} | " + " | ".join(cells) + " |")
        # LR sweep table
        sb = budget_label(plan.get("sweep_budget", SWEEP_BUDGET))
        sweep_rs = [r for r in rs if r["seed"] == 0 and r["extra"].get("budget") in (sb, "-")]
        lrs = sorted({r["lr"] for r in sweep_rs if r["method"] != "none"})
        body += ["", f"Learning-rate sweep (validation{' perplexity' if causal else ' accuracy %'}, seed 0, "
                 f"{sb} per layer; the chosen rate in bold; test in the tables above):", "",
                 "| method | " + " | ".join(f"{x:g}" for x in lrs) + " |", "|" + " --- |" * (len(lrs) + 1)]
        sec["sweep"] = {}
        for m in [x for x in methods if x != "none"]:
            row = []
            for x in lrs:
                v = [r for r in sweep_rs if r["method"] == m and r["lr"] == x]
                cell = _fmt(v, causal, "val") if v else ""
                if v:
                    sec["sweep"][f"{m}@{x:g}"] = _val(v[0], causal, "val")
                row.append(f"**{cell}**" if v and chosen.get(m) == x else cell)
            body.append(f"| {LABELS.get(m, m)} | " + " | ".join(row) + " |")
        # never below the floor with the default recipe
        floor = sec["floor"]
        if floor:
            fl = {r["seed"]: _val(r, causal) for r in main if r["method"] == floor}
            d = [(r["seed"], r["point"], _val(r, causal) - fl[r["seed"]]) for r in main
                 if r["method"] == "fps" and r["seed"] in fl]
            worst = (max if causal else min)(d, key=lambda t: t[2]) if d else None
            sec["never_below_floor"] = {"fps_minus_floor_test": d, "worst": worst}
            if worst:
                body += ["", f"Default recipe against the floor ({LABELS[floor]}): fps at its chosen rate minus the "
                         f"floor, same seed, every budget: worst {worst[2]:+.2f} {'ppl' if causal else 'pp'} "
                         f"(seed {worst[0]}, {worst[1]}); "
                         + ("below the floor" if (worst[2] > 0 if causal else worst[2] < 0) else "never below the floor")
                         + "."]
        # cost in the same runs
        body += ["", "Cost in these runs (median over the main grid's runs of a method; 1 thread per run, 2 runs at "
                 "a time on 2 shared cores: times are under load):", "",
                 "| method | trainable (middle budget) | s/step | peak RSS MB | load (1 min) |",
                 "| --- | --- | --- | --- | --- |"]
        sec["cost_in_runs"] = {}
        for m in methods:
            v = [r for r in main if r["method"] == m and r.get("seconds_per_step")]
            if not v:
                continue
            c = {"s_per_step": _median([r["seconds_per_step"] for r in v]),
                 "peak_rss_mb": _median([r["memory"].get("peak_rss_mb") for r in v]),
                 "load": _median([(r.get("load_after") or [None])[0] for r in v]), "n": len(v)}
            sec["cost_in_runs"][m] = c
            mid = next((r.get("trainable") for r in v if r["point"] in (sb, "-")), v[0].get("trainable"))
            body.append(f"| {LABELS.get(m, m)} | {_count(mid)} | {c['s_per_step']:.2f} | {c['peak_rss_mb']:.0f} | "
                        f"{c['load']:.1f} |")
        body.append("")
        doc["experiments"][f"{model}/{task}"] = sec
    # the cost measurement: each method alone
    cost = [r for r in (cost_runs or []) if r.get("seconds_per_step")]
    if cost:
        doc["cost"] = {}
        body += ["## Cost, each method alone (the numbers the docs quote)", "",
                 "Each method trained a few steps in its own process, one at a time, methods interleaved, 1 thread "
                 "(`--cost`); median over repetitions; the 1-minute load average after each run says how busy the "
                 "2 cores were.", ""]
        for task in sorted({r["task"] for r in cost}):
            body += [f"### {task.replace('-cost', '')}", "",
                     "| method | trainable | s/step | peak RSS MB | vs full: time | vs full: memory | load |",
                     "| --- | --- | --- | --- | --- | --- | --- |"]
            rows = {}
            for m in METHODS:
                v = [r for r in cost if r["task"] == task and r["method"] == m]
                if v:
                    rows[m] = {"trainable": v[0].get("trainable"), "n": len(v),
                               "s_per_step": _median([r["seconds_per_step"] for r in v]),
                               "peak_rss_mb": _median([r["memory"].get("peak_rss_mb") for r in v]),
                               "load": _median([(r.get("load_after") or [None])[0] for r in v])}
            doc["cost"][task] = rows
            full = rows.get("full")
            for m, c in rows.items():
                rel_t = f"{c['s_per_step'] / full['s_per_step']:.2f}x" if full else ""
                rel_m = f"{c['peak_rss_mb'] / full['peak_rss_mb']:.2f}x" if full else ""
                body.append(f"| {LABELS.get(m, m)} | {_count(c['trainable'])} | {c['s_per_step']:.2f} | "
                            f"{c['peak_rss_mb']:.0f} | {rel_t} | {rel_m} | {c['load']:.1f} |")
            body.append("")
    partial = bool(want) and have < want
    doc["partial"] = {"main_runs_done": have, "main_runs_planned": want} if partial else False
    head = [f"Generated by `python -m bench.quality_lm{' --quick' if plan.get('quick') else ''}` "
            f"(bench/quality_lm/study.py) at commit {git.get('short', '?')}{' (dirty)' if git.get('dirty') else ''}; "
            f"load average at report time {doc['meta'].get('load_start')} on a {doc['meta']['machine'].get('cores')}"
            "-core machine shared with other jobs. Every run: its own process, 1 thread, 2 runs at a time. "
            "Score: test accuracy (seq-cls) or test perplexity (causal-lm, lower is better); learning rates chosen "
            "on validation.", ""]
    if partial:
        head = [f"**PARTIAL RESULTS: {have} of {want} main-grid runs done; the study is still running.**", ""] + head
    if failed:
        head += [f"{len(failed)} run(s) failed (recorded in the runs file): "
                 + "; ".join(f"{r.get('key')}: {r['error'][:120]}" for r in failed[:5]), ""]
    lines += head + body
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(doc, stem.with_suffix(".png"))
    return doc


def _val(r: dict, causal: bool, split: str = "test") -> float:
    m = r["metrics"][split]
    return float(m["ppl"] if causal else m["acc"] * 100)


def _fmt(rs: list[dict], causal: bool, split: str = "test") -> str:
    if not rs:
        return ""
    v = np.array([_val(r, causal, split) for r in rs])
    d = 2 if causal else 1
    if len(v) == 1:
        return f"{v[0]:.{d}f}"
    return f"{v.mean():.{d}f} ± {v.std(ddof=1):.{d}f} ({len(v)})"


def _count(n: Any) -> str:
    if n is None:
        return "?"
    n = int(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _cell(c: dict[str, Any]) -> str:
    if not c.get("n"):
        return ""
    if c["n"] < 2:
        return f"{c['mean_pp']:+.2f} (n=1)"
    mark = "**" if abs(c["mean_pp"]) >= 2 * c["sem_pp"] else ""
    return f"{mark}{c['mean_pp']:+.2f} ± {c['sem_pp']:.2f}{mark}"


STYLE = {"fps": ("tab:blue", "-", 2.4), "fps-plain": ("tab:blue", ":", 1.4), "random": ("tab:purple", "-", 2.4),
         "lora": ("tab:green", "-", 2.4), "magnitude": ("tab:gray", "-", 1.2), "act-sample": ("tab:brown", "-", 1.2),
         "gps": ("tab:red", "-", 1.2)}


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = list(doc["experiments"])
    if not exps:
        return
    cost = doc.get("cost") or {}
    n = len(exps) + (1 if cost else 0)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.8), squeeze=False)
    for ax, name in zip(axes[0], exps):
        sec = doc["experiments"][name]
        causal = any("ppl" in r["metrics"]["test"] for r in sec["runs"] if "test" in r["metrics"])
        series: dict[str, list[tuple[float, float, float]]] = {}
        for key, c in sec["cells"].items():
            if "@" not in key or not c["values"]:
                continue
            m, _ = key.split("@")
            x = float(np.mean([t for t in c["trainable"] if t]))
            series.setdefault(m, []).append((x, float(np.mean(c["values"])),
                                             float(np.std(c["values"], ddof=1)) if len(c["values"]) > 1 else 0.0))
        for m in [x for x in METHODS if x in series]:
            pts = sorted(series[m])
            color, ls, lw = STYLE.get(m, (None, "-", 1.2))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                        capsize=2, lw=lw, ls=ls, color=color, label=LABELS.get(m, m))
        for i, ref in enumerate(REFS):
            c = sec["cells"].get(ref)
            if c and c["values"]:
                ax.axhline(float(np.mean(c["values"])), color="k", ls=(":", "--", "-.")[i], lw=1,
                           label=f"{LABELS[ref]}")
        ax.set_xscale("log")
        if causal:
            ax.set_yscale("log")
        ax.set_xlabel("trainable values (selection or LoRA, + head)")
        ax.set_ylabel("test perplexity (lower is better)" if causal else "test accuracy %")
        ax.set_title(("PARTIAL: " if doc.get("partial") else "") + name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if cost:
        ax = axes[0][-1]
        tasks = list(cost)
        ms = [m for m in METHODS if any(m in cost[t] for t in tasks)]
        w = 0.8 / max(1, len(tasks))
        for j, t in enumerate(tasks):
            ys = [cost[t].get(m, {}).get("s_per_step") or 0 for m in ms]
            ax.bar(np.arange(len(ms)) + j * w, ys, w, label=f"{t.replace('-cost', '')}: s/step")
            for i, m in enumerate(ms):
                mem = cost[t].get(m, {}).get("peak_rss_mb")
                if mem:
                    ax.text(i + j * w, ys[i], f"{mem / 1024:.1f}G", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(np.arange(len(ms)) + w * (len(tasks) - 1) / 2)
        ax.set_xticklabels(ms, rotation=40, fontsize=7)
        ax.set_ylabel("seconds per training step (1 thread); label: peak RSS")
        ax.set_title("cost, each method alone", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def budgeted(method: str) -> bool:
    return method in SPARSE or method == "lora"


def sweep_lrs(method: str) -> tuple[float, ...]:
    return LRS[lr_family(method)]


def beyond(grid: tuple[float, ...], best: float) -> float | None:
    """The next rate past the edge of a sweep when the edge won (one step of the grid's own ratio), else None."""
    if best == grid[0]:
        return grid[0] * grid[0] / grid[1]
    if best == grid[-1]:
        return grid[-1] * grid[-1] / grid[-2]
    return None


def sweep(p: "Prepared", methods: list[str], runs_file: Path, jobs: int) -> dict[str, float]:
    """Seed 0, middle budget: every method at each rate of its grid, plus one step past an edge that wins; the rate
    with the best validation score per method."""
    model, task = Path(p.folder).name, p.task
    lines = [spec_line(p, m, SWEEP_BUDGET if budgeted(m) else None, 0, lr) for i in range(3) for m in methods
             for lr in sweep_lrs(m)[i:i + 1]]
    log(f"[{model}/{task}] learning-rate sweep: {len(lines)} runs")
    best = best_lrs(run_grid(lines, runs_file, jobs), model, task, budget_label(SWEEP_BUDGET))
    more = [spec_line(p, m, SWEEP_BUDGET if budgeted(m) else None, 0, x) for m in methods
            if m in best and m in EDGE_METHODS and (x := beyond(sweep_lrs(m), best[m])) is not None]
    more = [x for x in more if x["spec"]["kind"] != "none"]
    if more:
        log(f"[{model}/{task}] past the edge: {len(more)} runs")
        best = best_lrs(run_grid(more, runs_file, jobs), model, task, budget_label(SWEEP_BUDGET))
    return best


def grid_lines(p: "Prepared", methods: list[str], budgets: tuple[float, ...], seeds: int,
               lrs: dict[str, float]) -> list[dict]:
    """The main grid, interleaved: per seed, per budget, every method (references once per seed)."""
    lines = []
    middle = budgets[len(budgets) // 2]
    for seed in range(seeds):
        for b in budgets:
            for m in methods:
                if b not in (runs_at(p.task, m, budgets) or (middle,)):
                    continue       # references do not depend on the budget; some methods run at the middle one
                lr = lrs.get(m, lrs.get("none", sweep_lrs(m)[1]))
                line = spec_line(p, m, b if budgeted(m) else None, seed, lr)
                # validation only where rates are chosen (the sweep's point); test everywhere
                line["splits"] = ["val", "test"] if seed == 0 and b == middle else ["test"]
                lines.append(line)
    return lines


def cost_lines(p: "Prepared", methods: list[str], steps: int, reps: int, lrs: dict[str, float]) -> list[dict]:
    """Each method for a few steps (one epoch of steps x batch samples), no evaluation, repeated reps times in
    interleaved order; run one at a time."""
    out = []
    for rep in range(reps):
        for m in methods:
            line = spec_line(p, m, SWEEP_BUDGET if budgeted(m) else None, rep,
                             lrs.get(m, sweep_lrs(m)[1]))
            if line["spec"]["kind"] == "none":
                continue
            line["task"].update(epochs=1, max_train=steps * line["task"]["batch_size"])
            line["task"]["name"] += "-cost"
            line["splits"] = []
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one model, one task, one seed, the middle budget, "
                                                         "no sweep (the full study's rates where it has them)")
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--tasks", default="trec,shakespeare")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cost", action="store_true", help="only the cost measurement: each method a few steps alone, "
                                                        "one at a time, interleaved (-> *_cost.runs.jsonl)")
    ap.add_argument("--cost-steps", type=int, default=6)
    ap.add_argument("--cost-reps", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only rebuild the report from the runs file")
    args = ap.parse_args(argv)
    stem = RESULTS / ("quality_lm_quick" if args.quick else "quality_lm")
    runs_file = stem.with_suffix(".runs.jsonl")
    cost_file = RESULTS / "quality_lm_cost.runs.jsonl"
    models = args.models.split(",")
    tasks = (["trec"] if args.quick and args.tasks == ap.get_default("tasks") else args.tasks.split(","))
    methods = args.methods.split(",")
    budgets = (SWEEP_BUDGET,) if args.quick else BUDGETS
    seeds = 1 if args.quick else args.seeds
    plan: dict[str, Any] = {"quick": args.quick, "models": models, "tasks": tasks, "methods": methods,
                            "budgets": budgets, "seeds": seeds, "sweep_budget": SWEEP_BUDGET, "lrs": {},
                            "sweep_grids": {m: sweep_lrs(m) for m in methods}, "tasks_config": TASKS,
                            "study": {t: {k: list(v) for k, v in STUDY[t].items()} for t in tasks if t in STUDY},
                            "edge_methods": list(EDGE_METHODS)}
    plan_file = stem.with_suffix(".plan.json")
    if plan_file.is_file():
        plan["lrs"] = json.loads(plan_file.read_text()).get("lrs", {})
    plan["expected_runs"] = {}
    if args.report:
        report(read_runs(runs_file), stem, plan, read_runs(cost_file))
        return 0
    for model in models:
        for task in tasks:
            p = Prepared(model, task)
            key = f"{model}/{task}"
            if args.cost:
                lrs = plan["lrs"].get(key, {})
                lines = cost_lines(p, task_methods(plan, task), args.cost_steps, args.cost_reps, lrs)
                log(f"[{key}] cost: {len(lines)} runs, one at a time")
                run_grid(lines, cost_file, 1)
                continue
            if key not in plan["lrs"]:
                if args.quick:      # quick mode reuses the full study's choice where it exists
                    full_plan = RESULTS / "quality_lm.plan.json"
                    if full_plan.is_file():
                        plan["lrs"][key] = json.loads(full_plan.read_text()).get("lrs", {}).get(key, {})
                if args.quick and not plan["lrs"].get(key):   # no sweep in quick mode: the grids' middle rates
                    plan["lrs"][key] = {m: sweep_lrs(m)[1] for m in methods}
            chosen = plan["lrs"].setdefault(key, {})
            unswept = [m for m in task_methods(plan, task)        # a method added to STUDY later gets its own sweep
                       if m not in chosen and not (m == "head" and "none" in chosen)]
            if unswept and not args.quick:
                best = sweep(p, unswept, runs_file, args.jobs)
                chosen.update({m: lr for m, lr in best.items() if m in unswept or m == "none"})
            if unswept or not plan_file.is_file():
                plan_file.write_text(json.dumps({**plan, "meta": meta()}, indent=1, default=str) + "\n")
            lines = grid_lines(p, task_methods(plan, task), budgets, seeds, plan["lrs"][key])
            log(f"[{key}] {len(lines)} runs")
            run_grid(lines, runs_file, args.jobs)
            report(read_runs(runs_file), stem, plan, read_runs(cost_file))
    report(read_runs(runs_file), stem, plan, read_runs(cost_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
