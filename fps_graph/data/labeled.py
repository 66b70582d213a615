"""Labelled samples for training classifiers: an image folder with one subfolder per class, or .npz /
.safetensors files holding inputs (``x``/``inputs``/``input``/``images``/``data``) and integer labels
(``y``/``labels``/``label``/``targets``/``target``).

Images are prepared exactly as `select` prepares its calibration images (``ImageSource``); small image sets are
decoded once and kept in memory. No torch here.
"""
from __future__ import annotations

import concurrent.futures as cf
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from fps_graph.data.sources import (ARRAY_EXTS, IMAGE_EXTS, ImageOptions, ImageSource, InputSpec, Loader, Source,
                                    list_files, unnormalised_note)
from fps_graph.errors import DataError, FpsGraphError

__all__ = ["INPUT_KEYS", "LABEL_KEYS", "ArrayData", "Labeled", "open_labeled", "iterate"]

INPUT_KEYS = ("x", "inputs", "input", "images", "data")
LABEL_KEYS = ("y", "labels", "label", "targets", "target")
CACHE_BYTES = 1 << 30          # image sets up to this size (decoded) are decoded once and kept in memory


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
                raw = load_file(str(f))
            else:
                raise DataError(f"{f}: training arrays need inputs and labels; use .npz or .safetensors")
        except FpsGraphError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, SafetensorError) as exc:
            raise DataError(f"cannot read array file {f}: {exc}") from exc
        kx, ky = _first_key(list(raw), INPUT_KEYS), _first_key(list(raw), LABEL_KEYS)
        if kx is None or ky is None:
            raise DataError(f"{f}: needs inputs under one of {list(INPUT_KEYS)} and integer labels under one of "
                                f"{list(LABEL_KEYS)}; found keys {sorted(raw)}")
        x, y = raw[kx], raw[ky]
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{f}: labels {ky!r} must be a 1-D integer array, found {y.dtype.name} "
                                f"of shape {list(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{f}: {x.shape[0]} inputs but {y.shape[0]} labels")
        if x.dtype.kind not in "fiub":
            raise DataError(f"{f}: inputs {kx!r} have dtype {x.dtype.name}, not numeric")
        note = unnormalised_note(kx, x, InputSpec("input", (), np.dtype(np.float32)), str(f))
        if note:
            notes.append(note)
        xs.append(x)
        ys.append(y)
    if len({x.shape[1:] for x in xs}) > 1:
        raise DataError(f"array files hold inputs of different shapes {[list(x.shape[1:]) for x in xs]}")
    return np.concatenate(xs).astype(np.float32, copy=False), np.concatenate(ys).astype(np.int64), notes[:1]


def open_labeled(path: str, image_spec: Callable[[], InputSpec], opts: ImageOptions | Callable[[], ImageOptions],
                 classes: list[str] | None = None) -> Labeled:
    """Labelled samples from an image folder with class subfolders, or from array files.

    image_spec and opts (or a callable giving them) are asked for only when the data holds images.
    classes: the training set's class names, which a validation set must use."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    files = [p] if p.is_file() else list_files(p, ARRAY_EXTS)
    if p.is_file() and p.suffix.lower() not in ARRAY_EXTS:
        raise DataError(f"{p}: training data must be a folder of images in class subfolders, or .npz/.safetensors")
    if files:
        x, y, notes = _load_arrays(files)
        if y.size and y.min() < 0:
            raise DataError(f"{p}: labels must be non-negative")
        names = classes or [str(i) for i in range(int(y.max()) + 1 if y.size else 0)]
        if y.size and y.max() >= len(names):
            raise DataError(f"{p}: label {int(y.max())} is outside the {len(names)} training classes")
        return Labeled(ArrayData(x), y, names, "input", notes)
    images = list_files(p, IMAGE_EXTS)
    if not images:
        raise DataError(f"no images or .npz/.safetensors files found in {p}")
    labels_text = []
    for f in images:
        rel = f.relative_to(p).parts
        if len(rel) < 2:
            raise DataError(f"{p}: images must sit in one subfolder per class ({f.name} is at the top level)")
        labels_text.append(rel[0])
    found = sorted(set(labels_text))
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(f"{p}: classes {unknown} are not among the training classes {classes}")
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
