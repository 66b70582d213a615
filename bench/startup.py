"""CLI start-up: `fps-graph --help`, and the import of onnx (which every command that reads a model needs), with
the share of it that onnx's dependency ml_dtypes takes (``python -X importtime``).

    python -m bench.startup [--reps 5]          # -> bench/results/startup-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.meta import RunMeta

OUT = Path(__file__).resolve().parent / "results"
_SCRIPT = Path(sys.executable).with_name("fps-graph")     # the console script a user runs, else the module
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "fps_graph_cli.main"]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def import_times(module: str) -> dict[str, float]:
    """Cumulative import seconds per top-level package of ``python -X importtime -c 'import MODULE'``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], check=True,
                         capture_output=True, text=True).stderr
    out: dict[str, float] = {}
    for line in err.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[1].isdigit() and "." not in parts[2]:
            out[parts[2]] = int(parts[1]) / 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    meta = RunMeta(threads=1, command="python -m bench.startup " + " ".join(argv if argv is not None else sys.argv[1:]))
    runs = []
    for _ in range(a.reps):       # interleaved
        imp = import_times("onnx")
        runs.append({"help_s": wall(CLI + ["--help"]), "onnx_import_s": imp.get("onnx"),
                     "ml_dtypes_import_s": imp.get("ml_dtypes")})
    med = {k: float(np.median([r[k] for r in runs if r[k] is not None])) for k in runs[0]}
    import ml_dtypes
    import onnx
    res = {"meta": meta.finish(), "runs": runs, "median": med,
           "versions": {"onnx": onnx.__version__, "ml_dtypes": ml_dtypes.__version__}}
    OUT.mkdir(exist_ok=True)
    (OUT / "startup-cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    m = res["meta"]
    md = ["# startup-cpu: CLI start-up", "", f"Command: `{m['command']}`; commit {m['git']['short']}; load "
          f"{m['load_start'][0]:.2f} at start; {a.reps} repetitions, medians.", "",
          "| what | seconds |", "| --- | ---: |",
          f"| `fps-graph --help` (whole process) | {med['help_s']:.2f} |",
          f"| `import onnx` (python -X importtime, cumulative) | {med['onnx_import_s']:.2f} |",
          f"| of which ml_dtypes {ml_dtypes.__version__} | {med['ml_dtypes_import_s']:.2f} |"]
    (OUT / "startup-cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
