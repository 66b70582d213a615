"""Calibration data: image folders and array files turned into batches of model inputs, decoded ahead of use.

* Images (jpg, png, bmp, webp, gif, tif; recursive, class subfolders allowed): resized so the shorter side is
  size / crop_pct, center-cropped to the model's input size, scaled to [0, 1] and normalised (ImageNet mean/std
  by default).
* Arrays: .npy (first axis = samples; single-input models), .npz / .safetensors keyed by model input name
  (multi-input models such as text transformers), or a folder of such files (concatenated in name order).
"""
from __future__ import annotations

import abc
import concurrent.futures as cf
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from safetensors.numpy import load_file

from fps_graph._moved import moved
from fps_graph.errors import FpsGraphError, DataError, OptionError


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
ARRAY_EXTS = {".npy", ".npz", ".safetensors"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InputSpec:
    """A model input: name, declared shape (ints, or None/str for dynamic axes) and dtype."""

    name: str
    shape: tuple
    dtype: np.dtype


@dataclass
class ImageOptions:
    """How images become tensors."""

    size: tuple[int, int] | None = None     # (H, W); None = from the model input
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875


def is_float(dtype: np.dtype) -> bool:
    """True for NumPy floats and the ml_dtypes ones ONNX uses (bfloat16, float8 variants)."""
    return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat16", "float8"))


def _fmt_shape(shape: Sequence) -> str:
    return "[" + ", ".join("?" if (d is None or isinstance(d, str)) else str(d) for d in shape) + "]"


def check_array(name: str, arr_shape: tuple, arr_dtype: np.dtype, spec: InputSpec, source: str) -> None:
    """Refuse arrays whose per-sample shape or dtype cannot feed the model input."""
    want = spec.shape
    if want and len(want) != len(arr_shape):
        raise DataError(f"{source}: input {spec.name!r} expects shape {_fmt_shape(want)}, "
                            f"found {_fmt_shape(arr_shape)}")
    for i, (w, f) in enumerate(zip(want, arr_shape)):
        if i > 0 and isinstance(w, int) and w != f:
            raise DataError(f"{source}: input {spec.name!r} expects shape {_fmt_shape(want)}, "
                                f"found {_fmt_shape(arr_shape)}")
    kind_ok = (is_float(spec.dtype) and (arr_dtype.kind in "fiub" or is_float(arr_dtype))) or \
              (np.issubdtype(spec.dtype, np.integer) and arr_dtype.kind in "iub") or \
              (spec.dtype == np.bool_ and arr_dtype.kind == "b")
    if not kind_ok:
        raise DataError(f"{source}: input {spec.name!r} expects {spec.dtype.name}, found {arr_dtype.name}")


class Source(abc.ABC):
    """Random access to samples: len() and fetch(indices) -> {input name: batch array}.

    Overridable: ``batches(order, batch_size)`` (the index groups the Loader feeds, e.g. samples of one shape
    together), ``notes`` (warnings for the user) and ``record()`` (how the data was prepared, kept in the masks
    file so `train` can prepare its data the same way; a dict with at least ``kind``).
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of samples."""

    @abc.abstractmethod
    def fetch(self, indices: np.ndarray, pool: cf.Executor | None = None) -> dict[str, np.ndarray]:
        """The samples at ``indices`` as one batch per model input (decoded on ``pool`` when given)."""

    def batches(self, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """The sample indices of each batch, in feeding order (text sources group equal lengths instead)."""
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    @property
    def notes(self) -> list[str]:
        """Warnings for the user about this data (none by default)."""
        return []

    def record(self) -> dict[str, Any]:
        """How the samples were prepared (see the class docstring)."""
        return {"kind": type(self).__name__}


@dataclass
class ArrayFile:
    """One array file: lazily opened arrays per model input."""

    path: Path
    arrays: dict[str, np.ndarray]
    n: int


def _open_arrays(path: Path, specs: list[InputSpec]) -> ArrayFile:
    """Open an .npy/.npz/.safetensors file and map its arrays to model inputs by name."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            raw = {"": np.load(path, mmap_mode="r", allow_pickle=False)}
        elif suffix == ".npz":
            z = np.load(path, allow_pickle=False)
            raw = {k: z[k] for k in z.files}
        else:

            raw = load_file(str(path))
    except FpsGraphError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read array file {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name in raw:
            arrays[spec.name] = raw[spec.name]
        elif len(specs) == 1 and "" in raw:
            arrays[spec.name] = raw[""]
        elif len(specs) == 1 and len(raw) == 1:
            arrays[spec.name] = next(iter(raw.values()))
        elif len(specs) == 1 and any(k in raw for k in ("x", "inputs", "input")):
            arrays[spec.name] = raw[next(k for k in ("x", "inputs", "input") if k in raw)]
        elif "" in raw:
            raise DataError(f"{path}: a .npy file can feed only a single-input model; this model has inputs "
                                f"{[s.name for s in specs]} (use .npz or .safetensors keyed by input name; an input with no "
                                "sample axis, such as a recurrent state or a sample rate, goes in once with --static "
                                "NAME=FILE.npy)")
        else:
            raise DataError(f"{path}: missing model input {spec.name!r} (found keys {sorted(raw)}); add it to the "
                                f"file, or if it has no sample axis (a recurrent state, a sample rate) pass it once for "
                                f"every batch with --static {spec.name}=FILE.npy")
    lengths = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        most = max(lengths.values())
        odd = [n for n, v in lengths.items() if v != most]
        flag = f"--static {odd[0]}=FILE.npy" if len(odd) == 1 else "--static NAME=FILE.npy"
        raise DataError(f"{path}: inputs have different numbers of samples {lengths}; an input with no sample axis "
                            f"({', '.join(map(repr, odd))}?) is not data: pass it once for every batch with {flag}")
    for spec in specs:
        a = arrays[spec.name]
        if a.ndim == 0:
            raise DataError(f"{path}: input {spec.name!r} is a scalar, so it has no sample axis; pass it once for "
                                f"every batch with --static {spec.name}=FILE.npy")
        check_array(spec.name, a.shape, a.dtype, spec, str(path))
    return ArrayFile(path, arrays, next(iter(lengths.values())))


def _drop_pages(arr: np.ndarray) -> None:
    """Unmap the pages a memory-mapped .npy has read so far (the copy is taken; the page cache keeps the file).

    Without this, every sample read stays resident in the process, and its RSS grows by the size of the data
    (0.6 MB per 224x224 image, 600 MB for 1024 of them) instead of staying flat (bench/README.md).
    """
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


UNNORMALISED = 20.0   # |value| above this in non-float32 arrays fed to a float input: likely raw pixels or ids
_PEEK = 64           # samples per file looked at for that check


def unnormalised_note(name: str, arr: np.ndarray, spec: InputSpec, source: str) -> str | None:
    """A warning when an integer or float64 array feeds a float input with values that look unscaled (raw 0-255
    pixels, say): they are cast as they are, so the model would see a range it was not trained on."""
    if not is_float(spec.dtype) or arr.dtype == spec.dtype or arr.dtype.kind not in "iuf" or arr.size == 0:
        return None
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 8:   # float16/32 into a float input: a plain cast
        return None
    head = np.asarray(arr[:_PEEK])
    lo, hi = head.min(), head.max()
    if max(abs(float(lo)), abs(float(hi))) <= UNNORMALISED:
        return None
    return (f"{source}: input {name!r} is {arr.dtype.name} with values {lo}..{hi} (first {min(len(arr), _PEEK)} "
            f"samples), cast to {spec.dtype.name} as they are; if these are images, normalise them first, "
            "e.g. (x / 255 - mean) / std")


class ArraySource(Source):
    """Samples from one or more array files, concatenated.

    Files whose samples differ in shape (sequence lengths of .npz shards, say) are never stacked together:
    ``batches`` keeps each batch within one shape, so nothing is padded or cut.
    """

    def __init__(self, files: list[Path], specs: list[InputSpec]):
        self.specs = specs
        self.files = [_open_arrays(p, specs) for p in files]
        self.offsets = np.cumsum([0] + [f.n for f in self.files])
        self.shape_of = [tuple(tuple(f.arrays[s.name].shape[1:]) for s in specs) for f in self.files]
        found = [n for f in self.files for s in specs
                 if (n := unnormalised_note(s.name, f.arrays[s.name], s, str(f.path)))]
        self._notes = found[:1] + ([f"{len(found) - 1} more array file(s) like it"] if len(found) > 1 else [])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def notes(self) -> list[str]:
        """Warnings about the arrays (values that look unnormalised)."""
        return list(self._notes)

    def record(self) -> dict[str, Any]:
        """Array inputs: names, stored dtypes and the distinct per-sample shapes."""
        return {"kind": "array", "inputs": [s.name for s in self.specs],
                "dtypes": {s.name: self.files[0].arrays[s.name].dtype.name for s in self.specs} if self.files else {},
                "shapes": [{s.name: list(sh[i]) for i, s in enumerate(self.specs)} for sh in sorted(set(self.shape_of))]}

    def batches(self, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """order's samples in batches, each within one per-sample shape (shapes in order of first appearance)."""
        order = np.asarray(order, dtype=np.int64)
        if len(set(self.shape_of)) <= 1:
            return super().batches(order, batch_size)
        file_of = np.searchsorted(self.offsets, order, side="right") - 1
        groups: dict[tuple, list[int]] = {}
        for pos, f in enumerate(file_of):
            groups.setdefault(self.shape_of[f], []).append(pos)
        out: list[np.ndarray] = []
        for pos in groups.values():
            idx = order[np.asarray(pos, dtype=np.int64)]
            out.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
        return out

    def fetch(self, indices: np.ndarray, pool: cf.Executor | None = None) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {s.name: [] for s in self.specs}
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        start = 0
        while start < len(indices):   # runs of indices that fall in the same file keep their order
            f = which[start]
            end = start
            while end < len(indices) and which[end] == f:
                end += 1
            local = indices[start:end] - self.offsets[f]
            for s in self.specs:
                parts[s.name].append(np.asarray(self.files[f].arrays[s.name][local]))   # a copy (fancy index)
                _drop_pages(self.files[f].arrays[s.name])
            start = end
        out = {}
        for s in self.specs:
            if len({p.shape[1:] for p in parts[s.name]}) > 1:   # only batches() groups shapes; fetch is direct
                raise DataError(f"input {s.name!r}: a batch spans array files whose samples differ in shape "
                                    f"{sorted({tuple(p.shape[1:]) for p in parts[s.name]})}; batch with Loader, "
                                    "which keeps each shape apart")
            arr = np.concatenate(parts[s.name]) if len(parts[s.name]) > 1 else parts[s.name][0]
            out[s.name] = np.ascontiguousarray(arr, dtype=s.dtype)
        return out


def image_layout(spec: InputSpec, opts: ImageOptions) -> tuple[str, int, tuple[int, int]]:
    """('NCHW' or 'NHWC', channels, (H, W)) for an image input, from its declared shape and the options."""
    shape = spec.shape
    if len(shape) != 4:
        raise DataError(f"images can feed only a 4-D image input; input {spec.name!r} has shape "
                            f"{_fmt_shape(shape)}")
    if shape[1] in (1, 3):
        layout, ch, hw = "NCHW", shape[1], (shape[2], shape[3])
    elif shape[3] in (1, 3):
        layout, ch, hw = "NHWC", shape[3], (shape[1], shape[2])
    else:
        raise DataError(f"input {spec.name!r} with shape {_fmt_shape(shape)} does not look like an image input"
                            " (1 or 3 channels expected)")
    if opts.size is not None:
        if all(isinstance(d, int) for d in hw) and tuple(hw) != tuple(opts.size):
            raise OptionError(f"input {spec.name!r} expects images of {hw[0]}x{hw[1]}, "
                                f"--image-size asks for {opts.size[0]}x{opts.size[1]}")
        hw = opts.size
    if not all(isinstance(d, int) for d in hw):
        raise OptionError(f"input {spec.name!r} has dynamic height/width; pass --image-size H,W")
    if len(opts.mean) not in (1, ch) or len(opts.std) not in (1, ch):
        raise OptionError(f"--mean/--std need 1 or {ch} values for input {spec.name!r}")
    return layout, int(ch), (int(hw[0]), int(hw[1]))


def load_image(path: Path, channels: int, size: tuple[int, int], opts: ImageOptions, layout: str) -> np.ndarray:
    """Decode, resize, center-crop and normalise one image to float32 in the model's layout (no batch axis)."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            short = max(1, int(round(min(h, w) / opts.crop_pct)))
            scale = short / min(im.size)
            new = (max(w, int(round(im.size[0] * scale))), max(h, int(round(im.size[1] * scale))))
            im = im.resize(new, Image.BILINEAR)
            left, top = (new[0] - w) // 2, (new[1] - h) // 2
            im = im.crop((left, top, left + w, top + h))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                            ) from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(opts.mean, dtype=np.float32)
    std = np.asarray(opts.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1) if layout == "NCHW" else arr)


class ImageSource(Source):
    """Samples from image files (decoded on a thread pool)."""

    def __init__(self, files: list[Path], spec: InputSpec, opts: ImageOptions):
        self.files = files
        self.spec = spec
        self.opts = opts
        self.layout, self.channels, self.size = image_layout(spec, opts)
        if not is_float(spec.dtype):
            raise DataError(f"input {spec.name!r} expects {spec.dtype.name}; images give floats")

    def __len__(self) -> int:
        return len(self.files)

    def record(self) -> dict[str, Any]:
        """The preprocessing: input name, size, layout, channels, mean, std, crop_pct."""
        return {"kind": "image", "inputs": [self.spec.name], "size": list(self.size), "layout": self.layout,
                "channels": self.channels, "mean": [float(v) for v in self.opts.mean],
                "std": [float(v) for v in self.opts.std], "crop_pct": float(self.opts.crop_pct)}

    def fetch(self, indices: np.ndarray, pool: cf.Executor | None = None) -> dict[str, np.ndarray]:
        def one(i: int) -> np.ndarray:
            return load_image(self.files[i], self.channels, self.size, self.opts, self.layout)

        imgs = list(pool.map(one, indices)) if pool is not None else [one(i) for i in indices]
        return {self.spec.name: np.stack(imgs).astype(self.spec.dtype, copy=False)}


def list_files(root: Path, exts: set[str]) -> list[Path]:
    """Files under root with one of the extensions, recursively, sorted by relative path (deterministic)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and Path(fn).suffix.lower() in exts:
                found.append(Path(dirpath) / fn)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _image_source(files: list[Path], specs: list[InputSpec], opts: ImageOptions) -> ImageSource:
    if len(specs) != 1:
        raise DataError(f"images can feed only single-input models; this one has inputs {[s.name for s in specs]}"
                            " (use .npz or .safetensors keyed by input name)")
    return ImageSource(files, specs[0], opts)


@dataclass
class Loader:
    """Batches from a Source in a fixed (optionally seeded, shuffled) order, decoded ahead on worker threads."""

    source: Source
    batch_size: int = 32
    max_samples: int | None = None
    shuffle: bool = False
    seed: int = 0
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    prefetch: int = 2

    def order(self) -> np.ndarray:
        """Sample indices in the order they are fed."""
        n = len(self.source)
        idx = np.random.default_rng(self.seed).permutation(n) if self.shuffle else np.arange(n)
        if self.max_samples is not None:
            idx = idx[: self.max_samples]
        return idx

    def __len__(self) -> int:
        return len(self.order())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.batch_size < 1:
            raise OptionError("--batch-size must be at least 1")
        order = self.order()
        batches = self.source.batches(order, self.batch_size)
        pool = cf.ThreadPoolExecutor(max_workers=self.workers)
        feeder = cf.ThreadPoolExecutor(max_workers=1)
        try:
            pending: list[cf.Future] = []
            nxt = 0
            while nxt < len(batches) or pending:
                while nxt < len(batches) and len(pending) < self.prefetch + 1:
                    pending.append(feeder.submit(self.source.fetch, batches[nxt], pool))
                    nxt += 1
                yield pending.pop(0).result()
        finally:
            feeder.shutdown(wait=False, cancel_futures=True)
            pool.shutdown(wait=False, cancel_futures=True)


__getattr__ = moved(__name__, {"open_source": "fps_graph.data.dispatch:open_source"})   # its home until 0.1
