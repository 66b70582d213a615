"""Sequence classification (``seq-cls``): one label per text; cross-entropy, loss and accuracy.

Data: ``.jsonl`` records with the text under ``text_field`` and the label under ``label_field`` (integers, or
strings mapped through the model's ``label2id`` when it names them all, else sorted). The head is the ``nn.Linear``
with ``config.num_labels`` outputs (``score``, ``classifier``); a label count different from its size, or a head
the checkpoint lacks (a causal-LM folder), gives a fresh, seeded head, which trains in full.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fps_graph.data.text import read_texts
from fps_graph.errors import DataError, ModelError, OptionError
from fps_graph.training.config import TrainsConfig
from fps_graph.training.heads import HeadInfo, num_labels_head
from fps_graph.training.models import read_config
from fps_graph.training.tasks.base import DataContext, HeadPlan, Step, Task
from fps_graph.training.tasks.text import TextData, check_lengths, text_setup

__all__ = ["SequenceClassification"]


class SequenceClassification(Task):
    """Text classification (Hugging Face AutoModelForSequenceClassification)."""

    name = "seq-cls"
    hf_class = "AutoModelForSequenceClassification"

    def __init__(self) -> None:
        self._record: dict[str, Any] = {}

    def read(self, path: str, ctx: DataContext, classes: list[str] | None = None) -> TextData:
        setup = text_setup(ctx)
        self._record = setup.record
        cfg = ctx.config
        samples = read_texts(path, cfg.text.text_field, {cfg.label_field: "--label-field"})
        where = [f"{s.file}:{s.line}" for s in samples]
        toks = setup.tokenizer.tokenize([s.text for s in samples], setup.max_length, truncate=False, where=where)
        ids = [toks.sample(i) for i in range(len(toks))]
        check_lengths(ids, where, setup.max_length, min_tokens=1)
        label2id = read_config(ctx.folder).get("label2id") if ctx.folder is not None else None
        y, names = _labels(path, [s.extra[cfg.label_field] for s in samples], where, classes, label2id)
        pad = getattr(getattr(ctx.model, "config", None), "pad_token_id", None)
        return TextData(ids, np.zeros(len(ids), dtype=np.int64), y, names, path,
                        pad_id=int(pad) if isinstance(pad, int) else setup.tokenizer.pad_id)

    def record(self) -> dict[str, Any]:
        return dict(self._record)

    def find_head(self, model: torch.nn.Module, data: TextData) -> str | None:
        head = num_labels_head(model)
        if head is None:
            n = getattr(getattr(model, "config", None), "num_labels", None)
            raise ModelError(f"cannot find the classification head (an nn.Linear with {n} outputs); name it "
                                "with --head")
        return head

    def plan_head(self, model: torch.nn.Module, head: str | None, data: TextData, trains: TrainsConfig) -> HeadPlan:
        n = len(data.classes)
        num_classes = trains.num_classes or n
        if n and num_classes < n:
            raise OptionError(f"{data.source} has {n} classes, more than --num-classes {num_classes}")
        # a head the checkpoint lacks (a causal-LM folder trained for seq-cls) is new: seeded like a replaced one
        fresh = head is not None and any(k.startswith(head + ".") for k in getattr(model, "fps_missing_keys", []))
        warnings = []
        if fresh and not trains.train_head:
            raise OptionError(f"head {head} is not in the checkpoint (a new, random module): it must be trained; "
                                "drop --no-train-head")
        return HeadPlan(num_classes, fresh, warnings)

    def prepare_model(self, model: torch.nn.Module, head: HeadInfo | None) -> None:
        if head is not None and head.replaced and head.num_classes:
            model.config.num_labels = int(head.num_classes)
            model.num_labels = int(head.num_classes)
        if getattr(model.config, "pad_token_id", None) is None:     # the last real token is found through it
            eos = getattr(model.config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, list) and eos else eos
            model.config.pad_token_id = int(eos) if isinstance(eos, int) else 0

    def step(self, model: torch.nn.Module, batch: dict[str, np.ndarray], device: str, label_smoothing: float) -> Step:
        ids = torch.from_numpy(batch["input_ids"]).to(device)
        am = torch.from_numpy(batch["attention_mask"]).to(device)
        y = torch.from_numpy(batch["labels"]).to(device)
        logits = model(input_ids=ids, attention_mask=am).logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        n = int(y.numel())
        return Step(loss, float(n), float((logits.detach().argmax(-1) == y).sum()), n)


def _labels(path: str, labels: list[Any], where: list[str], classes: list[str] | None,
            label2id: dict[str, int] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names (a validation set uses the training set's names)."""
    for place, v in zip(where, labels):
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DataError(f"{place}: label {v!r} is neither an integer nor a string")
    if all(isinstance(v, int) for v in labels):
        if any(v < 0 for v in labels):
            raise DataError(f"{path}: labels must be non-negative")
        names = classes or [str(i) for i in range(max(labels) + 1)]
        if max(labels) >= len(names):
            raise DataError(f"{path}: label {max(labels)} is outside the {len(names)} training classes")
        return np.asarray(labels, dtype=np.int64), list(names)
    if not all(isinstance(v, str) for v in labels):
        raise DataError(f"{path}: labels mix integers and strings")
    if classes is None:
        found = sorted(set(labels))
        if label2id and set(found) <= set(label2id) and sorted(label2id.values()) == list(range(len(label2id))):
            classes = sorted(label2id, key=label2id.__getitem__)
        else:
            classes = found
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not among the training classes {classes}")
    return np.asarray([index[v] for v in labels], dtype=np.int64), list(classes)
