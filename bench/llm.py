"""A 1.1B Llama-architecture decoder with its KV-cache inputs: fps-graph select against plain ONNX Runtime inference
over the same token batches and a GPS-style gradient pass in PyTorch (causal-LM loss). CPU, fp32.

    python -m bench.llm                      # TinyLlama shape (1.1B), 16 sequences x 128 tokens, batch 4
    python -m bench.llm --small              # a 2-layer toy of the same architecture (a minute; checks the script)
    python -m bench.llm --methods ours,plain --before /tmp/fps-before   # also fps-graph of another checkout

The model is ``transformers.LlamaForCausalLM(LlamaConfig(hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000, untied))`` with seeded random weights plus noise (no two tensors equal), exported
once with ``torch.onnx.export(dynamo=False)`` under Optimum's names (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/.value`` in; ``logits``, ``present.{i}.key/.value`` out; weights in one
external-data file) and cached under bench/.cache/llm-*/ with its config.json and safetensors weights. The tokens
are seeded random ids in an .npz keyed by input name, empty caches (past length 0) included, read by every method
through fps_graph's Loader. Each method runs in its own fresh process (``--worker``); results go to
bench/results/NAME.json, .md and .png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.meta import load_now, run_meta

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)
SMALL = dict(TINYLLAMA, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4000)
METHODS = ("ours", "ours-lean", "plain", "gps", "before")


LAYERS: int | None = None   # --layers: the TinyLlama shape with fewer decoder layers (fixed costs per layer)


def _shape(small: bool) -> dict:
    cfg = dict(SMALL if small else TINYLLAMA)
    if LAYERS:
        cfg["num_hidden_layers"] = LAYERS
    return cfg


def cache_dir(small: bool) -> Path:
    return HERE / ".cache" / (("llm-small" if small else "llm-1b") + (f"-L{LAYERS}" if LAYERS else ""))


def _config(small: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**_shape(small), use_cache=True)


def ensure_model(small: bool, log=print) -> dict:
    """Build, save and export the decoder once; return {'onnx', 'weights', 'params', ...}."""
    d = cache_dir(small)
    info_path = d / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    import warnings

    import onnx
    import torch
    from safetensors.torch import save_file
    from transformers import DynamicCache, LlamaForCausalLM

    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = _config(small)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():     # no bit-identical tensors (norm ones) for the exporter to merge
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    params = sum(p.numel() for p in model.parameters())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    cfg.to_json_file(str(d / "config.json"))
    layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]

    class WithPast(LlamaForCausalLM):
        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in outputs[1:]})
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    past = [torch.randn(2, heads, 3, head_dim) for _ in past_names]
    raw = d / "raw"
    raw.mkdir(exist_ok=True)
    log(f"[llm] exporting {params / 1e9:.2f}B parameters ...")
    model.__class__ = WithPast
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones(2, 8, dtype=torch.int64), torch.arange(3, 8).expand(2, 5), *past),
                          str(raw / "model.onnx"), input_names=["input_ids", "attention_mask", "position_ids"]
                          + past_names, output_names=outputs, dynamic_axes=axes, dynamo=False, opset_version=17)
    del model
    proto = onnx.load(str(raw / "model.onnx"))          # the exporter writes one file per tensor above 2 GB
    onnx.save(proto, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    del proto
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    info = {"onnx": str(d / "model.onnx"), "weights": str(d / "model.safetensors"), "params": params,
            "config": _shape(small), "export_seconds": time.perf_counter() - t0,
            "exporter": "torch.onnx.export(dynamo=False, opset 17), Optimum input/output names, external data",
            "onnx_data_bytes": (d / "model.onnx.data").stat().st_size}
    info_path.write_text(json.dumps(info, indent=1))
    log(f"[llm] exported in {info['export_seconds']:.0f} s")
    return info


def ensure_data(small: bool, sequences: int, length: int, seed: int = 0) -> str:
    """Seeded token ids and the inputs they need (ones mask, positions, empty caches) as an .npz."""
    cfg = _shape(small)
    path = cache_dir(small) / f"tokens-n{sequences}-t{length}-s{seed}.npz"
    if path.is_file():
        return str(path)
    rng = np.random.default_rng(seed)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    arrays = {"input_ids": rng.integers(0, cfg["vocab_size"], (sequences, length)).astype(np.int64),
              "attention_mask": np.ones((sequences, length), np.int64),
              "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (sequences, length)).copy()}
    for i in range(cfg["num_hidden_layers"]):
        for k in ("key", "value"):
            arrays[f"past_key_values.{i}.{k}"] = np.zeros((sequences, cfg["num_key_value_heads"], 0, head_dim),
                                                          np.float32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# one method in this process


def _worker(a) -> dict:
    from bench.worker import Sampler, cpu_s, maxrss_mb, rss_mb

    import fps_graph.data.sources  # noqa: F401
    if a.method in ("gps",):
        import torch
        import transformers  # noqa: F401

        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(a.threads)
    else:
        import onnxruntime  # noqa: F401

        import fps_graph.selection.pipeline  # noqa: F401
    baseline = rss_mb()
    cpu0 = cpu_s()
    t0 = time.perf_counter()
    sampler = Sampler(t0, interval=0.05)
    sampler.start()
    if a.method in ("ours", "ours-lean", "before"):
        res = _ours(a)
    elif a.method == "plain":
        res = _plain(a)
    else:
        res = _gps(a)
    total = time.perf_counter() - t0
    cpu_total = cpu_s() - cpu0
    sampler.stop()
    res.update({"method": a.method, "total_s": total, "cpu_s": cpu_total, "baseline_rss_mb": baseline,
                "peak_rss_mb": maxrss_mb(), "peak_above_baseline_mb": maxrss_mb() - baseline,
                "timeline": sampler.timeline(200)})
    return res


def _ours(a) -> dict:
    import cProfile
    import pstats

    from fps_graph.selection.pipeline import SelectOptions, run_select, write_result

    kw = {"max_memory_mb": a.max_memory if a.max_memory == "auto" else float(a.max_memory)} \
        if a.method == "ours-lean" else {}
    opts = SelectOptions(k=a.k, provider="cpu", threads=a.threads, batch_size=a.batch_size, **kw)
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    res = run_select(a.onnx, a.data, opts)
    write_result(res, a.masks, force=True)
    out = {"pass_s": res.summary["calibration_seconds"], "selected": res.summary["selected"],
           "samples_seen": res.summary["samples"], "micro_batch": res.summary.get("micro_batch", 0),
           "seconds_in_run_select": res.summary["seconds"]}
    if prof:
        prof.disable()
        st = pstats.Stats(prof)
        out["profile"] = {f"{fn[2]} ({Path(fn[0]).name}:{fn[1]})": round(v[3], 2)
                          for fn, v in sorted(st.stats.items(), key=lambda x: -x[1][3])[:40]}
    return out


def _plain(a) -> dict:
    import onnxruntime as ort

    from fps_graph.data.dispatch import open_source
    from fps_graph.data.sources import InputSpec, Loader
    from fps_graph.runtime.session import _options

    sess = ort.InferenceSession(a.onnx, _options("all", a.threads), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    specs = [InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), np.dtype(types[i.type]))
             for i in sess.get_inputs()]
    names = [i.name for i in sess.get_inputs()]
    n = 0
    t0 = time.perf_counter()
    for batch in Loader(open_source(a.data, specs), batch_size=a.batch_size):
        sess.run(None, {k: batch[k] for k in names})
        n += int(batch["input_ids"].shape[0])
    return {"pass_s": time.perf_counter() - t0, "selected": 0, "samples_seen": n}


def _gps(a) -> dict:
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_json_file(str(Path(a.onnx).parent / "config.json"))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(load_file(a.weights), assign=True, strict=True)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)   # its inv_freq is a buffer outside the state dict
    model.train(False)
    data = np.load(a.data)
    ids, mask, pos = data["input_ids"], data["attention_mask"], data["position_ids"]
    n = 0
    t0 = time.perf_counter()
    for i in range(0, ids.shape[0], a.batch_size):
        x = torch.from_numpy(ids[i:i + a.batch_size])
        loss = model(input_ids=x, attention_mask=torch.from_numpy(mask[i:i + a.batch_size]),
                     position_ids=torch.from_numpy(pos[i:i + a.batch_size]), labels=x, use_cache=False).loss
        loss.backward()            # .grad accumulates over the batches
        del loss
        n += x.shape[0]
    pass_s = time.perf_counter() - t0
    masks = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                g = m.weight.grad.abs()
                top = torch.topk(g, min(a.k, g.shape[1]), dim=1).indices
                flat = (top + torch.arange(g.shape[0])[:, None] * g.shape[1]).reshape(-1)
                masks[f"{name}.weight"] = torch.sort(flat).values.numpy()
    save_file(masks, a.masks)
    return {"pass_s": pass_s, "selected": int(sum(v.size for v in masks.values())), "samples_seen": n}


# ----------------------------------------------------------------------------------------------------------------
# driver


def run_method(method: str, info: dict, data: str, args, tag: str) -> dict:
    out = Path(args.work) / f"{tag}.json"
    masks = Path(args.work) / f"{tag}.safetensors"
    cmd = [sys.executable, "-m", "bench.llm", "--worker", method, "--onnx", info["onnx"], "--weights",
           info["weights"], "--data", data, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--k", str(args.k), "--max-memory", str(args.max_memory), "--masks", str(masks), "--out", str(out)]
    if args.profile:
        cmd.append("--profile")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    root = args.before if method == "before" else str(ROOT)
    env["PYTHONPATH"] = root + os.pathsep + str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if method == "before":   # the other checkout's fps_graph, this file's worker
        cmd[1:3] = ["-c", "import sys, runpy; sys.argv[0] = 'bench.llm'; "
                    f"sys.path.insert(0, {root!r}); runpy.run_path({str(HERE / 'llm.py')!r}, run_name='__main__')"]
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=args.timeout)
    rec = {"method": method, "rc": p.returncode, "load_before": load, "load_after": os.getloadavg()[0]}
    if p.returncode == 0 and out.is_file():
        rec.update(json.loads(out.read_text()))
        rec["masks_file"] = str(masks)
    else:
        rec["error"] = "\n".join(p.stderr.strip().splitlines()[-8:])
    return rec


def _same(a: str, b: str) -> dict:
    """How many selected indices two mask files share (over common keys); byte equality of the index arrays."""
    from safetensors.numpy import load_file

    x, y = load_file(a), load_file(b)
    common = sorted(set(x) & set(y))
    same = sum(np.intersect1d(x[k], y[k]).size for k in common)
    total = sum(x[k].size for k in common)
    return {"keys": len(common), "identical": all(x[k].tobytes() == y[k].tobytes() for k in common)
            and set(x) == set(y), "shared": same / total if total else None}


def render(res: dict, stem: Path) -> None:
    """NAME.md and NAME.png from the results."""
    rows = res["runs"]
    by = {}
    for r in sorted((r for r in rows if r["rc"] == 0), key=lambda r: r["total_s"]):
        by.setdefault(r["method"], []).append(r)
    by = {m: v[len(v) // 2] for m, v in by.items()}   # each method's median run (by total time)
    plain = by.get("plain")
    label = {"ours": "fps-graph select", "ours-lean": f"fps-graph select --max-memory {res['settings']['max_memory']}",
             "plain": "ONNX Runtime inference only (same batches)", "gps": "PyTorch forward+backward, top |grad| (GPS)",
             "before": "fps-graph select, before (commit " + res["settings"].get("before_commit", "?") + ")"}
    m = res["model"]
    lines = [f"# {res['name']}", "", f"Command: `{res['command']}`  ", f"Date: {res['created']}", "",
             f"Model: Llama architecture, {m['params'] / 1e9:.2f}B parameters, fp32, weights in external data "
             f"({m['onnx_data_bytes'] / 2**30:.2f} GiB); {m['exporter']}. Data: {res['settings']['sequences']} "
             f"sequences x {res['settings']['length']} tokens, batch {res['settings']['batch_size']}, top-K "
             f"{res['settings']['k']} per output neuron, {res['settings']['threads']} threads. Machine: "
             f"{res['machine']}; load average before each run: "
             + ", ".join(f"{r['method']} {r['load_before']:.1f}" for r in rows)
             + " (a shared machine: timings are noisy).", "",
             "| method | time s | CPU s | pass s | peak RSS MB | time / plain | peak / plain | GPS peak / this |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    gps = by.get("gps")
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {label[r['method']]} | failed: {r.get('error', '')[:100]} | | | | | | |")
            continue
        tp = f"{r['total_s'] / plain['total_s']:.2f}x" if plain else "-"
        mp = f"{r['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x" if plain else "-"
        gp = f"{gps['peak_rss_mb'] / r['peak_rss_mb']:.2f}x" if gps else "-"
        extra = f" (micro-batches of {r['micro_batch']})" if r.get("micro_batch") else ""
        lines.append(f"| {label[r['method']]}{extra} | {r['total_s']:.1f} | {r['cpu_s']:.1f} | {r['pass_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {tp} | {mp} | {gp} |")
    if res.get("agreement"):
        lines += ["", "Masks: " + "; ".join(f"{k}: {'byte-identical' if v['identical'] else 'differ'}"
                                            f" ({100 * (v['shared'] or 0):.2f}% of indices shared)"
                                            for k, v in res["agreement"].items()) + "."]
    if res.get("targets"):
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        for t in res["targets"]:
            lines.append(f"| {t['target']} | {t['value']:.2f}x | {'**yes**' if t['met'] else '**no**'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if r["rc"] == 0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["method"] for r in ok]
    axes[0].bar(names, [r["peak_rss_mb"] for r in ok], color="#1f77b4")
    axes[0].set_ylabel("peak RSS MB")
    axes[1].bar(names, [r["total_s"] for r in ok], color="#ff7f0e")
    axes[1].set_ylabel("time s")
    for r in ok:
        t = [p[0] for p in r.get("timeline", [])]
        axes[2].plot(t, [p[1] for p in r.get("timeline", [])], label=r["method"])
    axes[2].set_xlabel("s")
    axes[2].set_ylabel("RSS MB")
    axes[2].legend(fontsize=8)
    fig.suptitle(res["name"])
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--onnx")
    p.add_argument("--weights")
    p.add_argument("--data")
    p.add_argument("--masks")
    p.add_argument("--out")
    p.add_argument("--profile", action="store_true", help="cProfile the ours/before runs (top functions in JSON)")
    p.add_argument("--small", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 22, TinyLlama)")
    p.add_argument("--prepare", action="store_true", help="only build, save and export the model (cached)")
    p.add_argument("--methods", default="ours,ours-lean,plain,gps")
    p.add_argument("--before", default=None, help="a checkout whose fps_graph runs as method 'before'")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--max-memory", default="auto", help="MB or auto, for ours-lean")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--reps", type=int, default=1, help="repetitions, interleaved (method order rotated)")
    p.add_argument("--name", default=None)
    p.add_argument("--work", default="/tmp/fpsg-llm-bench")
    a = p.parse_args(argv)
    a.method = a.worker
    global LAYERS
    LAYERS = a.layers
    if a.worker:
        res = _worker(a)
        Path(a.out).write_text(json.dumps(res))
        return 0
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.before:
        methods.append("before")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if a.prepare:
        ensure_model(a.small, log)
        return 0
    # in a child: a process's peak RSS (ru_maxrss) starts from its parent's RSS at fork, so the driver never
    # imports torch; the workers' peaks are their own
    subprocess.run([sys.executable, "-m", "bench.llm", "--prepare"] + (["--small"] if a.small else [])
                   + ([f"--layers={a.layers}"] if a.layers else []), cwd=str(ROOT), check=True)
    info = json.loads((cache_dir(a.small) / "info.json").read_text())
    data = ensure_data(a.small, a.sequences, a.length)
    name = a.name or f"llama-{'small' if a.small else '1b'}{f'-L{a.layers}' if a.layers else ''}_b{a.batch_size}_n{a.sequences}x{a.length}-cpu"
    res = {"name": name, "command": "python -m bench.llm " + " ".join(argv if argv is not None else sys.argv[1:]),
           "created": datetime.datetime.now().isoformat(timespec="seconds"), "model": info,
           "machine": f"{os.cpu_count()} cores, "
                      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
           "settings": {"sequences": a.sequences, "length": a.length, "batch_size": a.batch_size, "k": a.k,
                        "threads": a.threads, "max_memory": a.max_memory, "methods": methods, "reps": a.reps},
           "meta": run_meta(a.threads, "python -m bench.llm " + " ".join(argv if argv is not None else sys.argv[1:])),
           "runs": []}
    if a.before:
        res["settings"]["before_commit"] = subprocess.run(["git", "-C", a.before, "rev-parse", "--short", "HEAD"],
                                                          capture_output=True, text=True).stdout.strip()
    for rep in range(a.reps):   # interleaved, the order rotated each repetition
        for m in methods[rep % len(methods):] + methods[:rep % len(methods)]:
            rec = run_method(m, info, data, a, f"{name}-{m}-r{rep}")
            rec["rep"] = rep
            if rep:
                rec.pop("timeline", None)
            res["runs"].append(rec)
            log(f"[llm] rep {rep} {m}: " + (f"{rec['total_s']:.1f} s, peak {rec['peak_rss_mb']:.0f} MB"
                                            if rec["rc"] == 0 else "FAILED " + rec.get("error", ""))
                + f" (load {rec['load_before']:.1f})")
    res["load_end"] = load_now()
    files = {r["method"]: r.pop("masks_file", None) for r in res["runs"] if r.get("rep") == 0}
    for r in res["runs"]:
        r.pop("masks_file", None)
    res["agreement"] = {f"ours~{o}": _same(files["ours"], files[o]) for o in ("ours-lean", "before", "gps")
                        if files.get("ours") and files.get(o)}
    by = {}
    for m in methods:   # the median run of each method (by total time)
        ok = sorted((r for r in res["runs"] if r["method"] == m and r["rc"] == 0), key=lambda r: r["total_s"])
        if ok:
            by[m] = ok[len(ok) // 2]
    res["medians"] = {m: {k: r[k] for k in ("total_s", "cpu_s", "pass_s", "peak_rss_mb")} for m, r in by.items()}
    targets = []
    if "plain" in by:
        for m in ("ours", "ours-lean"):
            if m in by:
                targets.append({"target": f"{m}: peak RSS <= 1.15x plain inference",
                                "value": by[m]["peak_rss_mb"] / by["plain"]["peak_rss_mb"], "met":
                                by[m]["peak_rss_mb"] <= 1.15 * by["plain"]["peak_rss_mb"]})
                targets.append({"target": f"{m}: time <= 1.2x plain inference",
                                "value": by[m]["total_s"] / by["plain"]["total_s"],
                                "met": by[m]["total_s"] <= 1.2 * by["plain"]["total_s"]})
    res["targets"] = targets
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / name
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    render(res, stem)
    print(stem.with_suffix(".md").read_text())
    return 0 if all(r["rc"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
