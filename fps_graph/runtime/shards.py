"""Calibration in shards: runs of whole batches, each summed on its own and added in shard order.

Float64 addition is not associative, so the statistics are defined with one fixed grouping: the batches of a shard
are added in feeding order starting from zero, and the shard sums are added in shard order. The local loop
(``collect_stats``) and a distributed run (``runtime.ray``) both follow it, so their statistics and masks are
byte-identical whatever the number of workers and whatever order the shards finish in. The shard size is the only
knob that changes the grouping (and so, at most, the last bit of a sum).

A work folder keeps each finished shard's sums as an ordinary statistics file (``Stats.save``), so a run that was
stopped can skip them, and ``--stats-in`` can read them. Nothing here needs Ray.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fps_graph.errors import FpsGraphError, DataError, OptionError, RuntimeFailure
from fps_graph.formats.io import atomic_output
from fps_graph.graph.layers import Layer
from fps_graph.formats.stats import Stats

DEFAULT_SHARD_SIZE = 1024          # samples per shard (rounded up to whole batches)
JOB_FORMAT = "fps-graph-shards"
JOB_VERSION = 1
JOB_FILE = "job.json"


@dataclass(frozen=True)
class Shard:
    """One unit of work: whole batches (sample indices of the source), and where its first sample sits in the order."""

    id: int
    start: int
    batches: tuple[np.ndarray, ...]

    @property
    def samples(self) -> int:
        """Number of samples in the shard."""
        return int(sum(len(b) for b in self.batches))


@dataclass
class ClusterOptions:
    """Where and how a sharded calibration runs (see docs/scale_out.md).

    ``address``: None starts a local Ray (or joins ``RAY_ADDRESS``), ``"auto"`` joins the running cluster, else a
    Ray address. ``workers``: actors, one ONNX Runtime session each (default: one per GPU, else one per CPU).
    ``workdir``: folder that keeps finished shards; ``resume``: continue the run saved there.
    """

    address: str | None = None
    workers: int | None = None
    workdir: str | None = None
    resume: bool = False
    max_restarts: int = 8           # per worker: a dead worker process is started again this many times
    max_task_retries: int = 3       # per shard: re-runs after the worker running it died
    start_timeout: float = 300.0    # seconds to wait for the workers to be placed and to load the model


def shard_batches(batch_size: int, shard_size: int) -> int:
    """Batches per shard: shard_size samples, rounded up to whole batches."""
    if shard_size < 1:
        raise OptionError(f"shard size must be at least 1 sample, got {shard_size}")
    return max(1, math.ceil(shard_size / max(1, batch_size)))


def batch_groups(source: Any, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The sample indices of every batch in feeding order, as the Loader forms them."""
    if hasattr(source, "batches"):
        return [np.asarray(b, dtype=np.int64) for b in source.batches(order, batch_size)]
    return [np.asarray(order[i:i + batch_size], dtype=np.int64) for i in range(0, len(order), batch_size)]


def plan_shards(batches: list[np.ndarray], per_shard: int) -> list[Shard]:
    """Cut the batches into shards of per_shard consecutive batches."""
    shards, start = [], 0
    for i in range(0, len(batches), per_shard):
        group = tuple(batches[i:i + per_shard])
        shards.append(Shard(len(shards), start, group))
        start += sum(len(b) for b in group)
    return shards


def order_digest(shards: list[Shard]) -> str:
    """sha256 of the sample indices and batch boundaries: the same digest means the same batches in the same order."""
    h = hashlib.sha256()
    for shard in shards:
        for b in shard.batches:
            h.update(np.int64(len(b)).tobytes())
            h.update(np.ascontiguousarray(b, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def prefetched(source: Any, batches: tuple[np.ndarray, ...], threads: int = 1, ahead: int = 1
               ) -> Iterator[dict[str, np.ndarray]]:
    """source.fetch(batch) for each batch in order, the next ones read on a thread while the current one runs."""
    pool = cf.ThreadPoolExecutor(max_workers=max(1, threads))
    feeder = cf.ThreadPoolExecutor(max_workers=1)
    try:
        pending: list[cf.Future] = []
        nxt = 0
        while nxt < len(batches) or pending:
            while nxt < len(batches) and len(pending) < ahead + 1:
                pending.append(feeder.submit(source.fetch, batches[nxt], pool))
                nxt += 1
            yield pending.pop(0).result()
    finally:
        feeder.shutdown(wait=False, cancel_futures=True)
        pool.shutdown(wait=False, cancel_futures=True)


def sum_shard(step: Callable[[dict[str, np.ndarray]], Stats], batches: Iterator[dict[str, np.ndarray]],
              empty: Stats, check: Callable[[Stats, int], None] | None = None,
              progress: Callable[[int], None] | None = None, first_sample: int = 0) -> Stats:
    """The float64 sums of one shard: its batches' partial sums added in order, starting from ``empty``."""
    st = empty
    for batch in batches:
        partial = step(batch)
        if check is not None:
            check(partial, first_sample + st.num_samples)
        st = st.merge(partial)
        if progress is not None:
            progress(partial.num_samples)
    return st


class Workdir:
    """Finished shards of one calibration job on disk: ``<root>/<label>/job.json`` and ``shard-NNNNNN.safetensors``.

    ``job`` is everything that decides the sums (model hash, layers, batches, statistics, session options); a
    resumed run must match it key by key, and every shard file is checked against it when read.
    """

    def __init__(self, root: str | os.PathLike, label: str, job: dict[str, Any], shards: list[Shard],
                 resume: bool):
        self.root = Path(root)
        self.dir = self.root / label
        self.job = job
        self.shards = shards
        self.resume = resume
        self._lock: Any = None
        self._made: list[Path] = []       # what open() created (a failed start removes it again: discard)

    def open(self) -> set[int]:
        """Create the folder (new run) or check it (resumed run); return the ids of the shards already saved."""
        if self.root.exists() and not self.root.is_dir():
            raise OptionError(f"work folder is a file: {self.root}")
        job_path = self.dir / JOB_FILE
        if self.resume:
            if not self.root.is_dir() or not any(self.root.glob(f"*/{JOB_FILE}")):
                raise OptionError(f"nothing to resume in {self.root}: no saved calibration job there "
                                    "(start the run with this folder as its work folder)")
        elif job_path.exists():
            raise OptionError(f"work folder {self.root} already holds shards of a run: resume it, or use an "
                                "empty folder")
        if job_path.exists():
            self._check_job(job_path)
        else:
            if not self.root.parent.is_dir():
                raise OptionError(f"folder of the work folder does not exist: {self.root.parent}")
            self._made = [p for p in (self.root, self.dir) if not p.exists()]
            self.dir.mkdir(parents=True, exist_ok=True)
            with atomic_output(job_path, force=True) as tmp:
                tmp.write_text(json.dumps(self.job, indent=1, sort_keys=True) + "\n")
            self._made.append(job_path)
            if not (self.dir / ".lock").exists():
                self._made.append(self.dir / ".lock")
        self._take_lock()
        for stale in self.dir.glob(".shard-*.tmp"):       # left by a driver killed while writing
            stale.unlink(missing_ok=True)
        return {s.id for s in self.shards if self.path(s.id).is_file()}

    def _take_lock(self) -> None:
        """Refuse a second run on the same folder at the same time (the lock goes with the process)."""
        import fcntl

        self._lock = open(self.dir / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            self._lock = None
            raise RuntimeFailure(f"work folder {self.root} is in use by another run") from exc

    def close(self, discard: bool = False) -> None:
        """Release the folder. With discard (a run that failed before saving any shard, e.g. Ray did not start),
        also remove what open() created, so that the same command works again."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if discard and not any(self.dir.glob("shard-*.safetensors")):
            for p in reversed(self._made):
                if p.is_dir():
                    if not any(p.iterdir()):
                        p.rmdir()
                else:
                    p.unlink(missing_ok=True)
            self._made = []

    def _check_job(self, job_path: Path) -> None:
        try:
            saved = json.loads(job_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {job_path}: {exc}") from exc
        if not isinstance(saved, dict) or saved.get("format") != JOB_FORMAT:
            raise DataError(f"{job_path} is not an fps-graph shard job file")
        for key in sorted(set(saved) | set(self.job)):
            if saved.get(key) != self.job.get(key):
                raise OptionError(f"{job_path}: the saved shards were made with {key} = {_short(saved.get(key))}, "
                                    f"this run has {_short(self.job.get(key))}; resume with the same model, data and "
                                    "options, or use an empty work folder")

    def path(self, shard_id: int) -> Path:
        """The statistics file of one shard."""
        return self.dir / f"shard-{shard_id:06d}.safetensors"

    def save(self, shard_id: int, stats: Stats) -> None:
        """Write one finished shard atomically (a killed driver leaves either the whole file or none)."""
        with atomic_output(self.path(shard_id), force=True) as tmp:
            stats.save(tmp)

    def load(self, shard: Shard, layers: list[Layer]) -> Stats:
        """Read a saved shard and check it belongs to this job."""
        path = self.path(shard.id)
        st = Stats.load(path)
        fix = f"; delete {path} to compute it again"
        if st.model_sha256 != self.job["model_sha256"]:
            raise DataError(f"{path} was computed on another model (sha256 differs){fix}")
        if list(st.kinds) != list(self.job["kinds"]):
            raise DataError(f"{path} holds {list(st.kinds)} sums, this run needs {self.job['kinds']}{fix}")
        if st.num_samples != shard.samples:
            raise DataError(f"{path} holds {st.num_samples} samples, shard {shard.id} has {shard.samples}{fix}")
        try:
            st.check_layers(layers, str(path))
        except FpsGraphError as exc:
            raise DataError(f"{exc}{fix}") from exc
        return st


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
