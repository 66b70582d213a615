"""Selecting on an Optimum-style merged decoder (every layer inside an If) against the same decoder unmerged.

The merged file's If holds the no-past and with-past decoders; calibration text takes the no-past branch
(``use_cache_branch`` false). What the If costs: wall time and peak RSS of ``fps-graph select`` on each file, from
the same text, each run in a fresh process, alternating, several repeats; and whether the masks hold the same
bytes. Results: bench/results/control_flow[-quick].{json,md,png}.

    python -m bench.control_flow            # Llama 512 hidden, 8 layers (~ 40M parameters), 128 lines, 3 reps
    python -m bench.control_flow --quick    # 256 hidden, 4 layers, 32 lines, 2 reps
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.meta import RunMeta

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

_CHILD = r"""
import json, sys
from fps_graph.selection.pipeline import SelectOptions, run_select, write_result
r = run_select(sys.argv[1], sys.argv[2], SelectOptions(k=2, batch_size=8))
write_result(r, sys.argv[3], force=True)
print(json.dumps({k: r.summary[k] for k in ("seconds", "calibration_seconds", "peak_rss_mb", "layers", "weights")}))
"""


def build(folder: Path, hidden: int, layers: int, lines: int) -> dict[str, Path]:
    """A perturbed random Llama, its two decoders (Optimum names) and their merge, a tokenizer and a text file."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_control_flow as t   # the test fixture's exporter and merger
    import hf_helpers
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    t.LAYERS, t.KV_HEADS, t.HEAD_DIM = layers, 2, hidden // 8
    t.PAST[:] = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    t.OUTPUTS[:] = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    cfg = LlamaConfig(vocab_size=4000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, use_cache=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    t.VOCAB = 44
    no_past, with_past = t._export_decoders(model, folder)
    merged = t.merge_decoders(no_past, with_past, folder / "decoder_model_merged.onnx")
    hf_helpers.write_tokenizer(folder)
    text = folder / "text.txt"
    text.write_text("\n".join(hf_helpers.cycle_text(lines, seed=0, length=48)) + "\n")
    return {"unmerged": no_past, "merged": merged, "text": text,
            "params": sum(p.numel() for p in model.parameters())}


def run_one(model: Path, text: Path, out: Path) -> dict:
    """One select in a fresh process: its summary (seconds, peak RSS)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(text), str(out)], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_seconds"] = time.perf_counter() - t0
    return rec


def same_masks(a: Path, b: Path) -> bool:
    """The mask tensors of two files hold the same bytes."""
    from safetensors import safe_open

    with safe_open(str(a), "numpy") as fa, safe_open(str(b), "numpy") as fb:
        return sorted(fa.keys()) == sorted(fb.keys()) and all(
            fa.get_tensor(k).tobytes() == fb.get_tensor(k).tobytes() for k in fa.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    meta = RunMeta()
    hidden, layers, lines, reps = (256, 4, 32, 2) if args.quick else (512, 8, 128, 3)
    name = "control_flow-quick" if args.quick else "control_flow"
    with tempfile.TemporaryDirectory(prefix="fpsg_cf_") as tmp:
        folder = Path(tmp)
        files = build(folder, hidden, layers, lines)
        runs: dict[str, list[dict]] = {"unmerged": [], "merged": []}
        for rep in range(reps):
            for which in ("unmerged", "merged"):
                runs[which].append(run_one(files[which], files["text"], folder / f"{which}.safetensors"))
        identical = same_masks(folder / "unmerged.safetensors", folder / "merged.safetensors")
    load = os.getloadavg()

    def med(which: str, key: str) -> float:
        vals = sorted(r[key] for r in runs[which])
        return vals[len(vals) // 2]

    result = {
        "model": f"Llama hidden {hidden}, {layers} layers, {files['params']:,} parameters (random, perturbed)",
        "text_lines": lines, "repeats": reps, "load_avg": load, "cores": os.cpu_count(),
        "masks_identical": identical, "runs": runs,
        "median": {w: {k: med(w, k) for k in ("seconds", "calibration_seconds", "peak_rss_mb")} for w in runs},
    }
    result["ratio_merged_over_unmerged"] = {k: result["median"]["merged"][k] / result["median"]["unmerged"][k]
                                            for k in ("seconds", "calibration_seconds", "peak_rss_mb")}
    result["meta"] = meta.finish()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["median"]
    r = result["ratio_merged_over_unmerged"]
    md = [f"# select on a merged decoder (If) vs the same decoder unmerged", "",
          f"{result['model']}; {lines} text lines; {reps} repeats each, fresh process per run, alternating; "
          f"{result['cores']} CPU cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.", "",
          "| file | select seconds (median) | calibration seconds | peak RSS MB |", "| --- | ---: | ---: | ---: |",
          f"| decoder_model.onnx (unmerged) | {m['unmerged']['seconds']:.2f} | {m['unmerged']['calibration_seconds']:.2f}"
          f" | {m['unmerged']['peak_rss_mb']:.0f} |",
          f"| decoder_model_merged.onnx (If) | {m['merged']['seconds']:.2f} | {m['merged']['calibration_seconds']:.2f}"
          f" | {m['merged']['peak_rss_mb']:.0f} |",
          f"| ratio merged / unmerged | {r['seconds']:.2f}x | {r['calibration_seconds']:.2f}x | "
          f"{r['peak_rss_mb']:.2f}x |", "",
          f"Masks byte-identical: **{identical}**."]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "seconds", "select seconds"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        for i, w in enumerate(("unmerged", "merged")):
            vals = [rr[key] for rr in runs[w]]
            ax.bar(i, m[w][key], color=("tab:blue", "tab:orange")[i])
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks([0, 1], ["unmerged", "merged (If)"])
        ax.set_title(label)
    fig.suptitle(result["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    print("\n".join(md))


if __name__ == "__main__":
    main()
