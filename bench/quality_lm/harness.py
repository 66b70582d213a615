"""One training run of the LM study: a method (sparse masks, LoRA, full, head-only, none) on a task, one loop.

Every method goes through the product's one training loop, ``fps_graph.training.fit``, with the product's task
(``get_task('seq-cls' | 'causal-lm')``: text read and tokenized as `select` does it, padded batches, loss and
metrics; seq-cls: a fresh head seeded by the run's seed) and AdamW with linear warm-up and cosine decay
(``OptimConfig``). Only the adapter differs:

* ``sparse``: ``SparseAdapter`` with a masks file (the head trains in full for seq-cls; no biases, so that the
  count equals LoRA's on the same modules), with the library's default step scale (``--step-scale input``: masks
  that carry input statistics, e.g. fps and act-sample, scale each entry's step; random / magnitude / gps masks
  carry none). ``scale="none"``: every entry at the learning rate (``--step-scale none``, the behaviour before
  issue 16). ``scale="input"`` (repro.py's bench-side candidate, unclipped) reparametrises each delta as
  ``c_i * theta_i`` with
  ``c_i = median_j E|x_j| / E|x_col(i)|`` over the layer's input features (candidate (a) of issue 16: with Adam an
  entry then moves its output by about the same amount whatever its input's scale): ``InputScaledSparse``.
* ``lora``: ``LoraAdapter`` (PEFT) on the blocks' Linear layers, rank per module; the seq-cls head as
  ``modules_to_save``.
* ``full``: ``FullAdapter``. ``head``: ``SparseAdapter(None)``, the seq-cls head only. ``none``: no training.

Returns metrics on validation and test, seconds per step (median) and peak RSS (VmHWM reset at the start of
training), as ``fit`` measures them for every method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fps_graph.data.text import TextOptions
from fps_graph.training import (Adapter, DataConfig, DataContext, FullAdapter, LoraAdapter, OptimConfig, RunConfig,
                                SparseAdapter, TrainsConfig, get_task)
from fps_graph.training.config import StepScale
from fps_graph.training.models import load_hf_model
from fps_graph.training.sparse import SparseDelta
from fps_graph.compare.runs import train_run

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                 # seq-cls | causal-lm
    train: str
    val: str
    test: str
    max_length: int = 64
    epochs: int = 3
    batch_size: int = 16
    max_train: int | None = None


@dataclass
class Spec:
    method: str               # label in the results (fps, random, lora, full, head, fps-scaled, ...)
    kind: str                 # sparse | lora | full | head | none
    lr: float = 1e-3
    seed: int = 0
    masks: str | None = None
    scale: str | None = None  # sparse: None (the library's default step scale) | "none" (--step-scale none) |
                              # "input" (the bench's own unclipped reparametrisation, repro.py; needs stats)
    stats: str | None = None  # sparse with scale: the stats file select wrote (--stats-out)
    lora_ranks: dict[str, int] = field(default_factory=dict)
    lora_alpha_ratio: float = 2.0
    extra: dict[str, Any] = field(default_factory=dict)


def input_scales(masks: str, stats: str) -> dict[str, np.ndarray]:
    """Per masks key: E|x| of each input feature (the fan-in axis of the [out, in] weight), from select's stats."""
    from safetensors.numpy import load_file

    from fps_graph.formats.masks import read_metadata

    tensors = read_metadata(masks)["tensors"]
    s = load_file(stats)
    out = {}
    for key, rec in tensors.items():
        node = rec["nodes"][0]
        out[key] = np.asarray(s[f"{node}::abs"], dtype=np.float64).reshape(-1) / float(
            np.asarray(s[f"{node}::count"]).reshape(-1)[0])
    return out


class ScaledDelta(SparseDelta):
    """SparseDelta whose effective delta is scale * delta (scale: a fixed per-entry buffer)."""

    def _materialise(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(-1)
        return flat.index_put((self.index,), (self.delta * self.scale).to(weight.dtype),
                              accumulate=True).view(weight.shape)


def scale_deltas(handle: Any, masks: str, stats: str) -> dict[str, Any]:
    """Candidate (a): delta = c * theta per entry, c = median E|x| of the layer's inputs / E|x| of the entry's
    input feature; returns a summary of the factors."""
    scales = input_scales(masks, stats)
    meds, mins = [], []
    for key, d in handle.deltas.items():
        ex = scales[key]
        cols = d.index.cpu().numpy() % ex.size
        c = np.median(ex) / np.maximum(ex[cols], 1e-12)
        d.register_buffer("scale", torch.as_tensor(c, dtype=torch.float32), persistent=False)
        d.__class__ = ScaledDelta
        meds.append(float(np.median(c)))
        mins.append(float(np.min(c)))
    return {"median_c": float(np.median(meds)), "min_c": float(np.min(mins))}


@dataclass(frozen=True)
class InputScaledSparse(SparseAdapter):
    """SparseAdapter whose deltas are reparametrised per entry by the input scale (``scale_deltas``)."""

    stats: str = ""

    def attach(self, model: Any, head: Any, seed: int = 0) -> Any:
        handle = super().attach(model, head, seed)
        handle.notes.append(f"input scale: {scale_deltas(handle, str(self.masks), self.stats)}")
        return handle


def adapter_for(spec: Spec, seq_cls: bool) -> Adapter:
    """The adapter of a spec: what trains (the seq-cls head trains in full for every method; no biases)."""
    trains = TrainsConfig(train_bias=False, train_head=seq_cls)
    if spec.kind == "sparse":
        if spec.scale == "input":
            return InputScaledSparse(spec.masks, trains, stats=str(spec.stats), step_scale=StepScale.NONE)
        if spec.scale == "none":
            return SparseAdapter(spec.masks, trains, step_scale=StepScale.NONE)
        return SparseAdapter(spec.masks, trains)
    if spec.kind == "lora":
        ranks = spec.lora_ranks
        return LoraAdapter(rank=dict(ranks), target_modules=tuple(sorted({k.rsplit(".", 1)[-1] for k in ranks})),
                           alpha_ratio=spec.lora_alpha_ratio, trains=trains)
    if spec.kind == "full":
        return FullAdapter(trains)
    if spec.kind == "head":
        return SparseAdapter(None, trains)
    raise ValueError(spec.kind)


def load_task_data(folder: Path, task: Task, test: bool = True) -> tuple[Any, Any, Any, Any, Any]:
    """The task object, the model (from the folder, for the task), and the tokenized train/val/test splits."""
    t = get_task(task.kind)
    model = load_hf_model(folder, t.hf_class)
    cfg = DataConfig(data=task.train, max_samples=task.max_train, text=TextOptions(max_length=task.max_length))
    ctx = DataContext(model, cfg, folder)
    train = t.read(task.train, ctx)
    classes = train.classes or None
    val = t.read(task.val, ctx, classes=classes)
    tst = t.read(task.test, ctx, classes=classes) if test else None
    return t, model, cfg, (train, val, tst), classes


def run(folder: Path, task: Task, spec: Spec, threads: int | None = None, progress: bool = False,
        splits: tuple[str, ...] = ("val", "test")) -> dict[str, Any]:
    """Train one spec on one task through ``fit`` (``fps_graph.compare.runs.train_run``); returns the record
    (metrics, counts, time, memory). ``splits``: which of "val" and "test" are scored after training (none: a
    cost-only run)."""
    unknown = set(splits) - {"val", "test"}
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)} (use val, test)")
    t, model, cfg, (train, val, tst), _ = load_task_data(folder, task, "test" in splits)
    block = sum(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in BLOCK_LINEARS)
    del model
    rec: dict[str, Any] = {"method": spec.method, "kind": spec.kind, "lr": spec.lr, "seed": spec.seed,
                           "task": task.name, "model": folder.name, "block_linear_params": int(block)}
    run_cfg = RunConfig(output=None, seed=spec.seed, threads=threads, plot=False, stop_on_divergence=True)
    optim = OptimConfig(optimizer="adamw", lr=spec.lr if spec.kind != "none" else 1e-3,   # none: nothing trains
                        weight_decay=0.0, batch_size=task.batch_size, epochs=task.epochs, warmup_epochs=0.3,
                        min_lr=0.0)
    adapter = None if spec.kind == "none" else adapter_for(spec, task.kind == "seq-cls")
    evals = {name: data for name, data in (("val", val), ("test", tst)) if name in splits}
    rec.update(train_run(folder, t, train, evals, adapter, optim, run_cfg, data_config=cfg,
                         callbacks=[_Progress()] if progress else None,
                         trains=TrainsConfig(train_bias=False, train_head=True)))
    return rec


class _Progress:
    """Prints the loss after each epoch (the study's --progress)."""

    def on_attach(self, handle: Any) -> None:
        pass

    def on_setup(self, setup: Any) -> None:
        print(f"  trainable {setup.summary['trainable']:,}", flush=True)

    def progress(self, total: int, desc: str) -> None:
        return None

    def on_epoch(self, rec: dict[str, Any]) -> None:
        print(f"  epoch {rec['epoch']} loss {rec['train_loss']:.3f} {rec['seconds']:.1f} s", flush=True)

    def on_end(self, handle: Any, folder: Any, metrics: dict[str, Any]) -> dict[str, str]:
        return {}
