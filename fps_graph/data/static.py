"""Static inputs: model inputs with no sample axis (recurrent state, sample rate, a scalar), fed once for every batch.

A static input is read from its own .npy file and passed unchanged with every batch. It never counts as data:
it is not part of the calibration source, it does not set or guess a batch size, and sample counts come from the
inputs fed per sample. A state tensor whose shape includes the batch (silero-vad's ``state`` [2, B, 128]) is fed
as given, so its batch size must match ``--batch-size`` (the runtime error says so).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from fps_graph.data.sources import InputSpec, _fmt_shape, is_float
from fps_graph.errors import FpsGraphError, DataError, OptionError

HINT = "pass it once for every batch as a static input (CLI: --static {name}=FILE.npy)"


def parse_static(items: Iterable[str]) -> dict[str, str]:
    """NAME=FILE pairs (repeatable option values) as {input name: file}; refuses malformed or repeated names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise OptionError(f"--static {item!r}: expected NAME=FILE.npy (a model input name and an array file)")
        if name in out:
            raise OptionError(f"--static {name}= given twice; give each static input once")
        out[name] = path
    return out


def _load_npy(name: str, path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--static {name}={path}: file not found")
    if p.suffix.lower() != ".npy":
        raise DataError(f"--static {name}={path}: expected a .npy file (np.save(path, array))")
    try:
        return np.load(p, allow_pickle=False)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"--static {name}={path}: cannot read the array: {msg}") from exc


def load_static(files: Mapping[str, str], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The static arrays, checked against the model inputs (name, rank, fixed dimensions, dtype kind)."""
    by_name = {s.name: s for s in specs}
    out: dict[str, np.ndarray] = {}
    for name, path in files.items():
        spec = by_name.get(name)
        if spec is None:
            raise DataError(f"--static {name}=: the model has no input {name!r} to feed "
                                f"(its inputs: {', '.join(sorted(by_name)) or 'none'})")
        arr = _load_npy(name, path)
        want = spec.shape
        if want and len(want) != arr.ndim or any(isinstance(w, int) and w != f for w, f in zip(want, arr.shape)):
            raise DataError(f"--static {name}={path}: array of shape {_fmt_shape(arr.shape)} does not fit input "
                                f"{name!r} of shape {_fmt_shape(want)} (a static input is fed whole, with no sample "
                                "axis added)")
        kind_ok = (is_float(spec.dtype) and arr.dtype.kind in "fiub") or \
                  (np.issubdtype(spec.dtype, np.integer) and arr.dtype.kind in "iub") or \
                  (spec.dtype == np.bool_ and arr.dtype.kind == "b")
        if not kind_ok:
            raise DataError(f"--static {name}={path}: input {name!r} expects {spec.dtype.name}, "
                                f"the array holds {arr.dtype.name}")
        out[name] = np.array(arr, dtype=spec.dtype, order="C")   # (ascontiguousarray would make a scalar 1-D)
    return out


@dataclass
class WithStatic:
    """Batches of per-sample inputs with the static inputs added (the per-sample inputs come first)."""

    batches: Iterable[dict[str, np.ndarray]]
    static: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.batches)   # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.batches:
            yield {**batch, **self.static}


def with_static_hint(exc: Exception, static: Mapping[str, np.ndarray], batch_size: int) -> FpsGraphError:
    """A runtime failure with static inputs in play, with the likely cause: a state whose batch axis differs."""
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in static.items())
    return DataError(f"{exc} (static inputs are fed unchanged with every batch: {shapes}; one that holds a batch "
                         f"axis, such as a recurrent state, must match the batch size {batch_size}: set --batch-size "
                         "to its size or save it with the batch size)")


def static_hint(name: str) -> str:
    """The advice for an input that has no sample axis."""
    return HINT.format(name=name)


__all__ = ["WithStatic", "load_static", "parse_static", "static_hint", "with_static_hint"]
