"""Markdown table and PNG plot from a bench/selection.py results JSON.

    python -m bench.report bench/results/vit-b16-b32-n256-cpu.json     # re-render NAME.md and NAME.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {
    "ours": "fps-graph select (default: micro-batches only where plain inference would need less)",
    "ours-lean": "fps-graph select --max-memory auto (or MB): micro-batches near the floor",
    "ours-whole": "fps-graph select, whole batches (before lean-by-default)",
    "host": "fps-graph select --reduce host",
    "hooks": "PyTorch forward hooks, no_grad (FPS)",
    "gps": "PyTorch forward+backward, top \\|grad\\| (GPS-style)",
    "plain": "ONNX Runtime inference only (floor)",
}
SHORT = {"ours": "ours", "ours-lean": "ours --max-memory", "ours-whole": "ours whole", "host": "host", "hooks": "hooks", "gps": "GPS", "plain": "plain ORT"}
COLORS = {"ours": "#1f77b4", "ours-lean": "#2ca02c", "ours-whole": "#17becf", "host": "#9ecae1", "hooks": "#ff7f0e", "gps": "#d62728", "plain": "#7f7f7f"}


def _cell(s: dict | None, fmt: str = "{:.1f}") -> str:
    if not s or s.get("median") is None:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(res: dict) -> str:
    m, v, st = res["machine"], res["versions"], res["settings"]
    cuda = st["device"] == "cuda"
    lines = [f"# Selection benchmark: `{res['name']}`", "",
             f"Command: `{res['command']}`  ", f"Date: {res['created']}; {res['bench_seconds'] / 60:.1f} min in all",
             "", "| | |", "|---|---|",
             f"| machine | {m.get('cpu', '?')}, {m.get('cpu_count')} cores, {m.get('ram_gb', '?')} GB RAM"
             + (f"; GPU {m.get('gpu')}" if cuda else "") + f"; {m.get('platform')} |",
             "| versions | " + ", ".join(f"{k} {val}" for k, val in v.items()) + f", python {m.get('python')} |",
             *([f"| git | {res['meta']['git']['commit']}" + (" (uncommitted changes)" if res['meta']['git']['dirty']
                                                             else "") + " |"] if res.get("meta") else []),
             f"| settings | device {st['device']}, {st['ort_threads']} (ORT), {st['torch_threads']} (torch); "
             f"top-K = {st['k']} per output neuron; ONNX weights {st['layout']}; {st['reps']} repetitions, each "
             "method in its own fresh process, order rotated every repetition |"]
    for name, info in res["models"].items():
        lines.append(f"| model `{name}` | {info['description']}; {info.get('params', 0) / 1e6:.3g}M parameters; "
                     f"exported with {info['exporter']} |")
    ls, le = res.get("load_start", [0])[0], res.get("load_end", [0])[0]
    loads = [r["load_before"] for r in res["runs"]]
    busy = max(loads) if loads else 0
    lines.append(f"| load average | {ls:.2f} at start, {le:.2f} at end, up to {busy:.2f} before a measurement"
                 + (f" (**shared machine: other jobs ran on the {m.get('cpu_count')} cores; timings are noisy**)"
                    if busy > 0.5 * (m.get("cpu_count") or 1) else "") + " |")
    lines += ["", "Time is from after the imports to the masks written (model load or build, session creation, the "
              "pass over the data, top-K); *CPU* is the user+system CPU time of the process over the same span (all "
              "threads; less sensitive to other jobs on the machine than wall time); *pass* is the pass over the data "
              "alone (samples/s is taken from it). Peak "
              "memory is the process's high-water RSS (`ru_maxrss`); *above baseline* subtracts the RSS after the "
              "imports (torch+transformers ~310 MB, numpy+onnx+onnxruntime ~60 MB)."
              + (" On CUDA, *torch max alloc* is torch.cuda.max_memory_allocated and *device* is the process's "
                 "memory in nvidia-smi (context included)." if cuda else "")
              + " Cells: median (min-max)."]
    configs = [(r["model"], r["batch_size"], r["samples"]) for r in res["ratios"]]
    for model, batch, samples in configs:
        rows = [s for s in res["summary"] if (s["model"], s["batch_size"], s["samples"]) == (model, batch, samples)]
        lines += ["", f"## {model}, batch {batch}, {samples} samples", ""]
        head = "| method | time s | CPU s | pass s | samples/s | peak RSS MB | above baseline MB |"
        sep = "|---|---:|---:|---:|---:|---:|---:|"
        if cuda:
            head += " torch max alloc MB | device MB |"
            sep += "---:|---:|"
        lines += [head, sep]
        for s in rows:
            cells = [f"{SHORT[s['method']]}: {LABELS[s['method']]}"]
            if not s["ok"]:
                cells += ["failed: " + s.get("error", "").replace("\n", " ").replace("|", "/")[:120]] + \
                    ["-"] * (7 if cuda else 5)
            else:
                cells += [_cell(s.get("total_s")), _cell(s.get("cpu_s")), _cell(s.get("pass_s")),
                          _cell(s.get("samples_per_s")),
                          _cell(s.get("peak_rss_mb"), "{:.0f}"), _cell(s.get("peak_above_baseline_mb"), "{:.0f}")]
                if cuda:
                    cells += [_cell(s.get("cuda_max_allocated_mb"), "{:.0f}"), _cell(s.get("smi_peak_mb"), "{:.0f}")]
            lines.append("| " + " | ".join(cells) + " |")
        r = next(x for x in res["ratios"] if (x["model"], x["batch_size"], x["samples"]) == (model, batch, samples))
        lines += ["", "| ratio of medians | time | CPU | pass | peak RSS | above baseline |"
                  + (" device |" if cuda else ""), "|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
        for key in ("gps/ours", "gps/ours-lean", "gps/ours-whole", "hooks/ours", "host/ours", "ours/plain",
                    "ours-lean/plain", "ours-whole/plain"):
            q = r.get(key)
            if not q or not any(v for v in q.values()):
                continue
            row = f"| {key} | {_x(q['total_s'])} | {_x(q.get('cpu_s'))} | {_x(q['pass_s'])} | " \
                  f"{_x(q['peak_rss_mb'])} | {_x(q['peak_above_baseline_mb'])} |"
            if cuda:
                row += f" {_x(q['smi_peak_mb'])} |"
            lines.append(row)
        ag = next((a for a in res.get("agreement", []) if (a["model"], a["batch_size"], a["samples"]) ==
                   (model, batch, samples)), None)
        if ag:
            parts = []
            for other in ("ours-lean", "ours-whole", "hooks", "host", "gps"):
                val = ag.get(f"ours~{other}")
                if f"ours~{other}" in ag:
                    parts.append(f"{SHORT[other]} {'n/a (different weight names)' if val is None else f'{100 * val:.2f}%'}")
            if parts:
                lines += ["", "Same selection as ours (share of ours' selected weights also selected by): "
                          + ", ".join(parts) + "."]
    if res.get("targets"):
        lines += ["", "## Targets (ViT-B/16, batch 32, CPU)", "", "| model | samples | target | measured | met |",
                  "|---|---:|---|---:|---|"]
        for t in res["targets"]:
            met = "n/a" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
            lines.append(f"| {t.get('model', 'vit-b16')} | {t['samples']} | {t['target']} | {_x(t['value'])} | {met} |")
    fails = [r for r in res["runs"] if r["rc"] != 0]
    if fails:
        lines += ["", f"{len(fails)} measurement(s) failed; first error: `{fails[0].get('error', '')[:300]}`"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    configs = [(r["model"], r["batch_size"], r["samples"]) for r in res["ratios"]]
    methods = res["settings"]["methods"]
    cuda = res["settings"]["device"] == "cuda"
    mem_key = "smi_peak_mb" if cuda else "peak_rss_mb"
    mem_label = "device memory MB (nvidia-smi)" if cuda else "peak RSS MB"
    models = {c[0] for c in configs}
    batches = {c[1] for c in configs}
    samples = {c[2] for c in configs}
    sweep = None
    if len(models) == 1 and len(configs) > 1:
        sweep = "samples" if len(batches) == 1 else ("batch_size" if len(samples) == 1 else None)

    def get(cfg, m, key):
        return next((s.get(key) for s in res["summary"] if (s["model"], s["batch_size"], s["samples"]) == cfg
                     and s["method"] == m), None)

    def timeline_axis(ax, cfg):
        for m in methods:
            run = next((r for r in res["runs"] if (r["model"], r["batch_size"], r["samples"]) == cfg
                        and r["method"] == m and r.get("timeline")), None)
            if run:
                t, mb = zip(*run["timeline"])
                ax.plot(t, mb, label=SHORT[m], color=COLORS[m])
        ax.set_xlabel("seconds after imports")
        ax.set_ylabel("RSS MB")
        ax.set_title(f"RSS over time, {cfg[0]} b{cfg[1]} n{cfg[2]}", fontsize=9)
        ax.legend(fontsize=7)

    if sweep:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
        for m in methods:
            xs, ys, lo, hi, ts, tlo, thi = [], [], [], [], [], [], []
            for cfg in configs:
                s, t = get(cfg, m, mem_key), get(cfg, m, "total_s")
                if not s or s["median"] is None:
                    continue
                xs.append(cfg[2] if sweep == "samples" else cfg[1])
                ys.append(s["median"]); lo.append(s["median"] - s["min"]); hi.append(s["max"] - s["median"])
                ts.append(t["median"]); tlo.append(t["median"] - t["min"]); thi.append(t["max"] - t["median"])
            axes[0].errorbar(xs, ys, yerr=[lo, hi], marker="o", label=SHORT[m], color=COLORS[m], capsize=3)
            axes[1].errorbar(xs, ts, yerr=[tlo, thi], marker="o", label=SHORT[m], color=COLORS[m], capsize=3)
        for ax, lab in ((axes[0], mem_label), (axes[1], "time s (median, min-max)")):
            ax.set_xlabel("samples" if sweep == "samples" else "batch size")
            ax.set_ylabel(lab)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[1].set_yscale("log")   # log-log: linear growth is a straight line of slope 1
        axes[0].set_title(f"peak memory vs {sweep.replace('_', ' ')}, {configs[0][0]}", fontsize=9)
        axes[1].set_title(f"time vs {sweep.replace('_', ' ')} (log-log)", fontsize=9)
        timeline_axis(axes[2], max(configs, key=lambda c: (c[2], c[1])))
    else:
        fig, axes = plt.subplots(len(configs), 3, figsize=(16, 4.4 * len(configs)), squeeze=False)
        for row, cfg in enumerate(configs):
            names = [m for m in methods if get(cfg, m, "total_s")]
            xs = range(len(names))
            for col, (key, lab) in enumerate(((mem_key, mem_label), ("total_s", "time s"))):
                ax = axes[row][col]
                med = [get(cfg, m, key)["median"] if get(cfg, m, key) else 0 for m in names]
                err = [[med[i] - get(cfg, m, key)["min"] for i, m in enumerate(names)],
                       [get(cfg, m, key)["max"] - med[i] for i, m in enumerate(names)]] if all(
                    get(cfg, m, key) for m in names) else None
                ax.bar(xs, med, yerr=err, color=[COLORS[m] for m in names], capsize=3)
                if key == "peak_rss_mb":   # the post-import baseline, hatched
                    base = [get(cfg, m, "baseline_rss_mb")["median"] for m in names]
                    ax.bar(xs, base, color="none", edgecolor="k", hatch="//", linewidth=0, label="after imports")
                    ax.legend(fontsize=7)
                if key == "total_s":       # the pass over the data, hatched
                    ps = [get(cfg, m, "pass_s")["median"] for m in names]
                    ax.bar(xs, ps, color="none", edgecolor="k", hatch="..", linewidth=0, label="pass over the data")
                    ax.legend(fontsize=7)
                for i, val in enumerate(med):
                    ax.text(i, val, f"{val:.0f}" if val >= 10 else f"{val:.1f}", ha="center", va="bottom",
                            fontsize=8)
                ax.set_xticks(list(xs))
                ax.set_xticklabels([SHORT[m] for m in names], fontsize=8)
                ax.set_ylabel(lab)
                ax.set_title(f"{lab}, {cfg[0]} b{cfg[1]} n{cfg[2]}", fontsize=9)
            timeline_axis(axes[row][2], cfg)
    fig.suptitle(f"{res['name']}: {res['machine'].get('cpu', '')} ({res['settings']['device']}, "
                 f"{res['settings']['threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(json_path: str | Path, with_plot: bool = True) -> tuple[str, str | None]:
    json_path = Path(json_path)
    res = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md")
    png = json_path.with_suffix(".png")
    text = markdown(res)
    if with_plot and plot(res, png):
        text = text.replace("\n", f"\n\n![{res['name']}]({png.name})\n", 1)
    else:
        png = None
    md.write_text(text)
    return str(md), (str(png) if png else None)


def resummarize(json_path: str | Path) -> None:
    """Recompute the summary, ratios and targets of a results file from its runs (after a change of metrics)."""
    from bench.selection import summarize, targets

    json_path = Path(json_path)
    res = json.loads(json_path.read_text())
    configs = [tuple(c) for c in res["settings"]["configs"]]
    res["summary"], res["ratios"] = summarize(res["runs"], configs, res["settings"]["methods"])
    res["targets"] = targets(res["ratios"], res["settings"]["device"])
    json_path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    again = "--resummarize" in args
    for arg in [a for a in args if a != "--resummarize"]:
        if again:
            resummarize(arg)
        print(render(arg))
