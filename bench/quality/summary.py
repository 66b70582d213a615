"""Paired comparisons of the selection methods from the experiments' JSON files, split by granularity.

    python -m bench.quality.summary

Reads bench/results/quality_crepe.json and quality_vision.json (whichever exist) and writes
bench/results/quality_summary.{md,json}: for each pair of methods, the mean difference (percentage points) over
every (point, seed) pair both ran, its standard error, and the share of pairs where the first is at least as good,
separately for the top-K-per-neuron points and the layer-budget points.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality.common import LABELS, RESULTS, write_json

PAIRS = (("fps", "gps"), ("fps", "random"), ("fps", "magnitude"), ("gps", "random"), ("gd-fps", "fps"),
         ("wanda", "fps"), ("gps", "magnitude"))
EXPERIMENTS = (("quality_crepe", ("rpa_noisy", "rpa_brown")), ("quality_vision", ("acc",)))


def paired(runs: list[dict[str, Any]], a: str, b: str, metric: str, model: str, points: list[str]) -> dict[str, Any]:
    idx = {(r["method"], r["point"], r["seed"]): r["metrics"][metric] for r in runs if r.get("model", "") == model}
    d = np.array([idx[(a, p, s)] - idx[(b, p, s)] for (m, p, s) in idx
                  if m == a and p in points and (b, p, s) in idx]) * 100
    if d.size == 0:
        return {"n": 0}
    sem = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"n": int(d.size), "mean_pp": float(d.mean()), "sem_pp": sem, "share_a_ge_b": float(np.mean(d >= 0))}


def main() -> int:
    out: dict[str, Any] = {}
    md = ["# Selection quality: paired differences by granularity", "",
          "Mean difference in percentage points (first method minus second) over every (point, seed) pair, ± its "
          "standard error, and in brackets the share of pairs where the first method is at least as good. "
          "'K': top-K per output neuron (K = 1, 2, 4); 'layer': budgets per tensor (1% and 4% of the scored "
          "weights). |mean| < 2 sem is within noise.", ""]
    for stem, metrics in EXPERIMENTS:
        path = RESULTS / f"{stem}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        runs = doc["runs"]
        groups = {"K": [p["label"] for p in doc["points"] if p["k"] is not None],
                  "layer": [p["label"] for p in doc["points"] if p["k"] is None]}
        for model in sorted({r.get("model", "") for r in runs}):
            for metric in metrics:
                title = f"{stem.replace('quality_', '')}{' ' + model if model else ''}, {metric}"
                rec = {f"{a}-{b}": {g: paired(runs, a, b, metric, model, pts) for g, pts in groups.items() if pts}
                       for a, b in PAIRS}
                out[title] = rec
                md += [f"## {title}", "", "| pair | " + " | ".join(g for g, p in groups.items() if p) + " |",
                       "| --- |" + " --- |" * sum(1 for p in groups.values() if p)]
                for pair, cells in rec.items():
                    a, b = pair.split("-", 1) if not pair.startswith("gd-fps") else ("gd-fps", pair[len("gd-fps-"):])
                    txt = [f"{c['mean_pp']:+.2f} ± {c['sem_pp']:.2f} ({c['share_a_ge_b']:.2f}, n={c['n']})"
                           if c.get("n") else "" for c in cells.values()]
                    md.append(f"| {LABELS.get(a, a)} - {LABELS.get(b, b)} | " + " | ".join(txt) + " |")
                md.append("")
    write_json(RESULTS / "quality_summary.json", out)
    (RESULTS / "quality_summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
