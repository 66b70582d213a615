"""Training memory and time per step on a ~300M-parameter decoder: FPS sparse delta vs full fine-tuning vs LoRA.

    flock /tmp/fps-bigmem.lock flock /tmp/fps-bench.lock python -m bench.train_memory          # ~15 min, 2 cores
    python -m bench.train_memory --quick                                                          # tiny, seconds

A random Llama-architecture decoder (fp32, tied embeddings; the default ~290M parameters), sequence length 256,
batch 4, next-token loss, AdamW. Each method runs in a fresh process (so peaks do not mix): build the model, set up
the method, one warm-up step, then timed steps. Peak memory is the process's VmHWM over the training steps (reset
with /proc/self/clear_refs after setup), next to the RSS after setup (weights + trainable state allocated so far).

Methods, at a similar number of trainable values:
* ``fps``: fps-graph ``attach`` with K entries per output row on every Linear of the blocks (q, k, v, o, gate, up,
  down), K chosen so that K * sum(out) ~ LoRA's r * sum(in + out). Positions are random (seeded): memory and
  time do not depend on which entries are selected, only on how many.
* ``fps-keep``: the same, but autograd keeps each materialised ``W + scatter(delta)`` until its backward (the
  behaviour before ``fps_graph/training/recompute.py``, which rebuilds it in the backward pass instead).
* ``fps-ckpt``: the same with gradient checkpointing.
* ``lora``: PEFT LoRA rank r on the same Linear layers.
* ``full``: every parameter trains.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from bench.meta import RunMeta

METHODS = ("fps", "fps-keep", "fps-ckpt", "lora", "full")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULTS = Path(__file__).resolve().parent / "results"


def config(quick: bool) -> dict:
    """The decoder's shape: ~290M parameters (fp32 1.16 GB), or a tiny one for --quick."""
    if quick:
        return dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
    return dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                tie_word_embeddings=True)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(method: str, args: argparse.Namespace) -> dict:
    """One method in this process: set up, warm up, time `steps` steps; memory and time per step."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(**config(args.quick), use_cache=False))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)]
    lora_values = args.rank * sum(m.in_features + m.out_features for _, m in linears)
    k = max(1, round(lora_values / sum(m.out_features for _, m in linears)))
    extra: dict = {}
    if method.startswith("fps"):
        from fps_graph.training.sparse import attach

        rng = np.random.default_rng(0)
        masks = {}
        for name, m in linears:     # K random columns per output row, as flat indices (positions don't matter)
            cols = np.argsort(rng.random((m.out_features, m.in_features)), axis=1)[:, :k]
            masks[f"{name}.weight"] = np.sort((np.arange(m.out_features)[:, None] * m.in_features + cols).ravel())
        handle = attach(model, masks)
        params = handle.trainable_parameters()
        extra["k_per_row"] = k
        if method == "fps-keep":
            for d in handle.deltas.values():
                d.rebuilder = None
        if method == "fps-ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(TARGETS),
                                                 lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
        extra["rank"] = args.rank
    else:
        params = list(model.parameters())
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, model.config.vocab_size, (args.batch, args.seq)))
    setup_s = time.perf_counter() - t0
    rss_setup = _status_mb("VmRSS")
    _reset_peak()
    times, losses = [], []
    for step in range(args.steps + 1):
        ts = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:                       # step 0 is the warm-up (allocates optimiser state)
            times.append(time.perf_counter() - ts)
        losses.append(float(loss))
    return {"method": method, "params": n_params, "trainable": trainable, "trainable_fraction": trainable / n_params,
            "rss_after_setup_mb": round(rss_setup, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1),
            "step_seconds": [round(t, 3) for t in times], "step_median_s": round(statistics.median(times), 3),
            "setup_seconds": round(setup_s, 1), "losses": [round(x, 4) for x in losses],
            "threads": torch.get_num_threads(), **extra}


def _machine() -> dict:
    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "ram_gb": round(ram, 1), "python": platform.python_version(),
            "torch": torch.__version__, "load_before": os.getloadavg()}


def markdown(res: dict) -> str:
    rows = {r["method"]: r for r in res["runs"]}
    full = rows.get("full")
    names = {"fps": "FPS delta (fps-graph attach)", "fps-keep": "FPS delta, W + delta kept for backward",
             "fps-ckpt": "FPS delta + gradient checkpointing",
             "lora": f"PEFT LoRA r={res['settings']['rank']}", "full": "full fine-tuning"}
    s, m = res["settings"], res["machine"]
    lines = [f"# Training memory: {res['params'] / 1e6:.0f}M-parameter decoder, seq {s['seq']}, batch {s['batch']}",
             "", f"Command: `{res['command']}`  ",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['ram_gb']} GB RAM; torch {m['torch']}; "
             f"load average before {m['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} (other work shares "
             "these cores: times are indicative)"] + ([f"Note: {res['note']}"] if res.get("note") else []) + ["",
             "| method | trainable values | peak RSS (MB) | RSS after setup (MB) | peak vs full | s / step | "
             "time vs full |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key in METHODS:
        r = rows.get(key)
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {names[key]} | - | - | - | - | - | failed: {r['error'][:80]} |")
            continue
        pk = f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x" if full and "error" not in full else "-"
        tm = f"{r['step_median_s'] / full['step_median_s']:.2f}x" if full and "error" not in full else "-"
        lines.append(f"| {names[key]} | {r['trainable']:,} ({100 * r['trainable_fraction']:.2f}%) | "
                     f"{r['peak_rss_mb']:,.0f} | {r['rss_after_setup_mb']:,.0f} | {pk} | {r['step_median_s']:.2f} | "
                     f"{tm} |")
    lines += ["", "Peak RSS: the process's high-water mark over the warm-up and timed steps (weights, gradients, "
              "optimiser state, activations). s / step: median of the timed steps after one warm-up step."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in res["runs"] if "error" not in r]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    names = [r["method"] for r in runs]
    ax1.bar(names, [r["peak_rss_mb"] / 1024 for r in runs], color="#1f77b4", label="peak")
    ax1.bar(names, [r["rss_after_setup_mb"] / 1024 for r in runs], color="#9ecae1", label="after setup")
    ax1.set_ylabel("GB (RSS)")
    ax1.legend()
    ax2.bar(names, [r["step_median_s"] for r in runs], color="#ff7f0e")
    ax2.set_ylabel("seconds per step")
    if res.get("note"):
        ax2.set_title("indicative only (see note)", fontsize=9)
    s = res["settings"]
    fig.suptitle(f"Training a {res['params'] / 1e6:.0f}M decoder (fp32, seq {s['seq']}, batch {s['batch']}, CPU)")
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=METHODS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default=None)
    ap.add_argument("--note", default="", help="A sentence for the Markdown report (how the run was made).")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    meta = RunMeta()
    t0 = time.perf_counter()
    base = [sys.executable, "-m", "bench.train_memory", "--seq", str(args.seq), "--batch", str(args.batch),
            "--steps", str(args.steps), "--rank", str(args.rank)] + (["--quick"] if args.quick else [])
    res = {"name": args.name or ("train_memory_quick" if args.quick else "train_memory"),
           "command": "python -m bench.train_memory " + " ".join(sys.argv[1:]), "machine": _machine(),
           "note": args.note, "settings": {"seq": args.seq, "batch": args.batch, "steps": args.steps, "rank": args.rank,
                        "config": config(args.quick), "optimizer": "AdamW", "dtype": "float32"}, "runs": []}
    for method in args.methods.split(","):
        print(f"{method} ...", file=sys.stderr, flush=True)
        p = subprocess.run(base + ["--worker", method], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent)
        if p.returncode != 0:
            res["runs"].append({"method": method, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            res["runs"].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(res["runs"][-1]), file=sys.stderr, flush=True)
        _write(res, t0, meta)      # after every method: a cut-short run keeps what it measured
    print(markdown(res))


def _write(res: dict, t0: float, meta: RunMeta) -> None:
    """bench/results/<name>.{json,md,png} from the runs so far."""
    ok = [r for r in res["runs"] if "error" not in r]
    res["params"] = ok[0]["params"] if ok else 0
    res["load_after"] = os.getloadavg()
    res["bench_seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / res["name"]
    res["meta"] = meta.finish()
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    if ok:
        plot(res, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
