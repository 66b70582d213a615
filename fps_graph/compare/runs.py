"""One training run of a comparison: a fresh model from its folder, an adapter, the one training loop
(``fps_graph.training.fit``), then the task's metrics on the evaluation splits; returns the run record the reports
read (``report``). ``fps-graph compare`` and the LM study (bench/quality_lm) run every method through this.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from fps_graph.training.adapters import Adapter, SparseAdapter
from fps_graph.training.config import DataConfig, OptimConfig, RunConfig, TrainsConfig
from fps_graph.training.loop import Callbacks, evaluate, fit, prepare, resolve_device
from fps_graph.training.models import load_hf_model
from fps_graph.training.tasks.base import Task, TaskData

__all__ = ["train_run", "EVAL_BATCH"]

EVAL_BATCH = 32


def train_run(folder: Path, task: Task, train: TaskData, evals: Mapping[str, TaskData], adapter: Adapter | None,
              optim: OptimConfig, run: RunConfig, *, data_config: DataConfig | None = None,
              callbacks: Callbacks | Sequence[Callbacks] | None = None,
              trains: TrainsConfig | None = None) -> dict[str, Any]:
    """Train ``adapter`` on a fresh model from ``folder`` and score it on every split of ``evals``.

    Args:
        folder: the Hugging Face model folder (loaded anew for every run, with the task's Auto class).
        task: the task object that read the data; train, evals: its data (evals: {"val": ..., "test": ...}).
        adapter: what trains; None: nothing trains, the model (with the task head set up as the runs have it,
            seeded by ``run.seed``) is scored as it is: the reference of an untrained model.
        optim, run: the optimiser and schedule, and seed/threads/device (``run.output`` None: no run folder).
        data_config: the data options (``max_samples`` limits the training samples).
        callbacks: the loop's callbacks (progress, per-epoch records).
        trains: with adapter None, what the head setup follows [default: TrainsConfig()].

    Returns:
        The record: ``total_params``, ``selected`` (the adapter's own values), ``trainable`` (with what trains in
        full, e.g. the head), ``head`` (values trained in full), ``memory``, ``steps``, ``seconds_per_step``
        (median), ``train_seconds``, ``train_loss_last``, ``machine``, ``diverged`` (true when the loss became
        non-finite: training stopped there), ``setup_seconds`` and ``metrics`` per split (loss, acc, ppl for
        causal-lm, seconds).
    """
    t_setup = time.perf_counter()
    model = load_hf_model(folder, task.hf_class)
    rec: dict[str, Any] = {"total_params": int(sum(p.numel() for p in {id(p): p for p in model.parameters()}
                                                  .values()))}
    device = resolve_device(run.device)
    if adapter is None:
        model.eval()
        if task.find_head(model, train) is None:       # no head to set up (causal-lm): the model as it is
            trained = model
        else:                                          # seq-cls: the head as every method has it (new: seeded)
            trained = prepare(model, SparseAdapter(None, trains or TrainsConfig()), task, train,
                              run.seed).handle.model
        trained.to(device)
        rec.update(selected=0, trainable=0, head=0, diverged=False)
    else:
        res = fit(model, adapter, task, train, None, optim, run, callbacks, data_config=data_config)
        m, trained = res.metrics, res.handle.model
        tr = m["trainable"]
        rec.update(selected=tr["trainable"] if tr["kind"] == "full" else tr["adapter_values"],
                   trainable=tr["trainable"], head=tr["full_tensors"], memory=m["memory"], steps=m["time"]["steps"],
                   seconds_per_step=m["time"]["seconds_per_step_median"] or None,
                   train_seconds=round(m["time"]["seconds_per_step"] * m["time"]["steps"], 2),
                   train_loss_last=m["epochs"][-1]["train_loss"] if m["epochs"] else None,
                   machine=m["machine"], diverged=bool(m.get("diverged")))
    rec["setup_seconds"] = round(time.perf_counter() - t_setup, 2)
    metrics = {}
    for split, data in evals.items():
        t0 = time.perf_counter()
        metrics[split] = evaluate(trained, task, data, EVAL_BATCH, device)
        metrics[split]["seconds"] = round(time.perf_counter() - t0, 2)
    rec["metrics"] = metrics
    del model, trained
    gc.collect()                       # one run's model and optimiser state gone before the next loads
    return rec
