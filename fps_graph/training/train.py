"""The `train` job: masked fine-tuning of a PyTorch model on labelled data, writing a delta file and metrics.

Data: an image folder with one subfolder per class, or .npz / .safetensors files holding inputs
(``x``/``inputs``/``input``/``images``) and integer labels (``y``/``labels``/``label``/``targets``). Images are
prepared exactly as `select` prepared its calibration images: the masks file records the input size, layout, mean,
std and crop (its ``data`` entry), and each option given (``image_size``, ``mean``, ``std``, ``crop_pct``)
overrides one of them; without a record the size comes from the model and mean/std are ImageNet's. Training is
seeded and, on CPU, deterministic: the same options give the same delta file bit for bit.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fps_graph.data.sources import (ARRAY_EXTS, IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD, ImageOptions, ImageSource,
                                    InputSpec, Loader, Source, list_files, unnormalised_note)
from fps_graph.errors import FpsGraphError
from fps_graph.formats.io import atomic_output, sha256_file
from fps_graph.formats.masks import data_record
from fps_graph.training.hf import TEXT_TASKS, TextOptions, hf_folder

ProgressFactory = Callable[[int, str], Callable[[int], None]]
INPUT_KEYS = ("x", "inputs", "input", "images", "data")
LABEL_KEYS = ("y", "labels", "label", "targets", "target")
CACHE_BYTES = 1 << 30          # image sets up to this size (decoded) are decoded once and kept in memory
# run_config.json describes the run for fps-graph; adapter_config.json + adapter_model.safetensors are written only
# as a real PEFT adapter (--peft), so that PeftModel.from_pretrained(model, run_folder) either loads or says why not
FILES = {"delta": "delta.safetensors", "run_config": "run_config.json", "metrics": "metrics.json",
         "plot": "training_curve.png", "merged": "merged.safetensors", "adapter_config": "adapter_config.json",
         "adapter_model": "adapter_model.safetensors"}


@dataclass
class TrainOptions:
    """Every knob of `fps-graph train` (see the CLI help for each)."""

    factory: str
    masks: str
    data: str
    output: str
    weights: str | None = None
    val: str | None = None
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    num_classes: int | None = None
    head: str | None = None              # None: auto-detect
    train_bias: bool = True
    train_head: bool = True
    train_norms: bool = False
    train_embeddings: bool = False
    train_full: Sequence[str] = ()
    max_samples: int | None = None
    # image preprocessing; None = as the masks file records it (select's), else the model's size / ImageNet's
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    save_merged: bool = False
    plot: bool = True
    threads: int | None = None
    device: str = "cpu"
    force: bool = False
    task: str | None = None              # image-cls (factories), causal-lm, seq-cls; None: from the model
    text: TextOptions = field(default_factory=TextOptions)
    gradient_checkpointing: bool = False
    peft: bool = False                   # also write the delta as a PEFT SHiRA adapter (refused when it cannot)


@dataclass
class TrainResult:
    """What training measured and wrote."""

    metrics: dict[str, Any]
    files: dict[str, str]
    warnings: list[str]
    handle: Any = None


# ------------------------------------------------------------------------------------------------------ data


class ArrayData(Source):
    """Inputs held in memory (from .npz/.safetensors)."""

    def __init__(self, x: np.ndarray, name: str = "input"):
        self.x = x
        self.name = name

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def fetch(self, indices: np.ndarray, pool: cf.Executor | None = None) -> dict[str, np.ndarray]:
        return {self.name: np.ascontiguousarray(self.x[indices], dtype=np.float32)}


class Labeled(Source):
    """A Source plus integer labels, delivered under the key '__label__'."""

    def __init__(self, inner: Source, labels: np.ndarray, classes: list[str], input_name: str,
                 notes: Sequence[str] = ()):
        self.inner = inner
        self.labels = labels.astype(np.int64)
        self.classes = classes
        self.input_name = input_name
        self._notes = list(notes)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def notes(self) -> list[str]:
        """Warnings about the data (array values that look unnormalised)."""
        return list(self._notes)

    def fetch(self, indices: np.ndarray, pool: cf.Executor | None = None) -> dict[str, np.ndarray]:
        out = dict(self.inner.fetch(indices, pool))
        out["__label__"] = self.labels[indices]
        return out


def _first_key(keys: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((k for k in wanted if k in keys), None)


def _load_arrays(files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    xs, ys, notes = [], [], []
    for f in files:
        try:
            if f.suffix.lower() == ".npz":
                z = np.load(f, allow_pickle=False)
                raw = {k: z[k] for k in z.files}
            elif f.suffix.lower() == ".safetensors":
                from safetensors.numpy import load_file

                raw = load_file(str(f))
            else:
                raise FpsGraphError(f"{f}: training arrays need inputs and labels; use .npz or .safetensors")
        except FpsGraphError:
            raise
        except Exception as exc:
            raise FpsGraphError(f"cannot read array file {f}: {exc}") from exc
        kx, ky = _first_key(list(raw), INPUT_KEYS), _first_key(list(raw), LABEL_KEYS)
        if kx is None or ky is None:
            raise FpsGraphError(f"{f}: needs inputs under one of {list(INPUT_KEYS)} and integer labels under one of "
                                f"{list(LABEL_KEYS)}; found keys {sorted(raw)}")
        x, y = raw[kx], raw[ky]
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise FpsGraphError(f"{f}: labels {ky!r} must be a 1-D integer array, found {y.dtype.name} "
                                f"of shape {list(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise FpsGraphError(f"{f}: {x.shape[0]} inputs but {y.shape[0]} labels")
        if x.dtype.kind not in "fiub":
            raise FpsGraphError(f"{f}: inputs {kx!r} have dtype {x.dtype.name}, not numeric")
        note = unnormalised_note(kx, x, InputSpec("input", (), np.dtype(np.float32)), str(f))
        if note:
            notes.append(note)
        xs.append(x)
        ys.append(y)
    if len({x.shape[1:] for x in xs}) > 1:
        raise FpsGraphError(f"array files hold inputs of different shapes {[list(x.shape[1:]) for x in xs]}")
    return np.concatenate(xs).astype(np.float32, copy=False), np.concatenate(ys).astype(np.int64), notes[:1]


def open_labeled(path: str, image_spec: Callable[[], InputSpec], opts: ImageOptions | Callable[[], ImageOptions],
                 classes: list[str] | None = None) -> Labeled:
    """Labelled samples from an image folder with class subfolders, or from array files.

    image_spec and opts (or a callable giving them) are asked for only when the data holds images.
    classes: the training set's class names, which a validation set must use."""
    p = Path(path)
    if not p.exists():
        raise FpsGraphError(f"data path not found: {p}")
    files = [p] if p.is_file() else list_files(p, ARRAY_EXTS)
    if p.is_file() and p.suffix.lower() not in ARRAY_EXTS:
        raise FpsGraphError(f"{p}: training data must be a folder of images in class subfolders, or .npz/.safetensors")
    if files:
        x, y, notes = _load_arrays(files)
        if y.size and y.min() < 0:
            raise FpsGraphError(f"{p}: labels must be non-negative")
        names = classes or [str(i) for i in range(int(y.max()) + 1 if y.size else 0)]
        if y.size and y.max() >= len(names):
            raise FpsGraphError(f"{p}: label {int(y.max())} is outside the {len(names)} training classes")
        return Labeled(ArrayData(x), y, names, "input", notes)
    images = list_files(p, IMAGE_EXTS)
    if not images:
        raise FpsGraphError(f"no images or .npz/.safetensors files found in {p}")
    labels_text = []
    for f in images:
        rel = f.relative_to(p).parts
        if len(rel) < 2:
            raise FpsGraphError(f"{p}: images must sit in one subfolder per class ({f.name} is at the top level)")
        labels_text.append(rel[0])
    found = sorted(set(labels_text))
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise FpsGraphError(f"{p}: classes {unknown} are not among the training classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    spec = image_spec()
    source: Source = ImageSource(images, spec, opts() if callable(opts) else opts)
    if len(images) * int(np.prod([d for d in spec.shape[1:]])) * 4 <= CACHE_BYTES:
        source = ArrayData(_decode_all(source, spec.name), spec.name)   # decode once, not every epoch
    return Labeled(source, np.array([index[c] for c in labels_text]), list(classes), spec.name)


def _decode_all(source: Source, name: str) -> np.ndarray:
    """Every sample of a source, decoded on worker threads, in order."""
    parts = [b[name] for b in Loader(source, batch_size=256)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def iterate(data: Labeled, batch_size: int, shuffle: bool = False, seed: int = 0,
            max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches in a seeded order: straight from memory for decoded data, through the threaded Loader otherwise."""
    loader = Loader(data, batch_size=batch_size, max_samples=max_samples, shuffle=shuffle, seed=seed)
    if not isinstance(data.inner, ArrayData):
        yield from loader
        return
    order = loader.order()
    for i in range(0, len(order), batch_size):
        yield data.fetch(order[i:i + batch_size])


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


def resolve_image_prep(opts: TrainOptions, record: dict[str, Any], model: Any) -> ImagePrep:
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
            raise FpsGraphError(f"cannot tell the model's input image size: the masks file {why} and the model names "
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
    raise FpsGraphError("cannot tell the model's input image size; pass --image-size H,W")


def _channels(model: Any) -> int:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels) if m.in_channels in (1, 3) else 3
    return 3


# ------------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak resident memory of a stretch of work: Linux's VmHWM reset at start (clear_refs), else process peak;
    on CUDA, the peak of allocated device memory."""

    def __init__(self, device: str):
        self.device = device
        self.reset_ok = False
        self.before_mb = _status_mb("VmRSS")

    def start(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.before_mb = _status_mb("VmRSS")

    def report(self) -> dict[str, Any]:
        peak = _status_mb("VmHWM")
        if peak is None:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 ** 2)
        out = {"peak_rss_mb": round(peak, 1), "rss_before_mb": round(self.before_mb or 0.0, 1),
               "peak_increase_mb": round(max(0.0, peak - (self.before_mb or 0.0)), 1),
               "peak_rss_scope": "training" if self.reset_ok else "process"}
        if self.device.startswith("cuda"):
            import torch

            out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        return out


def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# handle notes that honest_counts and the summary's head line say in numbers
SAID_BY_COUNTS = ("head: ", "trained in full instead of sparsely")


def honest_counts(handle: Any) -> dict[str, Any]:
    """Trainable values, split so that nothing is counted twice or hidden: the masks' own count, the selected
    entries that train as sparse deltas, those inside tensors that train in full anyway (the head, by default),
    and the values trained in full by reason (head, bias, norm, embedding, train-full)."""
    counts = handle.counts()
    counts.pop("full_tensor_names", None)
    indices = handle.masks.indices if handle.masks else {}
    counts["masks_selected"] = int(sum(np.asarray(v).size for v in indices.values()))
    counts["selected_in_full"] = {k: int(np.asarray(indices[k]).size) for k in handle.superseded if k in indices}
    by_reason: dict[str, int] = {}
    for name, p in handle.full.items():
        reason = handle.full_reason.get(name, "") or "other"
        by_reason[reason] = by_reason.get(reason, 0) + int(p.numel())
    counts["full_by_reason"] = by_reason
    return counts


def state_memory(handle: Any, optimizer: str) -> dict[str, float]:
    """Bytes of training state beyond the frozen model (trainable copies, gradients, optimiser moments, indices,
    start values), for this run and for full fine-tuning with the same optimiser; in MB."""
    moments = 2 if optimizer in ("adam", "adamw") else 0
    c = handle.counts()
    sparse = c["selected"] * (4 * (1 + 1 + moments) + 8 + 4) + c["full_tensors"] * 4 * (1 + moments + 1)
    full = c["full_finetune"] * 4 * (1 + moments)
    return {"sparse_mb": round(sparse / 2 ** 20, 3), "full_finetune_mb": round(full / 2 ** 20, 3)}


# --------------------------------------------------------------------------------------------------- train


def make_optimizer(params: Any, opts: Any, n_data: int) -> tuple[Any, Any, int]:
    """The optimiser (AdamW/Adam/SGD) over ``params`` and its warm-up + cosine schedule; also the steps per epoch."""
    import torch

    if opts.optimizer == "adamw":
        optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    elif opts.optimizer == "adam":
        optim = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        optim = torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay)
    n_train = min(n_data, opts.max_samples or n_data)
    steps_per_epoch = math.ceil(n_train / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    warmup = int(round(opts.warmup_epochs * steps_per_epoch))
    min_ratio = opts.min_lr / opts.lr
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, warmup, total, min_ratio))
    return optim, sched, steps_per_epoch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _check_options(opts: TrainOptions) -> None:
    if opts.epochs < 1:
        raise FpsGraphError("--epochs must be at least 1")
    if not opts.lr > 0:
        raise FpsGraphError("--lr must be positive")
    if opts.batch_size < 1:
        raise FpsGraphError("--batch-size must be at least 1")
    if opts.optimizer not in ("adam", "adamw", "sgd"):
        raise FpsGraphError(f"unknown --optimizer {opts.optimizer!r} (use adam, adamw or sgd)")
    if opts.warmup_epochs < 0 or opts.min_lr < 0 or opts.weight_decay < 0:
        raise FpsGraphError("--warmup-epochs, --min-lr and --weight-decay must not be negative")
    if opts.min_lr > opts.lr:
        raise FpsGraphError("--min-lr must not exceed --lr")
    if not 0 <= opts.label_smoothing < 1:
        raise FpsGraphError("--label-smoothing must be in [0, 1)")


def _prepare_output(opts: TrainOptions) -> tuple[Path, Path | None]:
    """The run folder, created; and the topmost folder this call created (removed again if the run fails)."""
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise FpsGraphError(f"output path is a file, not a run folder: {out}")
    if out.is_dir() and not opts.force:
        clash = [n for n in FILES.values() if (out / n).exists()]
        if clash:
            raise FpsGraphError(f"{out} holds a run already ({', '.join(clash)}); use --force to overwrite")
    made = None
    for folder in [out, *out.parents]:
        if folder.exists():
            break
        made = folder
    out.mkdir(parents=True, exist_ok=True)
    return out, made


def evaluate(model: Any, data: Labeled, batch_size: int, device: str, label_smoothing: float = 0.0,
             progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a model over labelled batches (eval mode, no gradients)."""
    import torch

    from fps_graph.training.sparse import _logits

    was = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for batch in iterate(data, batch_size):
            x = torch.from_numpy(batch[data.input_name]).to(device)
            y = torch.from_numpy(batch["__label__"]).to(device)
            logits = _logits(model(x)).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum",
                                                                label_smoothing=label_smoothing))
            correct += int((logits.argmax(-1) == y).sum())
            n += int(y.numel())
            if progress:
                progress(int(y.numel()))
    model.train(was)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "samples": n}


def run_train(opts: TrainOptions, progress: ProgressFactory | None = None,
              on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train the deltas (and fully trained tensors) of a model; write the run folder; return the metrics."""
    if opts.task in TEXT_TASKS or hf_folder(opts.factory) is not None:
        from fps_graph.training.hf import run_hf_train

        return run_hf_train(opts, progress, on_epoch)
    if opts.task not in (None, "image-cls"):
        raise FpsGraphError(f"unknown --task {opts.task!r} (use image-cls, causal-lm or seq-cls)")
    _check_options(opts)
    device = _device(opts.device)
    record = data_record(opts.masks) if isinstance(opts.masks, (str, os.PathLike)) else {"kind": "none"}
    out, made = _prepare_output(opts)
    try:   # a failed run leaves no folder of its own behind
        return _run(opts, out, device, record, progress, on_epoch)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _run(opts: TrainOptions, out: Path, device: str, record: dict[str, Any], progress: ProgressFactory | None,
         on_epoch: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    import torch

    from fps_graph.integrations.torch_export import build_model

    warnings: list[str] = []
    t_start = time.perf_counter()
    model = build_model(opts.factory, opts.weights).to(device)
    prep: list[ImagePrep] = []

    def image_prep() -> ImagePrep:
        if not prep:
            prep.append(resolve_image_prep(opts, record, model))
        return prep[0]

    train_data = open_labeled(opts.data, lambda: image_prep().spec(), lambda: image_prep().options())
    val_data = open_labeled(opts.val, lambda: image_prep().spec(), lambda: image_prep().options(),
                            classes=train_data.classes) if opts.val else None
    if len(train_data) == 0:
        raise FpsGraphError(f"{opts.data}: no training samples")
    warnings.extend(train_data.notes + (val_data.notes if val_data is not None else []))
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            deterministic(True, warn_only=device != "cpu")
            if opts.threads:
                torch.set_num_threads(opts.threads)
            result = _train(opts, model, train_data, val_data, out, device, progress, on_epoch, warnings,
                            prep[0] if prep else None)
    finally:
        deterministic(prev_det)
        torch.set_num_threads(prev_threads)
    result.metrics["data"] = {"masks_record": record, "images": prep[0].to_json() if prep else None}
    if prep:
        result.metrics["notes"] = prep_notes(prep[0], record, str(opts.masks)) + result.metrics["notes"]
    result.metrics["time"]["total_seconds"] = round(time.perf_counter() - t_start, 3)
    _write_json(out / FILES["metrics"], result.metrics)
    return result


def deterministic(mode: bool, warn_only: bool = False) -> None:
    """torch.use_deterministic_algorithms without its import of the compiler stack: in torch 2.13 it imports
    torch._inductor only to set a flag for compiled code (3-6 s on 2 busy cores; nothing here is compiled)."""
    import sys

    import torch

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor" in sys.modules:   # inductor loaded: keep its flag in step, at no cost
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FpsGraphError("--device cuda asked for, but PyTorch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise FpsGraphError(f"unknown --device {name!r} (use cpu, cuda or auto)")
    return name


def _train(opts: TrainOptions, model: Any, train_data: Labeled, val_data: Labeled | None, out: Path, device: str,
           progress: ProgressFactory | None, on_epoch: Callable[[dict[str, Any]], None] | None,
           warnings: list[str], prep: ImagePrep | None = None) -> TrainResult:
    import torch

    from fps_graph.training.sparse import _logits, attach, save_delta, save_state_dict

    name = train_data.input_name
    example = torch.from_numpy(train_data.fetch(np.array([0]))[name]).to(device)
    n_classes_data = len(train_data.classes)
    handle = attach(model, opts.masks, head=opts.head or "auto", num_classes=opts.num_classes,
                    example_input=example, train_bias=opts.train_bias, train_head=opts.train_head,
                    train_norms=opts.train_norms, train_embeddings=opts.train_embeddings,
                    train_full=opts.train_full, seed=opts.seed)
    with torch.no_grad():
        model.eval()
        n_out = int(_logits(model(example)).shape[-1])
    if n_classes_data > n_out:
        raise FpsGraphError(f"{opts.data} has {n_classes_data} classes but the model predicts {n_out}; "
                            f"pass --num-classes {n_classes_data} to train a new head")
    if opts.num_classes is None and n_classes_data < n_out:
        warnings.append(f"{opts.data} has {n_classes_data} classes, the model predicts {n_out}")
    peft_plan = None
    if opts.peft:
        from fps_graph.integrations.peft import shira_plan

        peft_plan = shira_plan(handle)       # refused here, before training, when SHiRA cannot hold the selection

    optim, sched, steps_per_epoch = make_optimizer(handle.trainable_parameters(), opts, len(train_data))
    n_train = min(len(train_data), opts.max_samples or len(train_data))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)

    initial = None
    if val_data is not None:
        initial = evaluate(model, val_data, opts.batch_size, device, opts.label_smoothing)
    mem = PeakMemory(device)
    mem.start()
    epochs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    seen = 0
    for epoch in range(1, opts.epochs + 1):
        te = time.perf_counter()
        cb = progress(n_train, f"epoch {epoch}/{opts.epochs}") if progress else None
        handle.train(True)
        loss_sum, correct, n = 0.0, 0, 0
        for batch in iterate(train_data, opts.batch_size, shuffle=True, seed=opts.seed * 100003 + epoch,
                             max_samples=opts.max_samples):
            x = torch.from_numpy(batch[name]).to(device)
            y = torch.from_numpy(batch["__label__"]).to(device)
            logits = _logits(model(x))
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise FpsGraphError(f"the loss became {float(loss)} in epoch {epoch}; lower --lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip:
                torch.nn.utils.clip_grad_norm_(handle.trainable_parameters(), opts.grad_clip)
            optim.step()
            sched.step()
            bs = int(y.numel())
            loss_sum += float(loss.detach()) * bs
            correct += int((logits.detach().argmax(-1) == y).sum())
            n += bs
            if cb:
                cb(bs)
        seen += n
        handle.train(False)
        rec: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
                               "lr": optim.param_groups[0]["lr"]}
        if val_data is not None:
            v = evaluate(model, val_data, opts.batch_size, device, opts.label_smoothing)
            rec.update(val_loss=v["loss"], val_acc=v["acc"])
        rec["seconds"] = round(time.perf_counter() - te, 3)
        epochs.append(rec)
        if on_epoch:
            on_epoch(rec)
    train_seconds = time.perf_counter() - t0
    memory = mem.report()
    memory["train_state"] = state_memory(handle, opts.optimizer)
    model.eval()

    files = {k: str(out / v) for k, v in FILES.items() if k in ("delta", "run_config", "metrics")}
    settings = _settings(opts)
    masks_sha = handle.masks.sha256 if handle.masks else ""
    save_delta(handle, out / FILES["delta"], {
        "training": settings, "base_model": opts.factory, "classes": train_data.classes,
        "weights_sha256": sha256_file(opts.weights) if opts.weights else ""}, force=True)
    if opts.save_merged:
        save_state_dict(handle.merged_state_dict(), out / FILES["merged"], force=True,
                        metadata={"format": "pt", "fps_graph": "merged state dict"})
        files["merged"] = str(out / FILES["merged"])
    if peft_plan is not None:
        from fps_graph.integrations.peft import write_shira

        write_shira(handle, out, peft_plan, base_model=opts.factory, force=True)
        files["peft"] = str(out / FILES["adapter_model"])
    counts = honest_counts(handle)
    metrics: dict[str, Any] = {
        "epochs": epochs,
        "initial": {"val_loss": initial["loss"], "val_acc": initial["acc"]} if initial else None,
        "final": {k: v for k, v in epochs[-1].items() if k not in ("epoch", "seconds", "lr")},
        "trainable": counts,
        "trained_in_full": {k: handle.full_reason.get(k, "") for k in handle.full},
        "superseded": handle.superseded,
        "notes": [n for n in handle.notes if not n.startswith(SAID_BY_COUNTS)],
        "head": handle.head.to_json() if handle.head else None,
        "memory": memory,
        "time": {"train_seconds": round(train_seconds, 3), "samples_per_s": round(seen / train_seconds, 2)
                 if train_seconds > 0 else 0.0},
        "classes": train_data.classes,
        "samples": {"train": n_train, "val": len(val_data) if val_data is not None else 0},
        "settings": settings,
        "warnings": warnings,
        "plot": None,
    }
    _write_json(out / FILES["run_config"], run_config(opts, handle, train_data.classes, masks_sha, counts,
                                                      image=prep.to_json() if prep else None))
    if opts.plot:
        err = plot_curves(epochs, out / FILES["plot"], initial)
        if err:
            warnings.append(err)
            metrics["plot_warning"] = err
        else:
            metrics["plot"] = FILES["plot"]
            files["plot"] = str(out / FILES["plot"])
    return TrainResult(metrics, files, warnings, handle)


def _settings(opts: TrainOptions) -> dict[str, Any]:
    s = asdict(opts)
    s["train_full"] = list(opts.train_full)
    s.pop("force", None)
    return s


def run_config(opts: TrainOptions, handle: Any, classes: list[str], masks_sha: str | None,
               counts: dict[str, Any], image: dict[str, Any] | None = None) -> dict[str, Any]:
    """run_config.json: what the delta file adapts and how to rebuild the model (no `peft_type`: PEFT cannot load
    the fps-graph delta format; `--peft` writes a real SHiRA adapter beside it)."""
    from fps_graph import __version__

    meta = handle.masks.metadata if handle.masks else {}
    return {
        "format": "fps-graph-run",
        "task": opts.task or "image-cls",
        "base_model_name_or_path": opts.factory,
        "base_weights": opts.weights,
        "masks": opts.masks,
        "masks_sha256": masks_sha,
        "onnx_model_sha256": meta.get("model_sha256"),
        "selection": {k: meta.get(k) for k in ("score", "stat", "k", "budget", "granularity")},
        "target_tensors": sorted(handle.deltas),
        "modules_to_save": sorted(handle.full),
        "head": handle.head.to_json() if handle.head else None,
        "num_classes": handle.head.num_classes if handle.head else None,
        "class_names": classes,
        "image": image,             # ImagePrep.to_json(): size, mean, std, crop_pct, layout, channels, from
        "trainable": counts,
        "delta_file": FILES["delta"],
        "inference_mode": True,
        "fps_graph_version": __version__,
    }


def _write_json(path: Path, obj: Any) -> None:
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def plot_curves(epochs: list[dict[str, Any]], path: Path, initial: dict[str, Any] | None = None) -> str | None:
    """Loss and accuracy per epoch as a PNG; returns a warning instead when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed; no training-curve plot (pip install matplotlib)"
    try:
        _draw(epochs, path, initial, Figure, FigureCanvasAgg)
    except Exception as exc:   # a plot is a nicety: never lose a finished run to it
        return f"could not draw the training curve: {type(exc).__name__}: {exc}"
    return None


def _draw(epochs: list[dict[str, Any]], path: Path, initial: dict[str, Any] | None, Figure: Any,
          FigureCanvasAgg: Any) -> None:
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    e = [r["epoch"] for r in epochs]
    second = "ppl" if "train_ppl" in epochs[0] else "acc"      # causal LM: perplexity
    ax1.plot(e, [r["train_loss"] for r in epochs], "o-", label="train")
    ax2.plot(e, [r[f"train_{second}"] for r in epochs], "o-", label="train")
    if "val_loss" in epochs[0]:
        ve = ([0] if initial else []) + e
        ax1.plot(ve, ([initial["loss"]] if initial else []) + [r["val_loss"] for r in epochs], "s-", label="val")
        ax2.plot(ve, ([initial[second]] if initial else []) + [r[f"val_{second}"] for r in epochs], "s-",
                 label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax2.set_xlabel("epoch")
    if second == "ppl":
        ax2.set_ylabel("perplexity")
        ax2.set_yscale("log")
    else:
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.02)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("fps-graph train")
    fig.tight_layout()
    with atomic_output(path, force=True) as tmp:
        fig.savefig(str(tmp), format="png")


__all__ = ["TrainOptions", "TrainResult", "run_train", "evaluate", "open_labeled", "image_size", "lr_factor",
           "plot_curves"]
