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
from fps_graph.compare.report import RunMeta, budget_label, report as compare_report, score

RESULTS = assets.RESULTS
SELECT_SCORES = ("fps", "random", "magnitude", "act-sample", "fps-cover")
SPARSE = SELECT_SCORES + ("gps",)
METHODS = ("fps", "random", "magnitude", "act-sample", "gps", "lora", "full", "head")
BUDGETS = (0.0005, 0.005, 0.01)
LRS = {   # swept on seed 0 at the middle budget; the best on validation is frozen
    "sparse": (3e-4, 1e-3, 1e-2),
    "lora": (3e-4, 1e-3, 1e-2),
    "full": (1e-5, 3e-5, 1e-4),
    "head": (1e-3, 1e-2),
}
TASKS = {
    "trec": dict(kind="seq-cls", max_length=64, epochs=2, batch_size=16, max_train=320),
    "sms": dict(kind="seq-cls", max_length=96, epochs=2, batch_size=16, max_train=320),
    "shakespeare": dict(kind="causal-lm", max_length=96, epochs=2, batch_size=16, max_train=320),
}


def log(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def lr_family(method: str) -> str:
    return "sparse" if method in SPARSE else method if method in LRS else "sparse"


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
            self._select("fps", 0.005, self.work / "masks_fps_probe.safetensors", stats_out=True)

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
        """|sum of the task loss's gradient| over the training split, per block Linear weight (float32)."""
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
        for b in train.batches(task.batch_size, max_samples=cfg.max_samples):
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
        from fps_graph.formats.masks import load_indices, read_metadata
        from fps_graph.integrations.lora_match import match_lora

        m = self.masks("magnitude", budget, 0)       # every selection has these per-layer counts
        idx = load_indices(m)
        shapes = {k: r["shape"] for k, r in read_metadata(m)["tensors"].items()}
        match = match_lora({k: len(v) for k, v in idx.items()}, shapes)
        return {"ranks": match.ranks, "lora_total": match.lora_total, "sparse_total": match.sparse_total,
                "unmatched": list(match.unmatched)}


# ----------------------------------------------------------------------------------------------------- runs


def spec_line(p: Prepared, method: str, budget: float | None, seed: int, lr: float, test: bool = True) -> dict:
    t = p.task_obj()
    task = {k: getattr(t, k) for k in ("name", "kind", "train", "val", "test", "max_length", "epochs", "batch_size",
                                        "max_train")}
    spec: dict[str, Any] = {"method": method, "lr": lr, "seed": seed,
                            "extra": {"budget": budget_label(budget) if budget is not None else "-"}}
    if method in SPARSE:
        spec.update(kind="sparse", masks=str(p.masks(method, budget, seed)))
    elif method == "lora":
        spec.update(kind="lora", lora_ranks=p.lora_ranks(budget)["ranks"])
    elif method == "head" and t.kind == "causal-lm":
        spec.update(kind="none", method="none")
    else:
        spec.update(kind=method)
    return {"model": str(p.folder), "task": task, "spec": spec, "test": test}


def run_grid(lines: list[dict], runs_file: Path, jobs: int) -> list[dict]:
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
    for r in runs:
        if r.get("model") != model or r.get("task") != task or r.get("seed") != 0 or "metrics" not in r:
            continue
        if r["extra"].get("budget") not in (budget, "-"):
            continue
        s = score(r, "val")
        if r["method"] not in best or s > best[r["method"]][0]:
            best[r["method"]] = (s, r["lr"])
    return {m: v[1] for m, v in best.items()}


# --------------------------------------------------------------------------------------------------- report


def report(runs: list[dict], stem: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The study's tables and plot (fps_graph/compare/report.py: the same files `fps-graph compare` writes)."""
    meta = RunMeta(threads=int(os.environ.get("GRID_THREADS", "1"))).finish()
    header = ["# LM study (issue 16): FPS against random, LoRA and full fine-tuning on pretrained decoders", "",
              f"Generated by `python -m bench.quality_lm{' --quick' if plan.get('quick') else ''}` at commit "
              f"{(meta['git']['commit'] or '?')[:10]}; load average at report time "
              f"{tuple(meta['load_after'])} on a 2-core machine shared with other jobs (times are under load). "
              "Score: test accuracy (seq-cls) or test loss per token (causal-lm, lower is better; the tables show "
              "perplexity)."]
    return compare_report(runs, stem, plan, header=header, meta=meta, split="test")


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one model, one task, one seed, the middle budget")
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--tasks", default="trec,shakespeare")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only rebuild the report from the runs file")
    args = ap.parse_args(argv)
    stem = RESULTS / ("quality_lm_quick" if args.quick else "quality_lm")
    runs_file = stem.with_suffix(".runs.jsonl")
    models = args.models.split(",")
    tasks = ["trec"] if args.quick else args.tasks.split(",")
    methods = args.methods.split(",")
    budgets = (0.005,) if args.quick else BUDGETS
    seeds = 1 if args.quick else args.seeds
    plan: dict[str, Any] = {"quick": args.quick, "models": models, "tasks": tasks, "methods": methods,
                            "budgets": budgets, "seeds": seeds, "sweep_budget": 0.005, "lrs": {}}
    plan_file = stem.with_suffix(".plan.json")
    if plan_file.is_file():
        plan["lrs"] = json.loads(plan_file.read_text()).get("lrs", {})
    if args.report:
        report(read_runs(runs_file), stem, plan)
        return 0
    for model in models:
        for task in tasks:
            p = Prepared(model, task)
            key = f"{model}/{task}"
            if key not in plan["lrs"]:
                if args.quick:      # quick mode reuses the full study's choice where it exists
                    full_plan = RESULTS / "quality_lm.plan.json"
                    if full_plan.is_file():
                        plan["lrs"][key] = json.loads(full_plan.read_text()).get("lrs", {}).get(key, {})
                if args.quick and not plan["lrs"].get(key):   # no sweep in quick mode: middle learning rates
                    plan["lrs"][key] = {m: LRS[lr_family(m)][1] for m in methods}
                if not plan["lrs"].get(key):
                    sweep = [spec_line(p, m, 0.005 if m in SPARSE + ("lora",) else None, 0, lr, test=True)
                             for lr_i in range(3) for m in methods
                             for lr in [LRS[lr_family(m)][lr_i]] if lr_i < len(LRS[lr_family(m)])]
                    log(f"[{key}] learning-rate sweep: {len(sweep)} runs")
                    runs = run_grid(sweep, runs_file, args.jobs)
                    plan["lrs"][key] = best_lrs(runs, Path(p.folder).name, task, "0.5%")
                plan_file.write_text(json.dumps(plan, indent=1) + "\n")
            lrs = plan["lrs"][key]
            lines = []
            for seed in range(seeds):
                for b in budgets:
                    for m in methods:
                        if m in ("full", "head") and b != budgets[len(budgets) // 2]:
                            continue       # references do not depend on the budget
                        lines.append(spec_line(p, m, b if m not in ("full", "head") else None, seed,
                                               lrs.get(m, LRS[lr_family(m)][1])))
            log(f"[{key}] {len(lines)} runs")
            run_grid(lines, runs_file, args.jobs)
            report(read_runs(runs_file), stem, plan)
    report(read_runs(runs_file), stem, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
