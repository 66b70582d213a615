"""The options of ``fps-graph compare``: one frozen config, validated once; each field carries its help text (and
the flag that sets it) in ``metadata``, which the CLI reads, so help, defaults and docs cannot drift apart.

torch-free: the CLI reads this module for its help without importing torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fps_graph.errors import DataError, OptionError
from fps_graph.selection.scores import SCORES, get_score

__all__ = ["CompareConfig", "TASKS", "OTHER_METHODS", "DEFAULT_METHODS", "DEFAULT_SCORE", "sparse_methods"]

TASKS = ("seq-cls", "causal-lm")
DEFAULT_SCORE = "fps"                     # `select`'s default --score: what a user gets without choosing
OTHER_METHODS = ("lora", "head")          # beside the selections: LoRA at the same count, the head-only floor
DEFAULT_METHODS = (DEFAULT_SCORE, "random", "lora", "head")


def sparse_methods() -> tuple[str, ...]:
    """The selection scores compare can train (select's registry, less those needing anchor data)."""
    return tuple(s for s in SCORES if not get_score(s).anchor)   # anchor data: compare has none to give


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class CompareConfig:
    """A comparison of selections (the default, random, ...) and LoRA at the same trainable count on one Hugging
    Face model and one's own data: learning rates swept and chosen on validation, then several seeds."""

    model: str = field(metadata={"flag": "MODEL", "help": (
        "A Hugging Face model folder (hf:DIR, or a folder holding config.json and *.safetensors).")})
    train: str = field(metadata={"flag": "--train", "help": (
        "Training data (.jsonl: one record per line with the text, and for seq-cls the label; .txt for causal-lm). "
        "Also the calibration data of the selections.")})
    val: str = field(metadata={"flag": "--val", "help": (
        "Validation data, the same kind as --train: chooses each method's learning rate.")})
    output: str = field(metadata={"flag": "--output", "help": (
        "Run folder to create (compare.md, compare.json, compare.png, runs.jsonl, the ONNX export, statistics "
        "and masks).")})
    test: str | None = _opt(None, "Test data, the split the tables report [default: the validation data, which "
                                  "also chose the learning rates: optimistic for every method alike].", "--test")
    task: str | None = _opt(None, "seq-cls or causal-lm [default: from config.json's architectures].", "--task")
    methods: tuple[str, ...] = _opt(DEFAULT_METHODS, "Comma-separated methods: selection scores of `select` "
                                    "(fps, random, magnitude, ...), lora (PEFT, rank matched per module to the "
                                    "selection's count) and head (seq-cls: only the head trains; causal-lm: the "
                                    "model untrained). random is required: every method is compared with it.",
                                    "--methods")
    budgets: tuple[float, ...] = _opt((0.005,), "Fraction of each block Linear's weights the selections train, "
                                      "e.g. 0.5% (several, comma-separated: the sweep runs at the middle one).",
                                      "--budget")
    lrs: tuple[float, ...] = _opt((3e-3, 1e-2, 3e-2), "Learning rates swept per method on seed 0; each method "
                                  "keeps its best on validation.", "--lrs")
    seeds: int = _opt(3, "Seeds per method at its chosen rate (training order, a new head, random masks, LoRA's "
                         "initialisation); paired differences are over seeds.", "--seeds")
    epochs: int = _opt(3, "Passes over the training data per run.", "--epochs")
    batch_size: int = _opt(16, "Samples per optimiser step.", "--batch-size")
    max_length: int | None = _opt(None, "Most tokens per text (a longer one is an error naming file and line, "
                                        "never cut) [default: the model's limit].", "--max-length")
    max_samples: int | None = _opt(None, "Use at most this many training samples (calibration and training).",
                                   "--max-samples")
    text_field: str = _opt("text", ".jsonl field holding the text.", "--text-field")
    label_field: str = _opt("label", "seq-cls: .jsonl field holding the label.", "--label-field")
    threads: int | None = _opt(None, "CPU threads for PyTorch and ONNX Runtime [default: theirs].", "--threads")
    force: bool = _opt(False, "Replace the files of an existing run folder.", "--force")

    def __post_init__(self) -> None:
        for name in ("methods", "budgets", "lrs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.task is not None and self.task not in TASKS:
            raise OptionError(f"--task {self.task!r}: compare runs {' or '.join(TASKS)}")
        known = sparse_methods() + OTHER_METHODS
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise OptionError(f"--methods: unknown {', '.join(bad)} (use {', '.join(known)})")
        if len(set(self.methods)) != len(self.methods):
            raise OptionError(f"--methods names a method twice: {','.join(self.methods)}")
        if "random" not in self.methods:
            raise OptionError("--methods must include random: every method is compared with it")
        if not self.budgets:
            raise OptionError("--budget: give at least one fraction, e.g. 0.5%")
        for b in self.budgets:
            if not (isinstance(b, (int, float)) and 0 < b < 1):
                raise OptionError(f"--budget {b!r}: a fraction of each layer's weights between 0 and 100% "
                                  "(e.g. 0.5% or 0.005)")
        if len(set(self.budgets)) != len(self.budgets):
            raise OptionError("--budget names a budget twice")
        object.__setattr__(self, "budgets", tuple(sorted(float(b) for b in self.budgets)))
        if not self.lrs or any(not (isinstance(x, (int, float)) and x > 0 and math.isfinite(x)) for x in self.lrs):
            raise OptionError(f"--lrs {','.join(map(str, self.lrs))}: one or more positive learning rates")
        if len(set(self.lrs)) != len(self.lrs):
            raise OptionError("--lrs names a learning rate twice")
        for flag, v in (("--seeds", self.seeds), ("--epochs", self.epochs), ("--batch-size", self.batch_size),
                        ("--max-samples", self.max_samples), ("--threads", self.threads)):
            if v is not None and v < 1:
                raise OptionError(f"{flag} must be at least 1, got {v}")
        if self.max_length is not None and self.max_length < 2:
            raise OptionError(f"--max-length must be at least 2, got {self.max_length}")
        for flag, path in (("--train", self.train), ("--val", self.val), ("--test", self.test)):
            if path is not None and not Path(path).exists():
                raise DataError(f"{flag} {path}: no such file")

    @property
    def sweep_budget(self) -> float:
        """The budget the learning rates are swept at: the middle one."""
        return self.budgets[len(self.budgets) // 2]

    @property
    def sparse(self) -> tuple[str, ...]:
        """The selection methods among ``methods``."""
        return tuple(m for m in self.methods if m in sparse_methods())
