"""Image and array classification (``image-cls``, the task of factory models): labelled images or arrays, the
classifier head, cross-entropy, loss and accuracy.

Data: an image folder with one subfolder per class, or .npz / .safetensors files holding inputs and integer labels
(``fps_graph.data.labeled``). Images are prepared exactly as `select` prepared its calibration images: the masks
file records the input size, layout, mean, std and crop (its ``data`` entry), and each option given
(``image_size``, ``mean``, ``std``, ``crop_pct``) overrides one of them; without a record the size comes from the
model and mean/std are ImageNet's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fps_graph.data.labeled import ArrayData, Labeled, open_labeled
from fps_graph.data.sources import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, InputSpec, Loader
from fps_graph.errors import DataError, FpsGraphError, OptionError
from fps_graph.training.config import DataConfig, TrainsConfig
from fps_graph.training.heads import find_head, logits_of
from fps_graph.training.tasks.base import DataContext, HeadPlan, Step, Task, TaskData

__all__ = ["ImageClassification", "ImagePrep", "LabeledData", "resolve_image_prep", "prep_notes", "image_size",
           "model_image_size"]


@dataclass
class ImagePrep:
    """How training images are prepared, and where each value came from ('option', 'masks', 'model', 'default')."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    layout: str
    channels: int
    origin: dict[str, str]

    def options(self) -> ImageOptions:
        """The ImageOptions that data.sources reads."""
        return ImageOptions(size=self.size, mean=self.mean, std=self.std, crop_pct=self.crop_pct)

    def spec(self) -> InputSpec:
        """The model input images feed, in the recorded layout."""
        h, w = self.size
        shape = (None, self.channels, h, w) if self.layout == "NCHW" else (None, h, w, self.channels)
        return InputSpec("input", shape, np.dtype(np.float32))

    def to_json(self) -> dict[str, Any]:
        """For metrics.json and adapter_config.json."""
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
                "layout": self.layout, "channels": self.channels, "from": dict(self.origin)}


def resolve_image_prep(opts: DataConfig, record: dict[str, Any], model: Any) -> ImagePrep:
    """Each preprocessing value from the option when given, else from the masks' data record (select's), else from
    the model (size) or the defaults (ImageNet mean/std, crop 0.875)."""
    rec = record if record.get("kind") == "image" else {}
    origin: dict[str, str] = {}

    def pick(name: str, given: Any, recorded: Any, fallback: Any, fallback_from: str) -> Any:
        for value, where in ((given, "option"), (recorded, "masks"), (fallback, fallback_from)):
            if value is not None:
                origin[name] = where
                return value
        return None

    size = pick("size", opts.image_size, rec.get("size"), None, "model")
    if size is None:
        size = model_image_size(model)
        if size is None:
            kind = record.get("kind", "none")
            why = "records no image size" + (f" (select read {kind} data)" if kind != "none" else "")
            raise OptionError(f"cannot tell the model's input image size: the masks file {why} and the model names "
                                "none; pass --image-size H,W")
        origin["size"] = "model"
    mean = pick("mean", opts.mean, rec.get("mean"), IMAGENET_MEAN, "default")
    std = pick("std", opts.std, rec.get("std"), IMAGENET_STD, "default")
    crop = pick("crop_pct", opts.crop_pct, rec.get("crop_pct"), 0.875, "default")
    layout = rec.get("layout") if rec.get("layout") in ("NCHW", "NHWC") else "NCHW"
    channels = int(rec["channels"]) if rec.get("channels") in (1, 3) else _channels(model)
    return ImagePrep((int(size[0]), int(size[-1])), tuple(float(v) for v in mean), tuple(float(v) for v in std),
                     float(crop), layout, channels, origin)


def _show(field_name: str, value: Any) -> str:
    """A preprocessing value as the summary prints it: 12x12, 0.485,0.456,0.406, 0.875."""
    if field_name == "size":
        return "x".join(str(int(v)) for v in value)
    if field_name in ("mean", "std"):
        return ",".join(f"{float(v):g}" for v in value)
    return f"{float(value):g}"


def prep_notes(prep: ImagePrep, record: dict[str, Any], masks: str) -> list[str]:
    """What the summary says about the image preprocessing: its values, whose they are, and any override."""
    used = {"size": prep.size, "mean": prep.mean, "std": prep.std, "crop_pct": prep.crop_pct}
    line = (f"images: {_show('size', prep.size)} {prep.layout}, mean {_show('mean', prep.mean)}, "
            f"std {_show('std', prep.std)}, crop {_show('crop_pct', prep.crop_pct)}")
    if all(v == "masks" for v in prep.origin.values()):
        line += f", as select prepared them (recorded in {Path(masks).name})"
    else:
        line += " (" + ", ".join(f"{k} from {v}" for k, v in prep.origin.items()) + ")"
    out = [line]
    if record.get("kind") == "image":
        differ = [k for k in used if prep.origin.get(k) == "option" and record.get(k) is not None
                  and _show(k, used[k]) != _show(k, record[k])]
        if differ:
            out.append("the options override how select prepared its images: " + "; ".join(
                f"{k} {_show(k, used[k])} instead of {_show(k, record[k])}" for k in differ))
    elif record.get("kind") not in (None, "none"):
        out.append(f"select read {record['kind']} data, so the masks file says nothing about images")
    return out


def model_image_size(model: Any) -> tuple[int, int] | None:
    """Input (H, W) the model itself declares (pretrained_cfg, img_size attributes), or None."""
    try:
        return image_size(model, ImageOptions())
    except FpsGraphError:
        return None


def image_size(model: Any, opts: ImageOptions) -> tuple[int, int]:
    """Input (H, W) for images: opts.size, else what the model says (pretrained_cfg, img_size attributes)."""
    if opts.size is not None:
        return (int(opts.size[0]), int(opts.size[1]))
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            s = cfg["input_size"]
            return (int(s[-2]), int(s[-1]))
    for obj in (model, getattr(model, "patch_embed", None), getattr(model, "config", None)):
        for attr in ("img_size", "image_size"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, int):
                return (v, v)
            if isinstance(v, (tuple, list)) and len(v) == 2:
                return (int(v[0]), int(v[1]))
    raise OptionError("cannot tell the model's input image size; pass --image-size H,W")


def _channels(model: Any) -> int:
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels) if m.in_channels in (1, 3) else 3
    return 3


class LabeledData(TaskData):
    """Labelled images or arrays as task data (batches under the input's name and '__label__')."""

    def __init__(self, data: Labeled, source: str = "the training data"):
        self.data = data
        self.source = source
        self.classes = list(data.classes)
        self.notes = data.notes
        self.input_name = data.input_name

    def __len__(self) -> int:
        return len(self.data)

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.data.fetch(np.asarray(indices))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        if isinstance(self.data.inner, ArrayData):     # decoded: straight from memory
            yield from super().batches(batch_size, shuffle, seed, max_samples)
            return
        yield from Loader(self.data, batch_size=batch_size, max_samples=max_samples, shuffle=shuffle, seed=seed)


class ImageClassification(Task):
    """Classification of images or arrays: cross-entropy on the model's logits; loss and accuracy."""

    name = "image-cls"

    def __init__(self) -> None:
        self.prep: ImagePrep | None = None
        self._record: dict[str, Any] = {}
        self._masks = ""

    def read(self, path: str, ctx: DataContext, classes: list[str] | None = None) -> LabeledData:
        self._record, self._masks = ctx.record, str(ctx.masks or "")

        def prep() -> ImagePrep:          # asked for only when the data holds images
            if self.prep is None:
                self.prep = resolve_image_prep(ctx.config, ctx.record, ctx.model)
            return self.prep

        return LabeledData(open_labeled(path, lambda: prep().spec(), lambda: prep().options(), classes=classes),
                           path)

    def record(self) -> dict[str, Any]:
        return {"masks_record": self._record, "images": self.prep.to_json() if self.prep else None}

    def notes(self) -> list[str]:
        return prep_notes(self.prep, self._record, self._masks) if self.prep else []

    def _example(self, data: LabeledData) -> torch.Tensor:
        return torch.from_numpy(data.collate(np.array([0]))[data.input_name])

    def find_head(self, model: torch.nn.Module, data: LabeledData) -> str | None:
        dev = next(model.parameters()).device
        return find_head(model, self._example(data).to(dev))

    def plan_head(self, model: torch.nn.Module, head: str | None, data: LabeledData, trains: TrainsConfig) -> HeadPlan:
        if trains.num_classes is not None:
            n_out = trains.num_classes
        else:
            dev = next(model.parameters()).device
            was = model.training
            model.eval()
            with torch.no_grad():
                n_out = int(logits_of(model(self._example(data).to(dev))).shape[-1])
            model.train(was)
        n_data = len(data.classes)
        if n_data > n_out:
            raise DataError(f"{data.source} has {n_data} classes but the model "
                                f"predicts {n_out}; pass --num-classes {n_data} to train a new head")
        warnings = []
        if trains.num_classes is None and n_data < n_out:
            warnings.append(f"{data.source} has {n_data} classes, the model "
                            f"predicts {n_out}")
        return HeadPlan(trains.num_classes, False, warnings)

    def step(self, model: torch.nn.Module, batch: dict[str, np.ndarray], device: str, label_smoothing: float) -> Step:
        x = torch.from_numpy(batch[next(k for k in batch if k != "__label__")]).to(device)
        y = torch.from_numpy(batch["__label__"]).to(device)
        logits = logits_of(model(x)).float()
        loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
        n = int(y.numel())
        return Step(loss, float(n), float((logits.detach().argmax(-1) == y).sum()), n)
