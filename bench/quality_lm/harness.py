"""One training run of the LM study: a method (sparse masks, LoRA, full, head-only, none) on a task, one loop.

Every method goes through the same code: the model is built from the Hugging Face folder by the product's
``fps_graph.training.hf.load_hf_model`` (seq-cls: a fresh head seeded by the run's seed), the texts are tokenized
and batched by the product's ``read_text_data``/``batches`` and the loss is its ``step_loss``; the optimiser is
AdamW with linear warm-up and cosine decay (``make_optimizer``). Only what trains differs:

* ``sparse``: ``fps_graph.training.sparse.attach`` with a masks file (the head trains in full for seq-cls; no
  biases, so that the count equals LoRA's on the same modules). ``scale="input"`` reparametrises each delta as
  ``c_i * theta_i`` with ``c_i = median_j E|x_j| / E|x_col(i)|`` over the layer's input features (candidate (a)
  of issue 16: with Adam an entry then moves its output by about the same amount whatever its input's scale).
* ``lora``: PEFT LoRA on the blocks' Linear layers, rank per module from ``rank_pattern``; seq-cls head in
  ``modules_to_save``.
* ``full``: every parameter. ``head``: the seq-cls head only. ``none``: no training (evaluation only).

Returns metrics on validation and test, seconds per step and peak RSS (VmHWM reset at the start of training).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from fps_graph.training.sparse import SparseDelta

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
    scale: str | None = None  # sparse: None | "input"
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


def build(folder: Path, task: Task, spec: Spec, classes: int | None) -> tuple[Any, list[Any], dict[str, Any]]:
    """The model with what the spec trains: (model, trainable parameters, info)."""
    import torch

    from fps_graph.training.hf import head_module, load_hf_model
    from fps_graph.training.sparse import attach, replace_head

    model = load_hf_model(folder, task.kind)
    info: dict[str, Any] = {}
    head = None
    if task.kind == "seq-cls":
        head = head_module(model, "seq-cls")
        replace_head(model, head, int(classes), spec.seed)
        model.config.num_labels = int(classes)
        model.num_labels = int(classes)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = int(model.config.eos_token_id)
    total = sum(p.numel() for p in model.parameters())
    block = sum(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in BLOCK_LINEARS)
    info.update(total_params=int(total), block_linear_params=int(block))
    if spec.kind == "sparse":
        from fps_graph.training.hf import canonical_masks

        handle = attach(model, canonical_masks(model, spec.masks), head=head, train_bias=False,
                        train_head=head is not None, seed=spec.seed)
        if spec.scale == "input":
            info["scale"] = scale_deltas(handle, spec.masks, spec.stats)
        params = handle.trainable_parameters()
        c = handle.counts()
        info.update(selected=c["selected"], trainable=c["trainable"], head=c["full_tensors"])
        info["_handle"] = handle
    elif spec.kind == "lora":
        from peft import LoraConfig, get_peft_model

        ranks = spec.lora_ranks
        default_r = max(ranks.values())
        cfg = LoraConfig(r=default_r, lora_alpha=default_r * spec.lora_alpha_ratio, lora_dropout=0.0,
                         target_modules=sorted({k.rsplit(".", 1)[-1] for k in ranks}),
                         rank_pattern={k: v for k, v in ranks.items()},
                         alpha_pattern={k: v * spec.lora_alpha_ratio for k, v in ranks.items()},
                         modules_to_save=[head] if head else None, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        info.update(selected=int(lora), trainable=int(sum(p.numel() for p in params)))
    elif spec.kind == "full":
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        info.update(selected=int(total), trainable=int(total))
    elif spec.kind in ("head", "none"):
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        if spec.kind == "head" and head:
            params = list(model.get_submodule(head).parameters())
            for p in params:
                p.requires_grad_(True)
        info.update(selected=0, trainable=int(sum(p.numel() for p in params)))
    else:
        raise ValueError(spec.kind)
    return model, params, info


def load_task_data(folder: Path, task: Task, test: bool = True) -> tuple[Any, Any, Any, int, int | None]:
    """Tokenized train/val/test of a task with the model's tokenizer; the tokenizer's pad id; the class count."""
    from fps_graph.training.hf import TextOptions, Tokenizer, _config_json, read_text_data

    tok = Tokenizer(folder, _config_json(folder))
    topts = TextOptions()
    train = read_text_data(task.train, task.kind, tok, topts, task.max_length)
    val = read_text_data(task.val, task.kind, tok, topts, task.max_length, classes=train.classes or None)
    tst = read_text_data(task.test, task.kind, tok, topts, task.max_length, classes=train.classes or None) \
        if test else None
    return train, val, tst, tok.pad_id, (len(train.classes) if task.kind == "seq-cls" else None)


def run(folder: Path, task: Task, spec: Spec, threads: int | None = None, test: bool = True,
        progress: bool = False) -> dict[str, Any]:
    """Train one spec on one task; returns the record (metrics, counts, time, memory)."""
    import torch

    from fps_graph.training import train as tr
    from fps_graph.training.hf import batches, evaluate_text, step_loss

    if threads:
        torch.set_num_threads(threads)
    train, val, tst, tok_pad, classes = load_task_data(folder, task, test)
    rec: dict[str, Any] = {"method": spec.method, "kind": spec.kind, "lr": spec.lr, "seed": spec.seed,
                           "task": task.name, "model": folder.name}
    t_setup = time.perf_counter()
    prev_det = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        tr.deterministic(True)
        try:
            model, params, info = build(folder, task, spec, classes)
            handle = info.pop("_handle", None)
            rec.update(info)
            pad_id = int(getattr(model.config, "pad_token_id", None) or tok_pad)
            rec["setup_seconds"] = round(time.perf_counter() - t_setup, 2)
            n_train = min(len(train), task.max_train or len(train))
            steps = []
            mem = tr.PeakMemory("cpu")
            if spec.kind != "none":
                opts = SimpleNamespace(optimizer="adamw", lr=spec.lr, weight_decay=0.0, max_samples=n_train,
                                       batch_size=task.batch_size, epochs=task.epochs,
                                       warmup_epochs=0.3, min_lr=0.0)
                optim, sched, _ = tr.make_optimizer(params, opts, len(train))
                model.train()
                if handle is not None:
                    handle.train(True)
                mem.start()
                losses = []
                for epoch in range(1, task.epochs + 1):
                    for b in batches(train, task.batch_size, pad_id, shuffle=True,
                                     seed=spec.seed * 100003 + epoch, max_samples=n_train):
                        t0 = time.perf_counter()
                        loss, n, _ = step_loss(model, b, task.kind, "cpu")
                        if not torch.isfinite(loss):
                            rec["diverged"] = True
                            break
                        optim.zero_grad(set_to_none=True)
                        loss.backward()
                        optim.step()
                        sched.step()
                        steps.append(time.perf_counter() - t0)
                        losses.append(float(loss.detach()))
                        if progress and len(steps) % 10 == 0:
                            print(f"  step {len(steps)} loss {np.mean(losses[-10:]):.3f} "
                                  f"{np.mean(steps[-10:]):.2f} s/step", flush=True)
                    if rec.get("diverged"):
                        break
                rec["memory"] = mem.report()
                rec["steps"] = len(steps)
                rec["seconds_per_step"] = round(float(np.median(steps)), 4) if steps else None
                rec["train_seconds"] = round(float(np.sum(steps)), 2)
                rec["train_loss_last"] = float(np.mean(losses[-10:])) if losses else None
            model.eval()
            ev = {}
            for split, data in (("val", val), ("test", tst)):
                if data is None:
                    continue
                t0 = time.perf_counter()
                ev[split] = evaluate_text(model, data, task.kind, 32, pad_id, "cpu")
                ev[split]["seconds"] = round(time.perf_counter() - t0, 2)
            rec["metrics"] = ev
        finally:
            tr.deterministic(prev_det)
    return rec


def score(rec: dict[str, Any], split: str) -> float:
    """The number a method is judged by: accuracy (seq-cls), minus loss per token (causal-lm); higher is better."""
    m = rec["metrics"][split]
    if rec.get("diverged") or not math.isfinite(m["loss"]):
        return float("-inf") if "ppl" in m else 0.0
    return m["acc"] if "ppl" not in m else -m["loss"]
