"""Run a list of training specs in worker processes (one thread each), one JSON line per finished run.

    python -m bench.quality_lm.grid SPECS.jsonl OUT.jsonl [--jobs 2]

Each line of SPECS.jsonl: {"model": DIR, "task": {Task fields}, "spec": {Spec fields}, "splits": ["val", "test"]}
(the splits scored after training; default both). Runs already
in OUT.jsonl (same model, task, method, lr, seed, budget) are skipped, so a grid can be stopped and resumed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any


def key(line: dict[str, Any]) -> str:
    s = line["spec"]
    return json.dumps([Path(line["model"]).name, line["task"]["name"], s["method"], s["lr"], s["seed"],
                       s.get("extra", {}).get("budget")], sort_keys=True)


def _one(line: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("GRID_THREADS", "1")))
    from bench.quality_lm.harness import Spec, Task, run

    t0 = time.time()
    try:
        rec = run(Path(line["model"]), Task(**line["task"]), Spec(**line["spec"]),
                  splits=tuple(line.get("splits", ("val", "test"))))
    except Exception as exc:   # a failed run is recorded, not fatal to the grid
        rec = {"error": f"{type(exc).__name__}: {exc}"}
    rec["key"] = key(line)
    rec["extra"] = line["spec"].get("extra", {})
    rec["wall_seconds"] = round(time.time() - t0, 1)
    rec["load_after"] = os.getloadavg()
    return rec


def _own_session() -> None:
    """Each worker in its own session, so the kernel's autogroup scheduler gives it a normal-priority share
    (with autogroups, all processes of one session share one group's share, whatever their nice values)."""
    try:
        os.setsid()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs")
    ap.add_argument("out")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    lines = [json.loads(x) for x in Path(args.specs).read_text().splitlines() if x.strip()]
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {json.loads(x).get("key") for x in out.read_text().splitlines() if x.strip()}
    todo = [ln for ln in lines if key(ln) not in done]
    print(f"{len(todo)} of {len(lines)} runs to do", flush=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_own_session, maxtasksperchild=1) as pool:
        for rec in pool.imap_unordered(_one, todo):
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            m = rec.get("metrics", {})
            print(time.strftime("%H:%M:%S"), rec.get("method"), rec.get("lr"), rec.get("seed"),
                  {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in m.items()}, rec.get("error", ""),
                  f"{rec.get('seconds_per_step')} s/step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
