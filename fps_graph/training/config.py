"""The options of a training run, split by concern: what trains (``TrainsConfig``), the optimiser and its schedule
(``OptimConfig``), the data (``DataConfig``) and the run's outputs and compute (``RunConfig``).

Each config is a frozen dataclass, validated once in ``__post_init__``. Every field carries its help text in
``metadata["help"]`` (and the `train` flag that sets it in ``metadata["flag"]``): ``fps-graph train`` builds its
options from these fields, so the CLI help, its defaults and the docs cannot drift apart. Modes are enums.
"""
from __future__ import annotations

import enum
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from fps_graph.data.text import TextOptions
from fps_graph.errors import OptionError

__all__ = ["Optimizer", "ModelConfig", "TrainsConfig", "OptimConfig", "DataConfig", "RunConfig", "help_of", "default_of",
           "settings"]


class Optimizer(str, enum.Enum):
    """The optimisers `train` offers (torch.optim's, SGD with momentum 0.9)."""

    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"


class StepScale(str, enum.Enum):
    """Per-entry step sizes of sparse deltas (fps_graph.selection.step_scale): ``input`` scales each entry's step
    by min(1, median input statistic / its input's statistic), as recorded in the masks file; ``none`` trains
    every entry at the learning rate."""

    INPUT = "input"
    NONE = "none"


def _opt(default: Any, help: str, flag: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its help text and CLI flag beside it."""
    meta = {"help": help, "flag": flag}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _field(cls: type, name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def help_of(cls: type, name: str) -> str:
    """The help text of a config field (what the CLI shows)."""
    return str(_field(cls, name).metadata.get("help", ""))


def default_of(cls: type, name: str) -> Any:
    """The default of a config field (MISSING for a required one); enums as their value."""
    f = _field(cls, name)
    value = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                         else MISSING)
    return value.value if isinstance(value, enum.Enum) else value


def _bad(flag: str, why: str) -> OptionError:
    return OptionError(f"{flag} {why}")


@dataclass(frozen=True)
class ModelConfig:
    """The model to train and the task it learns."""

    model: str = field(metadata={"flag": "MODEL", "help": (
        "The model: a factory (module:function or file.py:function returning a torch.nn.Module), or a Hugging "
        "Face model folder (hf:DIR, or a folder holding config.json).")})
    weights: str | None = _opt(None, "Factories: a safetensors state dict to load first.", "--weights")
    task: str | None = _opt(None, "What to learn: image-cls (images or arrays, for factories), causal-lm or seq-cls "
                                  "(text, for hf:DIR) [default: image-cls for factories; for hf:DIR, from "
                                  "config.json's architectures].", "--task")

    def __post_init__(self) -> None:
        if not self.model:
            raise OptionError("the model is required (a factory or hf:DIR)")
        object.__setattr__(self, "model", str(self.model))
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))


@dataclass(frozen=True)
class TrainsConfig:
    """What trains in full beside an adapter's own values (the selection's deltas, LoRA's factors), and the head."""

    head: str | None = _opt(None, "Name of the classifier module [default: the task's head: for image-cls the last "
                                  "Linear with the model's output size; for seq-cls the Linear with num_labels "
                                  "outputs; causal-lm has none].", "--head")
    num_classes: int | None = _opt(None, "Classes of the task; a different number than the head's trains a new, "
                                         "seeded head [default: image-cls, the head's; seq-cls, the labels in the "
                                         "data].", "--num-classes")
    train_head: bool = _opt(True, "Train the head in full (with --no-train-head, only its selected entries train).",
                            "--train-head")
    train_bias: bool = _opt(True, "Train the biases of the masked (or adapted) layers in full.", "--train-bias")
    train_norms: bool = _opt(False, "Also train normalisation layers (frozen by default, as in GPS).", "--train-norms")
    train_embeddings: bool = _opt(False, "Also train position embeddings and class tokens.", "--train-embeddings")
    train_full: tuple[str, ...] = _opt((), "Also train parameters whose full name matches this glob in full "
                                           "(repeatable).", "--train-full")

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_full", tuple(self.train_full))
        if self.num_classes is not None and self.num_classes < 1:
            raise _bad("--num-classes", f"must be at least 1, got {self.num_classes}")
        if self.num_classes is not None and not self.train_head:
            raise OptionError("a new head (--num-classes) must be trained; drop --no-train-head")


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and its schedule: linear warm-up, then cosine decay to min_lr; epochs of shuffled batches."""

    epochs: int = _opt(10, "Passes over the training data.", "--epochs")
    batch_size: int = _opt(32, "Samples per optimiser step.", "--batch-size")
    lr: float = _opt(1e-2, "Peak learning rate (1e-2: the best or near it for sparse deltas with per-entry step "
                           "sizes on the LM study, docs/quality.md).", "--lr")
    optimizer: Optimizer = _opt(Optimizer.ADAMW, "torch.optim's AdamW, Adam (L2 weight decay) or SGD with "
                                                 "momentum 0.9.", "--optimizer")
    weight_decay: float = _opt(0.0, "Weight decay (decoupled for AdamW); it reaches only the trained values.",
                               "--weight-decay")
    warmup_epochs: float = _opt(1.0, "Linear warm-up over this many epochs, then cosine decay.", "--warmup-epochs")
    min_lr: float = _opt(0.0, "Learning rate at the end of the cosine.", "--min-lr")
    grad_clip: float | None = _opt(None, "Clip the global gradient norm of the trained values to this.",
                                   "--grad-clip")
    label_smoothing: float = _opt(0.0, "Label smoothing of the cross-entropy (every task).", "--label-smoothing")

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "optimizer", Optimizer(self.optimizer))
        except ValueError as exc:
            raise _bad("--optimizer", f"{self.optimizer!r} is unknown (use {', '.join(o.value for o in Optimizer)})"
                       ) from exc
        if self.epochs < 1:
            raise _bad("--epochs", "must be at least 1")
        if self.batch_size < 1:
            raise _bad("--batch-size", "must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise _bad("--lr", "must be positive")
        for flag, v in (("--warmup-epochs", self.warmup_epochs), ("--min-lr", self.min_lr),
                        ("--weight-decay", self.weight_decay)):
            if not v >= 0:
                raise _bad(flag, "must not be negative")
        if self.min_lr > self.lr:
            raise _bad("--min-lr", "must not exceed --lr")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise _bad("--grad-clip", "must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise _bad("--label-smoothing", "must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they become model inputs (images, arrays or text)."""

    data: str = field(metadata={"flag": "--data", "help": (
        "Training data: a folder of images in class subfolders, .npz/.safetensors arrays (inputs under x and integer "
        "labels under y), or, for hf:DIR, text (.txt: one sample per line; .jsonl: one record per line; or a folder "
        "of them).")})
    val: str | None = _opt(None, "Validation data, the same kind as --data.", "--val")
    max_samples: int | None = _opt(None, "Use at most this many training samples.", "--max-samples")
    image_size: tuple[int, int] | None = _opt(None, "Images: H,W of the model input [default: as select prepared "
                                                    "its images (recorded in the masks file), else from the "
                                                    "model].", "--image-size")
    mean: tuple[float, ...] | None = _opt(None, "Images: per-channel mean [default: select's, else ImageNet's "
                                                "0.485,0.456,0.406].", "--mean")
    std: tuple[float, ...] | None = _opt(None, "Images: per-channel std [default: select's, else ImageNet's "
                                               "0.229,0.224,0.225].", "--std")
    crop_pct: float | None = _opt(None, "Images: resize to size/crop_pct, then centre-crop [default: select's, else "
                                        "0.875].", "--crop-pct")
    text: TextOptions = _opt(None, "Text tasks: tokenizer, text field and maximum length (texts longer than it "
                                   "are an error, never cut).")
    label_field: str = _opt("label", "seq-cls: .jsonl field holding the label.", "--label-field")
    prompt_field: str | None = _opt(None, "causal-lm: .jsonl field of a prompt that is not learnt.", "--prompt-field")
    completion_field: str | None = _opt(None, "causal-lm: .jsonl field of the completion that is learnt [default: "
                                              "completion, with --prompt-field].", "--completion-field")

    def __post_init__(self) -> None:
        if not self.data:
            raise _bad("--data", "is required")
        object.__setattr__(self, "data", str(self.data))
        if self.val is not None:
            object.__setattr__(self, "val", str(self.val))
        text = self.text if self.text is not None else TextOptions(truncate=False)
        if text.truncate:       # training never cuts a text: a longer one is an error naming file and line
            text = TextOptions(tokenizer=text.tokenizer, text_field=text.text_field, max_length=text.max_length,
                               truncate=False)
        object.__setattr__(self, "text", text)
        if text.max_length is not None and text.max_length < 2:
            raise _bad("--max-length", "must be at least 2")
        if self.max_samples is not None and self.max_samples < 1:
            raise _bad("--max-samples", "must be at least 1")
        if self.image_size is not None:
            size = tuple(int(v) for v in self.image_size)
            if len(size) == 1:
                size = (size[0], size[0])
            if len(size) != 2 or min(size) < 1:
                raise _bad("--image-size", f"must be H,W with positive sizes, got {list(self.image_size)}")
            object.__setattr__(self, "image_size", size)
        for flag, v in (("--mean", self.mean), ("--std", self.std)):
            if v is not None:
                object.__setattr__(self, flag[2:], tuple(float(x) for x in v))
        if self.std is not None and min(self.std) <= 0:
            raise _bad("--std", "values must be positive")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise _bad("--crop-pct", "must be in (0, 1]")
        if self.completion_field is not None and self.prompt_field is None:
            raise OptionError("--completion-field needs --prompt-field (without a prompt every token is learnt)")


@dataclass(frozen=True)
class RunConfig:
    """The run folder, seeding and where the work runs."""

    output: str | None = _opt(None, "Run folder to write (delta.safetensors, metrics.json, run_config.json, "
                                    "training_curve.png); None: write nothing.", "--output")
    force: bool = _opt(False, "Overwrite the files of an existing run folder.", "--force")
    plot: bool = _opt(True, "Draw training_curve.png.", "--no-plot")
    save_merged: bool = _opt(False, "Also write the merged state dict (merged.safetensors).", "--save-merged")
    seed: int = _opt(0, "Seeds the data order, dropout and a new head.", "--seed")
    device: str = _opt("cpu", "cpu, cuda, cuda:N or auto.", "--device")
    threads: int | None = _opt(None, "PyTorch CPU threads [default: PyTorch's].", "--threads")
    gradient_checkpointing: bool = _opt(False, "Hugging Face models: recompute activations in the backward pass "
                                               "(less memory, ~30% more time).", "--gradient-checkpointing")
    stop_on_divergence: bool = _opt(False, "At a non-finite loss, stop and report the run as diverged (metrics "
                                           "'diverged') instead of failing; for learning-rate sweeps (Python only).")

    def __post_init__(self) -> None:
        if self.output is not None:
            object.__setattr__(self, "output", str(self.output))
        d = self.device
        if not (d in ("cpu", "cuda", "auto") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise _bad("--device", f"{d!r} is unknown (use cpu, cuda, cuda:N or auto)")
        if self.threads is not None and self.threads < 1:
            raise _bad("--threads", "must be at least 1")


def settings(*configs: Any) -> dict[str, Any]:
    """The configs as one JSON-able dict per concern ({'optim': {...}, 'trains': {...}, ...}) for run records."""
    names = {ModelConfig: "model", TrainsConfig: "trains", OptimConfig: "optim", DataConfig: "data",
             RunConfig: "run"}
    out: dict[str, Any] = {}
    for c in configs:
        out[names.get(type(c), type(c).__name__)] = _jsonable(c)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if hasattr(v, "__dataclass_fields__"):
        return {f.name: _jsonable(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v
