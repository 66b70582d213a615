"""The "never harmful" experiment of issue 16: FPS's collapse at a random-suiting learning rate, and the candidates.

    python -m bench.quality_lm.assets                # models and splits first
    python -m bench.quality_lm.repro                 # selections, the runs (resumable), the report
    python -m bench.quality_lm.repro --report        # the report again from the runs files

SmolLM2-135M; selections at a 0.5% per-layer budget of the 210 block Linear weights (530,842 entries; the LM head /
tied embedding is not selected), by ``fps-graph select`` with statistics of the task's training texts. Methods:
``fps`` (plain, every entry at the learning rate), ``fps-scaled`` (the same masks, each delta reparametrised as
``c_i * theta_i`` with ``c_i = median_j E|x_j| / E|x_col(i)|``: candidate (a); the library's default step scale
clips c at 1, which changes 2% of FPS's entries here), ``fps-cover`` (coverage rule, candidate (c)), ``act-sample``
and ``random`` (other scores, candidate (d)), and the floors: the seq-cls head alone, or the pretrained model
(causal-lm). ``fps-lib``: the product's default after issue 16 (select writes each entry's input statistic into
the masks file, ``attach`` applies ``c = min(1, median / statistic)``), run through the one training loop. Tasks, kept small for 2 shared cores: TREC (6 classes) from the first 320 training questions x 2
epochs, batch 16 (40 AdamW steps, warm-up 0.3 epoch, cosine), scored on the 200 validation questions;
tiny-shakespeare from 192 training chunks x 2 epochs, batch 16 (24 steps), scored by loss per token on 100
validation chunks. Seeds: 0 everywhere, 1 for TREC at lr 1e-2. Every run in its own process, one thread.

Writes bench/results/quality_lm_repro.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality_lm import assets
from fps_graph.compare.report import RunMeta

WORK = assets.CACHE / "work"
TREC_DIR, LM_DIR = WORK / "repro", WORK / "repro_lm"
RUNS = (TREC_DIR / "runs1.jsonl", TREC_DIR / "runs_lm.jsonl", TREC_DIR / "runs_lib.jsonl")
MODEL = "smollm2-135m"
STEM = assets.RESULTS / "quality_lm_repro"
COLORS = {"fps": "tab:blue", "fps-scaled": "tab:orange", "fps-lib": "tab:green", "fps-cover": "tab:red",
          "random": "tab:purple", "act-sample": "tab:brown", "head": "k", "none": "k"}
LABEL = {"fps": "fps (plain)", "fps-scaled": "fps + input step scale", "fps-lib": "fps, library default (train)", "fps-cover": "fps-cover", "random": "random",
         "act-sample": "act-sample", "head": "head only", "none": "pretrained (no training)"}


def _select(onnx: Path, out: Path, score: str, stats: Path, data: Path | None = None, seed: int = 0,
            max_length: int = 64) -> None:
    if out.is_file():
        return
    cmd = [sys.executable, "-m", "fps_graph_cli.main", "select", str(onnx), "--score", score, "--budget", "0.5%",
           "--granularity", "layer", "--seed", str(seed), "-o", str(out), "-q", "--force"]
    if data is not None:
        cmd[4:4] = [str(data)]
        cmd += ["--stats-out", str(stats), "--max-length", str(max_length)]
    else:
        cmd += ["--stats-in", str(stats)]
    subprocess.run(cmd, check=True)


def specs() -> list[dict[str, Any]]:
    """The runs, in the order they were run (the most telling first)."""
    from bench.quality_lm.export import export_body

    onnx = export_body(assets.model_dir(MODEL), assets.CACHE / "onnx" / MODEL)
    TREC_DIR.mkdir(parents=True, exist_ok=True)
    LM_DIR.mkdir(parents=True, exist_ok=True)
    d = assets.task_dir("trec")
    _select(onnx, TREC_DIR / "masks_fps.safetensors", "fps", TREC_DIR / "stats_trec.safetensors", d / "train.jsonl")
    for score, seed, name in (("random", 0, "random"), ("random", 1, "random_s1"), ("act-sample", 0, "act-sample"),
                              ("fps-cover", 0, "fps-cover"), ("fps", 0, "fps-lib")):
        _select(onnx, TREC_DIR / f"masks_{name}.safetensors", score, TREC_DIR / "stats_trec.safetensors", seed=seed)
    lm = assets.task_dir("shakespeare")
    for split, n in (("train", 192), ("val", 100)):
        path = LM_DIR / f"{split}{n}.jsonl"
        if not path.is_file():
            path.write_text("".join((lm / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]))
    _select(onnx, LM_DIR / "masks_fps.safetensors", "fps", LM_DIR / "stats.safetensors", LM_DIR / "train192.jsonl",
            max_length=96)
    for score in ("random", "fps-cover"):
        _select(onnx, LM_DIR / f"masks_{score}.safetensors", score, LM_DIR / "stats.safetensors")
    model = str(assets.model_dir(MODEL))
    trec = dict(name="trec", kind="seq-cls", train=str(d / "train.jsonl"), val=str(d / "val.jsonl"),
                test=str(d / "test.jsonl"), max_length=64, epochs=2, batch_size=16, max_train=320)
    shak = dict(name="shakespeare", kind="causal-lm", train=str(LM_DIR / "train192.jsonl"),
                val=str(LM_DIR / "val100.jsonl"), test=str(LM_DIR / "val100.jsonl"), max_length=96, epochs=2,
                batch_size=16, max_train=192)

    def sp(task: dict, work: Path, stats: str, method: str, lr: float, seed: int = 0, masks: str | None = None):
        kind = {"head": "head", "none": "none"}.get(method, "sparse")
        s: dict[str, Any] = {"method": method, "kind": kind, "lr": lr, "seed": seed}
        if kind == "sparse":
            s["masks"] = str(work / f"masks_{masks or method}.safetensors")
            if method == "fps-scaled":
                s.update(masks=str(work / "masks_fps.safetensors"), scale="input", stats=str(work / stats))
        return {"model": model, "task": task, "spec": s, "splits": ["val"]}

    t = lambda *a, **k: sp(trec, TREC_DIR, "stats_trec.safetensors", *a, **k)   # noqa: E731
    s_ = lambda *a, **k: sp(shak, LM_DIR, "stats.safetensors", *a, **k)         # noqa: E731
    trec_runs = [t("fps", 1e-2), t("random", 1e-2), t("fps-scaled", 1e-2), t("head", 1e-2), t("fps", 1e-3),
                 t("random", 1e-3), t("fps-scaled", 1e-3), t("act-sample", 1e-2), t("fps-cover", 1e-2),
                 t("head", 1e-3), t("fps-scaled", 3e-2), t("random", 3e-2)]
    trec_runs += [t(m, 1e-2, seed=1, masks="random_s1" if m == "random" else None)
                  for m in ("fps-scaled", "random", "fps", "fps-cover", "head")]
    trec_runs += [t("fps-lib", lr, seed=seed) for seed, lr in ((0, 1e-2), (1, 1e-2), (0, 3e-2))]
    lm_runs = [s_("fps", 1e-2), s_("random", 1e-2), s_("fps-scaled", 1e-2), s_("none", 0.0), s_("fps", 1e-3),
               s_("random", 1e-3), s_("fps-scaled", 1e-3), s_("fps-cover", 1e-2)]
    return trec_runs + lm_runs


def read() -> list[dict[str, Any]]:
    out = []
    for f in RUNS:
        if f.is_file():
            out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return [r for r in out if "metrics" in r]


def report(runs: list[dict[str, Any]]) -> None:
    meta = RunMeta(threads=int(os.environ.get("GRID_THREADS", "1"))).finish()
    doc: dict[str, Any] = {"meta": meta, "runs": runs, "tables": {}}
    lines = ["# Issue 16: FPS's learning-rate collapse on SmolLM2-135M, and the candidate fixes", "",
             f"Generated by `python -m bench.quality_lm.repro` (bench/quality_lm/repro.py says how the runs were "
             f"made); commit {(meta['git']['commit'] or '?')[:10]}; 2-core machine shared with other jobs "
             f"(load average at report {tuple(round(x, 1) for x in meta['load_after'])}): times are "
             "under load. Validation scores; seed 0 unless noted.", ""]
    for task, unit in (("trec", "accuracy %"), ("shakespeare", "loss per token (lower is better)")):
        rs = [r for r in runs if r["task"] == task]
        if not rs:
            continue
        lrs = sorted({r["lr"] for r in rs if r["kind"] != "none"})
        methods = [m for m in LABEL if any(r["method"] == m for r in rs)]
        lines += [f"## {task}: validation {unit}", "", "| method | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
                  "|" + " --- |" * (len(lrs) + 1)]
        tab: dict[str, Any] = {}
        for m in methods:
            cells = []
            for lr in lrs:
                v = [r for r in rs if r["method"] == m and (r["lr"] == lr or r["kind"] == "none")]
                vals = [_v(r) for r in sorted(v, key=lambda r: r["seed"])]
                tab[f"{m}@{lr:g}"] = vals
                cells.append(" / ".join(_fmt(x, task) for x in vals) + (" (seeds 0 / 1)" if len(vals) > 1 else ""))
            lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
        doc["tables"][task] = tab
        steps = [r.get("seconds_per_step") for r in rs if r.get("seconds_per_step")]
        if steps:
            lines += ["", f"Seconds per step (median over runs, under load): {np.median(steps):.1f}; peak RSS "
                          f"{np.median([r['memory']['peak_rss_mb'] for r in rs if r.get('memory')]):.0f} MB.", ""]
    STEM.parent.mkdir(parents=True, exist_ok=True)
    STEM.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    STEM.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(doc)


def _v(r: dict[str, Any]) -> float:
    m = r["metrics"]["val"]
    return float(m["loss"]) if "ppl" in m else 100.0 * float(m["acc"])


def _fmt(x: float, task: str) -> str:
    return f"{x:.3f}" if task == "shakespeare" else f"{x:.1f}"


def _plot(doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("trec", "shakespeare") if t in doc["tables"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        tab = doc["tables"][task]
        for m in LABEL:
            pts = sorted((float(k.split("@")[1]), float(np.mean(v))) for k, v in tab.items()
                         if k.split("@")[0] == m and v)
            if not pts:
                continue
            if m in ("head", "none") and len({p[1] for p in pts}) == 1 and m == "none":
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=LABEL[m])
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2.2 if m.startswith("fps") else 1.2,
                    ls={"head": ":", "fps-lib": "--"}.get(m, "-"), color=COLORS[m], label=LABEL[m])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (AdamW)")
        ax.set_ylabel("validation accuracy %" if task == "trec" else "validation loss per token")
        ax.set_title(f"SmolLM2-135M, {task}, 0.5% per layer", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(STEM.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.report:
        lines = specs()
        trec = [x for x in lines if x["task"]["name"] == "trec"]
        lm = [x for x in lines if x["task"]["name"] != "trec"]
        lib = [x for x in trec if x["spec"]["method"] == "fps-lib"]
        trec = [x for x in trec if x["spec"]["method"] != "fps-lib"]
        for group, out in ((trec, RUNS[0]), (lm, RUNS[1]), (lib, RUNS[2])):
            f = out.with_suffix(".specs.jsonl")
            f.write_text("".join(json.dumps(x) + "\n" for x in group))
            subprocess.run([sys.executable, "-m", "bench.quality_lm.grid", str(f), str(out), "--jobs",
                            str(args.jobs)], check=True)
    report(read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
