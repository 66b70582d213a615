"""The one training loop: data -> step -> metrics -> run folder, for every task and every adapter.

``fit(model, adapter, task, train_data, val_data, optim, run)`` sets up the task head, attaches the adapter,
trains epochs of seeded shuffled batches with the optimiser and schedule of ``optim``, measures loss and the
task's metrics per epoch, time per step and peak memory, and writes the run folder (``rundir``). It never prints:
what a caller wants to show arrives through ``Callbacks`` (setup, including warnings, before the first step; each
epoch; progress; the end). Training is seeded and, on CPU, deterministic: the same inputs give the same values bit
for bit.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fps_graph._version import __version__
from fps_graph.errors import DataError, OptionError, RuntimeFailure
from fps_graph.training.adapters import Adapter, Attached
from fps_graph.training.config import DataConfig, OptimConfig, RunConfig, settings
from fps_graph.training.heads import setup_head
from fps_graph.training.metrics import PeakMemory, StepTimer, machine, plot_curves
from fps_graph.training.optim import clip_gradients, make_optimizer
from fps_graph.training.rundir import FILES, prepare_output, write_json
from fps_graph.training.sparse import save_state_dict
from fps_graph.training.summary import state_memory
from fps_graph.training.tasks.base import Task, TaskData

__all__ = ["Callbacks", "CallbackList", "TrainResult", "Setup", "Prepared", "fit", "prepare", "evaluate", "deterministic", "resolve_device"]

ProgressFactory = Callable[[int, str], Callable[[int], None]]


@dataclass
class Setup:
    """What a run is about to do, given to ``Callbacks.on_setup`` before the first step."""

    handle: Attached
    summary: dict[str, Any]
    warnings: list[str]
    notes: list[str]
    head_from: str | None


class Callbacks:
    """Hooks of a run (all optional; override what you need). ``on_attach`` may raise to refuse a run before any
    training; ``on_end`` may add files to the run folder (return {role: path})."""

    def on_attach(self, handle: Attached) -> None:
        """The adapter is attached; nothing is trained or written yet."""

    def on_setup(self, setup: Setup) -> None:
        """Before the first step: the trainable summary, setup warnings and notes."""

    def progress(self, total: int, desc: str) -> Callable[[int], None] | None:
        """A callback taking the number of samples done, for one epoch (None: no progress)."""
        return None

    def on_epoch(self, record: dict[str, Any]) -> None:
        """After each epoch: its metrics record."""

    def on_end(self, handle: Attached, folder: Path | None, metrics: dict[str, Any]) -> dict[str, str]:
        """After training, before metrics.json is written; returns files it wrote into the run folder."""
        return {}


class CallbackList(Callbacks):
    """Several callbacks as one, called in order (progress: the first that gives one; files: all merged)."""

    def __init__(self, callbacks: Sequence[Callbacks]):
        self.callbacks = list(callbacks)

    def on_attach(self, handle: Attached) -> None:
        for c in self.callbacks:
            c.on_attach(handle)

    def on_setup(self, setup: Setup) -> None:
        for c in self.callbacks:
            c.on_setup(setup)

    def progress(self, total: int, desc: str) -> Callable[[int], None] | None:
        for c in self.callbacks:
            p = c.progress(total, desc)
            if p is not None:
                return p
        return None

    def on_epoch(self, record: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_epoch(record)

    def on_end(self, handle: Attached, folder: Path | None, metrics: dict[str, Any]) -> dict[str, str]:
        files: dict[str, str] = {}
        for c in self.callbacks:
            files.update(c.on_end(handle, folder, metrics))
        return files


@dataclass
class TrainResult:
    """What training measured and wrote: metrics (metrics.json's content), files by role, warnings, the handle."""

    metrics: dict[str, Any]
    files: dict[str, str]
    warnings: list[str]
    handle: Any = None


def resolve_device(name: str) -> str:
    """cpu, cuda[:N] (refused when PyTorch sees no CUDA device), or auto."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeFailure("--device cuda asked for, but PyTorch sees no CUDA device")
    return name


def deterministic(mode: bool, warn_only: bool = False) -> None:
    """torch.use_deterministic_algorithms without its import of the compiler stack: in torch 2.13 it imports
    torch._inductor only to set a flag for compiled code (3-6 s on 2 busy cores; nothing here is compiled)."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor" in sys.modules:   # inductor loaded: keep its flag in step, at no cost
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


def evaluate(model: torch.nn.Module, task: Task, data: TaskData, batch_size: int, device: str,
             label_smoothing: float = 0.0) -> dict[str, float]:
    """The task's metrics of a model over data (eval mode, no gradients)."""
    was = model.training
    model.eval()
    loss_sum, n_sum, correct = 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch in data.batches(batch_size):
            s = task.step(model, batch, device, label_smoothing)
            loss_sum += float(s.loss) * s.n
            n_sum += s.n
            correct += s.correct
    model.train(was)
    return task.summarize(loss_sum, n_sum, correct)


def fit(model: torch.nn.Module, adapter: Adapter, task: Task, train_data: TaskData, val_data: TaskData | None,
        optim: OptimConfig, run: RunConfig, callbacks: Callbacks | Sequence[Callbacks] | None = None, *,
        data_config: DataConfig | None = None, model_info: dict[str, Any] | None = None) -> TrainResult:
    """Train ``adapter`` on ``model`` for ``task``; write the run folder (``run.output``, unless None).

    Args:
        model: the PyTorch model (moved to ``run.device``; its head may be replaced, the adapter attaches to it).
        adapter: what trains (SparseAdapter, LoraAdapter, FullAdapter, ...).
        task: the task object that read the data (``tasks.get_task(name)``).
        train_data, val_data: the task's data (``task.read(path, ctx)``); val_data may be None.
        optim: optimiser, schedule, epochs, batch size, label smoothing.
        run: output folder, seed, device, threads, plot, merged weights, gradient checkpointing.
        callbacks: hooks (setup warnings before training, per-epoch records, progress, extra outputs).
        data_config: the data options (max_samples is used; all are recorded in the settings).
        model_info: what the model is (base_model, base_weights, weights_sha256), for the run records.

    Returns:
        TrainResult with metrics.json's content, the files written, warnings and the attached handle.

    Example:
        >>> task = get_task("seq-cls")
        >>> ctx = DataContext(model, DataConfig(data="train.jsonl"), folder=Path("model_dir"))
        >>> train = task.read("train.jsonl", ctx)
        >>> res = fit(model, LoraAdapter(rank=4, target_modules=("q_proj", "v_proj")), task, train, None,
        ...           OptimConfig(lr=1e-3, epochs=3, batch_size=8), RunConfig(output=None))
        >>> res.metrics["time"]["seconds_per_step"], res.metrics["memory"]["peak_rss_mb"]
    """
    cb = callbacks if isinstance(callbacks, Callbacks) else CallbackList(callbacks or ())
    max_samples = data_config.max_samples if data_config is not None else None
    info = dict(model_info or {})
    device = resolve_device(run.device)
    if len(train_data) == 0:
        raise DataError(f"{getattr(train_data, 'source', 'the training data')}: no training samples")
    t_start = time.perf_counter()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    made: Path | None = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)
            deterministic(True, warn_only=device != "cpu")
            if run.threads:
                torch.set_num_threads(run.threads)
            model.to(device)
            prep = prepare(model, adapter, task, train_data, run.seed)
            handle, warnings, notes, head_from = prep.handle, prep.warnings, prep.notes, prep.head_from
            cb.on_attach(handle)                        # may refuse (e.g. --peft), before anything is written
            if run.gradient_checkpointing:
                _checkpointing(model)
            out = None
            if run.output is not None:
                out, made = prepare_output(run.output, run.force)      # only now: bad input leaves nothing behind
            summary = handle.summary().to_json()
            warnings = list(train_data.notes) + (list(val_data.notes) if val_data is not None else []) + warnings
            notes = task.notes() + notes
            cb.on_setup(Setup(handle, summary, list(warnings), list(notes), head_from))
            metrics = _epochs(model, handle, task, train_data, val_data, optim, run, device, cb, max_samples)
            metrics.update(task=task.name, adapter=adapter.describe(), trainable=summary,
                           trained_in_full=summary["trained_in_full"],
                           superseded=list(getattr(handle, "superseded", [])), notes=notes,
                           head=summary["head"], head_from=head_from, classes=list(train_data.classes),
                           samples={"train": min(len(train_data), max_samples or len(train_data)),
                                    "val": len(val_data) if val_data is not None else 0},
                           settings=settings(*(c for c in (adapter.trains, optim, data_config, run) if c)),
                           model=info, data=task.record(), warnings=warnings, plot=None, machine=machine(device))
            metrics["memory"]["train_state"] = state_memory(handle.summary(), optim.optimizer.value)
            files = _write(out, handle, task, adapter, metrics, run, train_data, info, cb) if out else {}
            metrics["time"]["total_seconds"] = round(time.perf_counter() - t_start, 3)
            if out is not None:
                write_json(out / FILES["metrics"], metrics)
                files["metrics"] = str(out / FILES["metrics"])
    except BaseException:
        if made is not None:                             # a failed run leaves no folder of its own behind
            shutil.rmtree(made, ignore_errors=True)
        raise
    finally:
        deterministic(prev_det)
        torch.set_num_threads(prev_threads)
    return TrainResult(metrics, files, warnings, handle)


@dataclass
class Prepared:
    """A model made trainable by ``prepare``: the adapter's handle, setup warnings and notes, where the head came
    from ('option', 'detected' or None)."""

    handle: Attached
    warnings: list[str]
    notes: list[str]
    head_from: str | None


def prepare(model: torch.nn.Module, adapter: Adapter, task: Task, data: TaskData, seed: int = 0) -> Prepared:
    """The task head (found, planned, replaced by a seeded one when new or resized), then the adapter attached:
    the model as ``fit`` trains it (also for work outside the loop, e.g. gradients for a GPS-style selection)."""
    trains = adapter.trains
    name = trains.head
    head_from = "option" if name else None
    if name is None:
        model.eval()
        name = task.find_head(model, data)
        head_from = "detected" if name else None
    plan = task.plan_head(model, name, data, trains)
    head = setup_head(model, name, plan.num_classes, seed=seed, train_head=trains.train_head, fresh=plan.fresh)
    task.prepare_model(model, head)
    handle = adapter.attach(model, head, seed=seed)
    notes = [n for n in handle.notes if not n.startswith(("head: ", "trained in full instead of sparsely"))]
    if plan.fresh and head is not None:
        notes.append(f"head {head.name}: not in the checkpoint; a new seeded head (--seed {seed})")
    return Prepared(handle, list(plan.warnings), notes, head_from)


def _checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise OptionError("gradient checkpointing needs a Hugging Face model (hf:DIR)")


def _epochs(model: torch.nn.Module, handle: Attached, task: Task, train_data: TaskData, val_data: TaskData | None,
            optim: OptimConfig, run: RunConfig, device: str, cb: Callbacks,
            max_samples: int | None) -> dict[str, Any]:
    n_train = min(len(train_data), max_samples or len(train_data))
    steps_per_epoch = -(-n_train // optim.batch_size)
    params = handle.trainable_parameters()
    opt, sched = make_optimizer(params, optim, steps_per_epoch)
    bs, ls = optim.batch_size, optim.label_smoothing
    initial = evaluate(model, task, val_data, bs, device, ls) if val_data is not None else None
    mem = PeakMemory(device)
    timer = StepTimer(device)
    mem.start()
    epochs: list[dict[str, Any]] = []
    diverged: dict[str, Any] | None = None
    t0 = time.perf_counter()
    seen = 0
    for epoch in range(1, optim.epochs + 1):
        te = time.perf_counter()
        progress = cb.progress(n_train, f"epoch {epoch}/{optim.epochs}")
        handle.train(True)
        loss_sum, n_sum, correct = 0.0, 0.0, 0.0
        for batch in train_data.batches(bs, shuffle=True, seed=run.seed * 100003 + epoch, max_samples=max_samples):
            ts = timer.now()
            s = task.step(model, batch, device, ls)
            if not torch.isfinite(s.loss):
                bad = float(s.loss.detach())
                if not run.stop_on_divergence:
                    raise RuntimeFailure(f"the loss became {bad} in epoch {epoch}; lower --lr")
                diverged = {"epoch": epoch, "step": len(timer.seconds) + 1, "loss": str(bad)}
                break
            opt.zero_grad(set_to_none=True)
            s.loss.backward()
            clip_gradients(params, optim.grad_clip)
            opt.step()
            sched.step()
            timer.add(timer.now() - ts)
            loss_sum += float(s.loss.detach()) * s.n
            n_sum += s.n
            correct += s.correct
            seen += s.samples
            if progress:
                progress(s.samples)
        handle.train(False)
        if diverged is not None:
            break
        rec: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in task.summarize(loss_sum, n_sum,
                                                                                              correct).items()}}
        rec.update({f"train_{k}": v for k, v in task.epoch_extras(n_sum).items()})
        rec["lr"] = opt.param_groups[0]["lr"]
        if val_data is not None:
            rec.update({f"val_{k}": v for k, v in evaluate(model, task, val_data, bs, device, ls).items()})
        rec["seconds"] = round(time.perf_counter() - te, 3)
        epochs.append(rec)
        cb.on_epoch(rec)
    train_seconds = time.perf_counter() - t0
    memory = mem.report()
    model.eval()
    return {"epochs": epochs, "diverged": diverged,
            "initial": {f"val_{k}": v for k, v in initial.items()} if initial else None,
            "final": {k: v for k, v in epochs[-1].items() if k not in ("epoch", "seconds", "lr")} if epochs else {},
            "memory": memory,
            "time": {"train_seconds": round(train_seconds, 3),
                     "samples_per_s": round(seen / train_seconds, 2) if train_seconds > 0 else 0.0,
                     **timer.report()}}


def _write(out: Path, handle: Attached, task: Task, adapter: Adapter, metrics: dict[str, Any], run: RunConfig,
           train_data: TaskData, info: dict[str, Any], cb: Callbacks) -> dict[str, str]:
    """The run folder: the adapter's files, merged weights, run_config.json, the plot, the callbacks' files."""
    meta = {"training": metrics["settings"], "task": task.name, "classes": list(train_data.classes),
            "base_model": info.get("base_model", ""), "weights_sha256": info.get("weights_sha256", ""),
            "data": metrics["data"]}
    files = handle.write_files(out, meta)
    if run.save_merged:
        save_state_dict(handle.merged_state_dict(), out / FILES["merged"], force=True,
                        metadata={"format": "pt", "fps_graph": "merged state dict"})
        files["merged"] = str(out / FILES["merged"])
    masks = getattr(handle, "masks", None)
    mmeta = masks.metadata if masks is not None else {}
    summary = metrics["trainable"]
    write_json(out / FILES["run_config"], {
        "format": "fps-graph-run", "task": task.name, "adapter": adapter.describe(),
        "base_model_name_or_path": info.get("base_model", ""), "base_weights": info.get("base_weights"),
        "masks": adapter.describe().get("masks"), "masks_sha256": masks.sha256 if masks is not None else None,
        "onnx_model_sha256": mmeta.get("model_sha256"),
        "selection": {k: mmeta.get(k) for k in ("score", "stat", "k", "budget", "granularity")},
        "target_tensors": sorted(getattr(handle, "deltas", {})),
        "modules_to_save": sorted(summary["trained_in_full"]),
        "head": summary["head"], "num_classes": (summary["head"] or {}).get("num_classes"),
        "class_names": list(train_data.classes), "data": metrics["data"], "trainable": summary,
        "files": {k: Path(v).name for k, v in files.items()}, "inference_mode": True,
        "fps_graph_version": __version__})
    files["run_config"] = str(out / FILES["run_config"])
    if run.plot and metrics["epochs"]:
        err = plot_curves(metrics["epochs"], out / FILES["plot"], metrics["initial"])
        if err:
            metrics["warnings"].append(err)
            metrics["plot_warning"] = err
        else:
            metrics["plot"] = FILES["plot"]
            files["plot"] = str(out / FILES["plot"])
    files.update(cb.on_end(handle, out, metrics))
    return files
