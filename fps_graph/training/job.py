"""The `train` job: a model (a factory, or a Hugging Face folder), a task, data files and an adapter, into the one
loop (``loop.fit``). ``fps-graph train`` is a thin layer over ``run_train(TrainJob(...))``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from fps_graph.errors import DataError, OptionError
from fps_graph.data.text import TextOptions
from fps_graph.formats.io import sha256_file
from fps_graph.formats.masks import data_record
from fps_graph.training.adapters import Adapter, SparseAdapter
from fps_graph.training.config import DataConfig, ModelConfig, OptimConfig, RunConfig, StepScale, TrainsConfig
from fps_graph.training.loop import Callbacks, TrainResult, fit
from fps_graph.training.models import build_model, default_task, hf_folder, load_hf_model
from fps_graph.training.rundir import check_output
from fps_graph.training.tasks import TASKS, DataContext, get_task

__all__ = ["TrainJob", "run_train", "train_job"]


@dataclass(frozen=True)
class TrainJob:
    """One training run: what to train (model, task, adapter), on what (data), how (optim) and where (run).

    Args:
        model: the model (a factory and its weights, or a Hugging Face folder) and the task.
        adapter: what trains (``SparseAdapter(masks, trains)`` for `train`; LoRA, full fine-tuning...).
        data: training and validation data and how they become inputs.
        optim: optimiser, schedule, epochs, batch size.
        run: output folder, seed, device...
    """

    model: ModelConfig
    adapter: Adapter
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.model.task is not None and self.model.task not in TASKS:
            raise OptionError(f"unknown --task {self.model.task!r} (use {', '.join(TASKS)})")
        if not isinstance(self.adapter, Adapter):
            raise OptionError(f"adapter must be an Adapter (SparseAdapter, LoraAdapter...), not "
                                f"{type(self.adapter).__name__}")


def train_job(model: str, masks: Any, data: str, output: str | None = None, **options: Any) -> TrainJob:
    """A TrainJob from flat keyword options (the `train` flags' names, underscored), split into the configs by
    concern: ModelConfig (weights, task), TrainsConfig (head, num_classes, train_*), OptimConfig, DataConfig
    (text options: tokenizer, text_field, max_length), RunConfig. An unknown keyword is an error naming it.

    Example:
        >>> run_train(train_job("hf:llama/", "masks.safetensors", "train.txt", "run/", lr=3e-4, epochs=2))
    """
    def take(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        names = {f.name for f in fields(cls)} - set(skip)
        return {k: options.pop(k) for k in list(options) if k in names}

    text = TextOptions(truncate=False, **take(TextOptions, ("truncate",)))
    job = dict(model=ModelConfig(model, **take(ModelConfig, ("model",))),
               adapter=SparseAdapter(masks, TrainsConfig(**take(TrainsConfig)),
                                     step_scale=options.pop("step_scale", StepScale.INPUT)),
               data=DataConfig(data=data, text=text, **take(DataConfig, ("data", "text"))),
               optim=OptimConfig(**take(OptimConfig)), run=RunConfig(output=output, **take(RunConfig, ("output",))))
    if options:
        raise OptionError(f"unknown training option(s): {', '.join(sorted(options))}")
    return TrainJob(**job)


def run_train(job: TrainJob, callbacks: Callbacks | Sequence[Callbacks] | None = None) -> TrainResult:
    """Build the model, read the data as the task reads it, and train through ``loop.fit``; returns its result."""
    spec, weights_file = job.model.model, job.model.weights
    folder = hf_folder(spec)
    task = get_task(job.model.task or (default_task(folder) if folder is not None else "image-cls"))
    if folder is None and task.hf_class is not None:
        raise OptionError(f"--task {task.name} needs a Hugging Face model folder (hf:DIR), not a factory")
    if folder is not None and task.hf_class is None:
        raise OptionError(f"--task {task.name} is not supported for Hugging Face models; use causal-lm or seq-cls")
    if folder is not None and weights_file:
        raise OptionError("--weights does not apply to hf:DIR (the weights come from the folder's safetensors)")
    if job.run.output is not None:
        check_output(job.run.output, job.run.force)
    masks = job.adapter.masks if isinstance(job.adapter, SparseAdapter) else None
    masks_path = str(masks) if isinstance(masks, (str, os.PathLike)) else None
    record = data_record(masks_path) if masks_path else {"kind": "none"}
    if folder is not None:
        model = load_hf_model(folder, task.hf_class)
        weights = sorted(folder.glob("*.safetensors"))
        info: dict[str, Any] = {"base_model": str(folder), "base_weights": None,
                                "weights_sha256": sha256_file(weights[0]) if len(weights) == 1 else ""}
    else:
        model = build_model(spec, weights_file)
        info = {"base_model": spec, "base_weights": weights_file,
                "weights_sha256": sha256_file(weights_file) if weights_file else ""}
    ctx = DataContext(model, job.data, folder, record, masks_path)
    train = task.read(job.data.data, ctx)
    if len(train) == 0:
        raise DataError(f"{job.data.data}: no training samples")
    val = task.read(job.data.val, ctx, classes=train.classes or None) if job.data.val else None
    return fit(model, job.adapter, task, train, val, job.optim, job.run, callbacks, data_config=job.data,
               model_info=info)
