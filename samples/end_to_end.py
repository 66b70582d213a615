"""End to end on the bundled sample: select -> train -> apply -> evaluate, on a CPU in seconds.

    python samples/end_to_end.py [--workdir DIR] [--k 8] [--epochs 10] [--per-class 64]

Measured with these defaults on 2 CPU cores: 16.5 s of CPU time (15.5 s user, 1.0 s sys) and 66 s wall while the
cores carried a load average of 18 from other jobs; the work is single-threaded, so on idle cores the wall time is
close to the CPU time (not measured idle). About 7 s of it is importing PyTorch, the compiler stack its optimisers
import, ONNX Runtime and matplotlib; most of the rest is the 10 epochs. Held-out accuracy 0.15 -> 0.945. (The
previous defaults, 100 images per class, k 4, 30 epochs: 28.3 s of CPU time, 0.915.)

1. draws fresh procedural images (samples/make_sample.py): a training set, a validation set and a held-out test
   set, each from its own seed;
2. `fps-graph select`: the top-k input connections of every output neuron of samples/tiny_hybrid.onnx, from one
   forward pass over training images;
3. `fps-graph train`: masked fine-tuning of the PyTorch model (samples/tiny_model.py:tiny_hybrid) on the training
   images, prepared as `select` prepared them (the masks file records it, so no --image-size): a delta over the
   selected weights, plus biases and head in full;
4. `fps-graph apply`: the fine-tuned ONNX model (same graph, patched initializers);
5. evaluates the base and fine-tuned ONNX models with ONNX Runtime on the held-out images, checks that the ONNX
   model computes what the fine-tuned PyTorch model computes, and compares their latency.

Everything is written under --workdir (a temporary folder by default); a summary goes to summary.json there.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_sample import make_images  # noqa: E402

from fps_graph_cli.main import entry  # noqa: E402


def run(args: list[str]) -> None:
    """Run one fps-graph command in this process, showing it as a shell command first."""
    print("\n$ fps-graph " + " ".join(shlex.quote(a) for a in args), flush=True)
    t = time.perf_counter()
    code = entry(args)
    if code:
        raise SystemExit(f"fps-graph {args[0]} failed with exit code {code}")
    print(f"  ({time.perf_counter() - t:.1f} s)", flush=True)


def onnx_logits(path: Path, x: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def latency_ms(path: Path, x: np.ndarray, repeats: int = 10) -> float:
    """Median milliseconds per batch in ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where to write everything [default: a temporary folder]")
    ap.add_argument("--per-class", type=int, default=64, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=50, help="held-out test images per class")
    ap.add_argument("--k", type=int, default=8, help="input connections selected per output neuron")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads for training (1 is fastest on a "
                                                           "busy 2-core machine for this tiny model)")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fps_graph_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work}")

    data = {"train": (args.per_class, 1), "val": (max(8, args.test_per_class // 2), 2), "test": (args.test_per_class, 3)}
    for split, (n, seed) in data.items():
        make_images(work / split, per_class=n, seed=seed)
    print("images: " + ", ".join(f"{split} {4 * n}" for split, (n, _) in data.items()))

    model = HERE / "tiny_hybrid.onnx"
    factory = f"{HERE / 'tiny_model.py'}:tiny_hybrid"
    weights = HERE / "tiny_hybrid.safetensors"
    masks, runs, finetuned = work / "masks.safetensors", work / "run", work / "tiny_hybrid_finetuned.onnx"
    timings = {}
    t = time.perf_counter()
    run(["select", str(model), str(work / "train"), "-o", str(masks), "--k", str(args.k), "--max-samples", "128",
         "--shuffle", "--force", "-q"])
    timings["select_s"] = time.perf_counter() - t
    t = time.perf_counter()
    run(["train", factory, "--weights", str(weights), "--masks", str(masks), "--data", str(work / "train"),
         "--val", str(work / "val"), "--epochs", str(args.epochs), "--lr", str(args.lr),
         "--batch-size", "32", "--weight-decay", "0.01", "--threads", str(args.threads), "-o", str(runs), "--force"])
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    run(["apply", str(model), str(runs / "delta.safetensors"), "-o", str(finetuned), "--force"])
    timings["apply_s"] = time.perf_counter() - t

    # evaluate on held-out images, preprocessed exactly as for training
    import torch

    from fps_graph.data.labeled import open_labeled
    from fps_graph.formats.masks import data_record
    from fps_graph.training.config import DataConfig
    from fps_graph.training.models import build_model
    from fps_graph.training.sparse import load_delta
    from fps_graph.training.tasks.image_cls import resolve_image_prep

    metrics = json.loads((runs / "metrics.json").read_text())
    net = build_model(factory, str(weights))
    # the test images prepared as select and train prepared theirs (the masks file's record)
    prep = resolve_image_prep(DataConfig(data=str(work / "test")), data_record(masks), net)
    test = open_labeled(str(work / "test"), prep.spec, prep.options, classes=metrics["classes"])
    x = test.fetch(np.arange(len(test)))["input"]
    y = test.labels
    base_logits, ft_logits = onnx_logits(model, x), onnx_logits(finetuned, x)
    load_delta(net, runs / "delta.safetensors")
    with torch.no_grad():
        torch_logits = net.eval()(torch.from_numpy(x)).numpy()
    rel_err = float(np.max(np.abs(ft_logits - torch_logits)) / np.max(np.abs(torch_logits)))
    batch = x[:64]
    summary = {
        "test_images": int(len(y)),
        "accuracy": {"base_onnx": float((base_logits.argmax(1) == y).mean()),
                     "finetuned_onnx": float((ft_logits.argmax(1) == y).mean()),
                     "finetuned_pytorch": float((torch_logits.argmax(1) == y).mean())},
        "onnx_vs_pytorch_max_rel_error": rel_err,
        "latency_ms_batch64": {"base_onnx": latency_ms(model, batch), "finetuned_onnx": latency_ms(finetuned, batch)},
        "trainable": metrics["trainable"],
        "memory": metrics["memory"],
        "timings_s": {**{k: round(v, 2) for k, v in timings.items()},
                      "total_s": round(time.perf_counter() - t_all, 2)},
        "workdir": str(work),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc, lat, tr = summary["accuracy"], summary["latency_ms_batch64"], summary["trainable"]
    print(f"\nheld-out accuracy ({len(y)} images): base {acc['base_onnx']:.3f} -> fine-tuned {acc['finetuned_onnx']:.3f}"
          f" (PyTorch {acc['finetuned_pytorch']:.3f}); ONNX vs PyTorch max relative error {rel_err:.1e}")
    print(f"trained {tr['trainable']:,} of {tr['full_finetune']:,} values ({100 * tr['fraction']:.1f}%);"
          f" ONNX latency per batch of 64: {lat['base_onnx']:.2f} ms base, {lat['finetuned_onnx']:.2f} ms fine-tuned")
    print(f"total {summary['timings_s']['total_s']:.1f} s; summary in {work / 'summary.json'}")
    if rel_err > 1e-4:
        raise SystemExit(f"the fine-tuned ONNX model disagrees with PyTorch (max relative error {rel_err:.1e})")
    return summary


if __name__ == "__main__":
    main()
