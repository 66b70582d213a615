"""`fps-graph compare` on the LM study's assets, as a user would run it: how long it takes on this machine.

    python -m bench.quality_lm.assets        # first: SmolLM2-135M and the TREC splits under /work/cache/quality_lm
    python -m bench.compare_run              # -> bench/results/compare_smollm2_trec.{json,md,png}

Runs the documented command (the default methods and learning rates) on SmolLM2-135M with 200 TREC training
questions, one epoch, two seeds, scored on the 200 validation questions, into a scratch folder, and copies its
compare.{json,md,png} to bench/results. compare.json's ``meta`` holds the git commit, machine, threads, the load
before and after and the wall time; the per-run records hold the seconds per step, evaluation seconds and load.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.quality_lm import assets

OUT = assets.RESULTS / "compare_smollm2_trec"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-samples", default="200")
    ap.add_argument("--seeds", default="2")
    ap.add_argument("--epochs", default="1")
    args = ap.parse_args(argv)
    data = assets.task_dir("trec")
    with tempfile.TemporaryDirectory(dir=assets.CACHE) as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fps_graph_cli.main", "compare", f"hf:{assets.model_dir('smollm2-135m')}",
               "--train", str(data / "train.jsonl"), "--val", str(data / "val.jsonl"), "--task", "seq-cls",
               "--max-samples", args.max_samples, "--seeds", args.seeds, "--epochs", args.epochs, "-o", str(run)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        for ext in ("json", "md", "png"):
            shutil.copyfile(run / f"compare.{ext}", OUT.with_name(f"{OUT.name}.{ext}"))
    print(f"wrote {OUT}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
