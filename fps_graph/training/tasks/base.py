"""What a task supplies to the one training loop: its data (read, batched, collated), its head, its loss and
metrics. A task is one file in this folder with a ``Task`` subclass, registered in ``tasks/__init__.py``.

The loop (``fps_graph.training.loop.fit``) asks a task, in order: ``find_head`` (which module is the task head, for
a head the options do not name), ``plan_head`` (how many classes the head needs, whether it is new, and setup
warnings, said before training), ``prepare_model`` (after the head is set up), then ``step`` per batch (the
mean loss to backpropagate and what it was averaged over) and ``summarize`` (sums to the epoch's metrics).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import numpy as np

from fps_graph.training.config import DataConfig, TrainsConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Task", "TaskData", "DataContext", "Step", "HeadPlan"]


class TaskData(abc.ABC):
    """Samples of a task, ready to batch: a length, class names (classification), notes about the data, and
    collation of any set of indices into one batch of arrays."""

    classes: list[str]
    notes: list[str]

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of samples."""

    @abc.abstractmethod
    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """One batch: the samples at indices, as arrays."""

    def order(self, shuffle: bool = False, seed: int = 0, max_samples: int | None = None) -> np.ndarray:
        """Sample indices in feeding order: a seeded permutation (shuffle), cut to max_samples."""
        n = len(self)
        idx = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        return idx[:max_samples] if max_samples is not None else idx

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches of batch_size samples in ``order``."""
        order = self.order(shuffle, seed, max_samples)
        for i in range(0, len(order), batch_size):
            yield self.collate(order[i:i + batch_size])


@dataclass
class DataContext:
    """What a task may need to read its data: the model, its Hugging Face folder (tokenizer, config.json), the
    masks file's record of how `select` prepared its data, and the data options."""

    model: "nn.Module"
    config: DataConfig
    folder: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)
    masks: str | None = None


@dataclass
class Step:
    """One batch through the model: the mean loss (a tensor to backpropagate), what it is the mean over (samples
    or predicted tokens), the correct predictions among them, and the batch's sample count."""

    loss: "torch.Tensor"
    n: float
    correct: float
    samples: int


@dataclass
class HeadPlan:
    """How the task head is set up: classes it must predict (None: as it is), whether it is new (not in the
    checkpoint), and warnings for the user (said before training)."""

    num_classes: int | None = None
    fresh: bool = False
    warnings: list[str] = field(default_factory=list)


class Task(abc.ABC):
    """A training task: its data, head, loss and metrics."""

    name: ClassVar[str]
    hf_class: ClassVar[str | None] = None      # the transformers Auto class of hf:DIR models, None: factories only
    extra_metrics: ClassVar[tuple[str, ...]] = ()   # beside loss and acc (e.g. ppl)

    @abc.abstractmethod
    def read(self, path: str, ctx: DataContext, classes: list[str] | None = None) -> TaskData:
        """The samples at path (classes: the training set's, which validation data must use)."""

    def record(self) -> dict[str, Any]:
        """How the data was prepared (after read), for metrics.json and the delta metadata."""
        return {}

    def notes(self) -> list[str]:
        """What the summary says about the data preparation (after read)."""
        return []

    def find_head(self, model: "nn.Module", data: TaskData) -> str | None:
        """The task head module when the options name none (None: the task has no head)."""
        return None

    def plan_head(self, model: "nn.Module", head: str | None, data: TaskData, trains: TrainsConfig) -> HeadPlan:
        """The head's classes, whether it is new, and setup warnings."""
        return HeadPlan(trains.num_classes)

    def prepare_model(self, model: "nn.Module", head: Any) -> None:
        """Adjust the model after the head is set up (e.g. config.num_labels)."""

    @abc.abstractmethod
    def step(self, model: "nn.Module", batch: dict[str, np.ndarray], device: str, label_smoothing: float) -> Step:
        """The batch's mean loss and counts."""

    def summarize(self, loss_sum: float, n: float, correct: float) -> dict[str, float]:
        """An epoch's metrics from its sums: loss (mean per sample or token), acc, and the task's extras."""
        loss = loss_sum / max(n, 1.0)
        out = {"loss": loss, "acc": correct / max(n, 1.0)}
        if "ppl" in self.extra_metrics:
            out["ppl"] = math.exp(min(loss, 700.0))
        return out

    def epoch_extras(self, n: float) -> dict[str, Any]:
        """Extra per-epoch records from the epoch's count (e.g. tokens learnt)."""
        return {}
