"""Calibration sharded over a Ray cluster: one ONNX Runtime session per actor, shard sums added on the driver.

Each actor (``ShardWorker``) builds one ``BatchStats`` (one session; one GPU per actor where the cluster has
GPUs) and turns a shard, a run of whole batches, into float64 sums. The driver adds the shard sums in shard order
(``runtime.shards``), so the result is byte-identical to the local loop for any number of workers and any order
of completion.

Where it runs: workers read the model and the data by path, so both must sit on storage every node sees under the
same path (the driver's working folder is used for relative paths where it exists); the driver compares the
model's sha256 as each worker reads it. Only the shards' sums travel back: O(features) per shard, never
activations.

Faults: a worker process that dies is started again (``max_restarts``) and the shard it was running is run again
from its first batch (``max_task_retries``); the driver adds exactly one result per shard id. With a work folder
each finished shard is saved as it arrives, and a restarted driver skips the saved ones. Bad data raises the
usual ``FpsGraphError`` on the worker, which ends the job with that message.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from fps_graph.errors import FpsGraphError, DataError, OptionError, RuntimeFailure

from fps_graph.data.sources import Source
from fps_graph.graph.layers import Layer
from fps_graph.graph.model import OnnxModel, load_model
from fps_graph.graph.observe import plan_observers
from fps_graph.runtime.memory import peak_rss_mb
from fps_graph.runtime.calibrate import BatchStats, CalibrationInfo, Progress, check_finite
from fps_graph.runtime.config import RuntimeConfig
from fps_graph.runtime.shards import (JOB_FORMAT, JOB_VERSION, ClusterOptions, Shard, Workdir, order_digest,
                                      plan_shards, prefetched, sum_shard)
from fps_graph.formats.stats import Stats

__all__ = ["collect_stats_ray", "ShardWorker", "require_ray"]

if TYPE_CHECKING:
    from ray.exceptions import RayError

_POLL_S = 0.2


def require_ray() -> ModuleType:
    """The ray module; a one-line RuntimeFailure where the optional extra is missing. Ray is imported here, by the
    functions that use it, never at module level: it takes a second to import and most runs do not need it."""
    try:
        import ray
    except ImportError as exc:   # the optional extra
        raise RuntimeFailure("Ray is not installed: pip install 'fps-graph[ray]'") from exc
    return ray


class ShardWorker:
    """A Ray actor's state: one ONNX Runtime session on the observed graph and the data source, opened once.

    Constructed on the worker from plain, picklable arguments; a failure is kept and reported by ``ready`` so
    the driver can print it as one line.
    """

    def __init__(self, model_path: str, model_sha256: str, layers: list[Layer], open_data: Callable[[], Source],
                 static: dict[str, np.ndarray], cwd: str, kinds: tuple[str, ...], runtime: RuntimeConfig,
                 board: str, read_threads: int):
        self.error: str | None = None
        self.error_type: type[FpsGraphError] = RuntimeFailure
        self.board = board           # the progress actor's name (a handle among the arguments defeats restarts)
        self._progress: Any = None
        self.read_threads = read_threads
        self.static = static
        self.host = socket.gethostname()
        self.step: BatchStats | None = None
        try:
            if os.path.isdir(cwd):
                os.chdir(cwd)            # relative data paths mean what they meant to the driver
            model = load_model(model_path)
            if model.sha256 != model_sha256:
                raise RuntimeFailure(f"{model_path} differs from the driver's copy (sha256); the model must be on "
                                    "storage every node sees under the same path")
            self.step = BatchStats(model, layers, kinds=kinds, runtime=runtime)
            del model
            self.source = open_data()
        except FpsGraphError as exc:   # reported by ready(), with its kind (DataError, ModelError, ...)
            self.error, self.error_type = f"Ray worker on {self.host}: {exc}", type(exc)

    def ready(self) -> dict[str, Any]:
        """How the worker started: error (or None) and its class, provider, number of observers, host, pid."""
        return {"error": self.error, "error_type": self.error_type, "provider": self.step.provider if self.step else None,
                "observers": len(self.step.observers) if self.step else 0, "host": self.host, "pid": os.getpid()}

    def run(self, shard: Shard) -> Stats:
        """The float64 sums of one shard (its batches added in order from zero), reporting samples as it goes."""
        if self.error or self.step is None:
            raise RuntimeFailure(self.error or "worker not started")
        step = self.step
        if self._progress is None:
            self._progress = require_ray().get_actor(self.board)
        self._progress.started.remote(shard.id)
        counted: list[int] = []          # samples of each batch done so far

        def report(n: int) -> None:
            counted.append(n)
            self._progress.advance.remote(shard.id, sum(counted))

        empty = Stats(model_sha256=step.model_sha256, kinds=step.kinds)
        feed = ({**batch, **self.static} for batch in prefetched(self.source, shard.batches, self.read_threads))
        return sum_shard(step, feed, empty,
                         lambda partial, first: check_finite(partial, step.order, first), report, shard.start)

    def finish(self) -> dict[str, Any]:
        """What the worker measured: peak resident memory (MB), largest micro-batch (0: batches ran whole)."""
        micro = getattr(self.step, "micro", None)
        return {"peak_rss_mb": peak_rss_mb(), "micro_batch": micro.slice_size() if micro is not None else 0}


class ProgressBoard:
    """Samples done per shard, kept by a small actor; a shard run again counts from zero, never twice."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}
        self.starts: dict[int, int] = {}

    def started(self, shard_id: int) -> None:
        """A worker began a shard (a second start means the first worker died)."""
        self.starts[shard_id] = self.starts.get(shard_id, 0) + 1

    def advance(self, shard_id: int, samples: int) -> None:
        """A worker has done this many samples of a shard."""
        self.done[shard_id] = max(self.done.get(shard_id, 0), samples)

    def poll(self) -> tuple[int, list[int]]:
        """(samples done over all shards, ids of the shards started more than once)."""
        return sum(self.done.values()), sorted(k for k, v in self.starts.items() if v > 1)


def _connect(address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and so must stop it)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as exc:
        where = f"Ray at {address}" if address else "a local Ray instance"
        raise RuntimeFailure(f"cannot start or join {where}: {_first_line(exc)}") from exc
    return True


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes of some arrays."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _placement(workers: int | None, provider: str) -> tuple[int, float, int]:
    """(workers, CPUs per worker, GPUs per worker) from the cluster's resources."""
    ray = require_ray()
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1.0)), int(res.get("GPU", 0))
    use_gpu = gpus >= 1 and provider != "cpu"
    n = workers or (gpus if use_gpu else max(1, int(cpus)))
    if use_gpu and n > gpus:
        raise OptionError(f"{n} workers need {n} GPUs (one each); the Ray cluster has {gpus}: ask for fewer "
                            "workers, or run them on CPUs with the cpu provider")
    node_cpus = max((float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                    default=cpus)
    share = max(0.01, np.floor(min(node_cpus, cpus / n) * 100) / 100)
    return n, float(share), 1 if use_gpu else 0


def _shard_error(exc: RayError, shard: Shard, cluster: ClusterOptions, workdir: Workdir | None) -> FpsGraphError:
    """One line for a shard that failed: the worker's own message for bad data, else what Ray reported."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), FpsGraphError):
        return type(exc.cause)(str(exc.cause))   # the worker's own kind: DataError, ModelError, ...
    where = f"shard {shard.id} (samples {shard.start}..{shard.start + shard.samples - 1})"
    saved = f"; the finished shards are saved in {workdir.root}: resume from there" if workdir else ""
    if isinstance(exc, RayActorError):
        return RuntimeFailure(f"Ray workers died {cluster.max_task_retries + 1} times running {where} "
                             f"({_first_line(exc)}){saved}")
    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        return RuntimeFailure(f"a Ray worker failed on {where}: {type(exc.cause).__name__}: "
                             f"{_first_line(exc.cause)}{saved}")
    return RuntimeFailure(f"Ray failed on {where}: {_first_line(exc)}{saved}")


def collect_stats_ray(model: OnnxModel, layers: list[Layer], open_data: Callable[[], Source],
                      batches: list[np.ndarray], *, cluster: ClusterOptions, shard_batches: int,
                      static: dict[str, np.ndarray] | None = None, data_key: dict[str, Any] | None = None,
                      kinds: tuple[str, ...] = ("abs",),
                      runtime: RuntimeConfig = RuntimeConfig(), label: str = "calibration",
                      progress: Progress | None = None) -> tuple[Stats, CalibrationInfo]:
    """Sum the statistics of ``batches`` over Ray workers; the same sums as ``collect_stats`` with the same shards.

    Args:
        model: the loaded model (its file is read again by every worker, by path).
        layers: the scored layers.
        open_data: picklable callable that opens the data source (called once per worker).
        batches: sample indices of every batch, in feeding order (``shards.batch_groups``).
        cluster: where to run, how many workers, the work folder (see ``ClusterOptions``).
        shard_batches: batches per shard (``shards.shard_batches``; the local loop must use the same).
        static: inputs fed whole with every batch (``data.static``).
        data_key: what identifies the data (path, preparation), recorded in the work folder's job file.
        kinds, runtime: as for ``collect_stats``; the config travels whole to every worker, its threads
            defaulting to the worker's share of CPUs.
        label: job name inside the work folder ("calibration", "anchor").
        progress: called with the number of samples finished since the last call, summed over workers.

    Returns:
        The statistics and a ``CalibrationInfo`` whose ``cluster`` holds the run's report (workers, shards
        resumed and run again, start-up seconds, peak memory per worker).
    """
    ray = require_ray()
    from ray.exceptions import RayError

    shards = plan_shards(batches, shard_batches)
    static = dict(static or {})
    total_samples = sum(s.samples for s in shards)
    job = {"format": JOB_FORMAT, "version": JOB_VERSION, "model_sha256": model.sha256, "model": model.path.name,
           "layers": [layer.node for layer in layers], "kinds": list(kinds), "reduce": runtime.reduce,
           "provider": runtime.provider, "opt_level": runtime.opt_level, "micro_batch": runtime.micro_batch,
           "max_memory_mb": runtime.max_memory_mb,
           "shards": len(shards), "samples": total_samples, "batches_sha256": order_digest(shards),
           "data": data_key or {}, "static_sha256": _digest(static)}
    workdir = Workdir(cluster.workdir, label, job, shards, cluster.resume) if cluster.workdir else None
    saved = workdir.open() if workdir else set()
    todo = [s for s in shards if s.id not in saved]
    t0 = time.perf_counter()
    try:
        started = _connect(cluster.address) if todo else False     # everything saved already: no Ray needed
    except BaseException:
        if workdir is not None:
            workdir.close(discard=True)      # nothing ran: leave no job file or lock behind
        raise
    connect_s = time.perf_counter() - t0
    failed = True
    actors: list[Any] = []
    board = None
    infos: list[dict[str, Any]] = []
    n, cpu_share, gpu = 0, 0.0, 0
    try:
        if todo:
            n, cpu_share, gpu = _placement(cluster.workers, runtime.provider)
            n = max(1, min(n, len(todo)))
            board_name = f"fps-graph-progress-{uuid.uuid4().hex}"
            board = ray.remote(num_cpus=0)(ProgressBoard).options(name=board_name).remote()
            worker_cls = ray.remote(ShardWorker).options(num_cpus=cpu_share, num_gpus=gpu,
                                                         max_restarts=cluster.max_restarts,
                                                         max_task_retries=cluster.max_task_retries)
            worker_runtime = runtime.replace(threads=runtime.threads or max(1, int(cpu_share)))
            actors = [worker_cls.remote(str(model.path.resolve()), model.sha256, layers, open_data, static,
                                        os.getcwd(), tuple(kinds), worker_runtime, board_name,
                                        max(1, int(cpu_share)))
                      for _ in range(n)]
            infos = _wait_ready(actors, cluster, cpu_share, gpu)
        startup = time.perf_counter() - t0
        stats, order, rerun, seconds = _run_shards(actors, board, shards, todo, saved, workdir, layers, model,
                                                   kinds, cluster, total_samples, progress)
        finished = [ray.get(a.finish.remote(), timeout=30) for a in actors]
        failed = False
    finally:
        for a in actors + ([board] if board is not None else []):
            try:
                ray.kill(a, no_restart=True)
            except (RayError, ValueError):   # already gone, or Ray itself stopped: nothing left to release
                pass
        if started:
            ray.shutdown()
        if workdir is not None:
            workdir.close(discard=failed)     # a run that saved shards keeps them (resume); else nothing stays
    providers = sorted({i["provider"] for i in infos}) or [runtime.provider]
    report = {"workers": n, "cpus_per_worker": cpu_share, "gpus_per_worker": gpu, "shards": len(shards),
              "shard_samples": shards[0].samples if shards else 0, "resumed": len(saved), "rerun": rerun,
              "completion_order": order, "startup_seconds": startup, "ray_init_seconds": connect_s,
              "worker_peak_rss_mb": [f["peak_rss_mb"] for f in finished],
              "hosts": sorted({i["host"] for i in infos}), "workdir": str(workdir.root) if workdir else None}
    return stats, CalibrationInfo(",".join(providers), seconds, stats.num_samples,
                                  max((i["observers"] for i in infos), default=len(plan_observers(layers)[0])),
                                  cluster=report, micro_batch=max((f["micro_batch"] for f in finished), default=0))


def _wait_ready(actors: list[Any], cluster: ClusterOptions, cpu_share: float, gpu: int) -> list[dict[str, Any]]:
    """Wait until every worker holds its session; refuse a worker that could not start."""
    ray = require_ray()
    from ray.exceptions import RayError

    refs = [a.ready.remote() for a in actors]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=cluster.start_timeout)
    if len(done) < len(refs):
        ask = f"{cpu_share:g} CPU" + (", 1 GPU" if gpu else "")
        raise RuntimeFailure(f"Ray started {len(done)} of {len(refs)} workers within {cluster.start_timeout:.0f} s "
                            f"(each asks for {ask}; the cluster has {ray.cluster_resources()}): ask for fewer workers")
    try:
        infos = ray.get(refs)
    except RayError as exc:
        raise RuntimeFailure(f"a Ray worker could not start ({_first_line(exc)}); fps-graph must be installed on "
                            "every node") from exc
    for info in infos:
        if info["error"]:
            raise info["error_type"](info["error"])
    return infos


def _run_shards(actors: list[Any], board: Any, shards: list[Shard], todo: list[Shard], saved: set[int],
                workdir: Workdir | None, layers: list[Layer], model: OnnxModel, kinds: tuple[str, ...],
                cluster: ClusterOptions, total_samples: int, progress: Progress | None
                ) -> tuple[Stats, list[int], list[int], float]:
    """Hand shards to idle workers, save and add each result in shard order; (stats, finish order, re-run, s)."""
    ray = require_ray()
    from ray.exceptions import GetTimeoutError, RayError

    t0 = time.perf_counter()
    queue = list(todo)
    pending: dict[Any, tuple[Shard, Any]] = {}
    results: dict[int, Stats | None] = {}         # finished, not yet added (None: saved on disk, read when added)
    total = Stats(model_sha256=model.sha256, kinds=tuple(kinds))
    next_id, order, rerun, finished = 0, [], [], set()
    reported = sum(s.samples for s in shards if s.id in saved)
    if progress is not None and reported:
        progress(reported)
    base = reported

    def submit(actor: Any) -> None:
        if queue:
            shard = queue.pop(0)
            pending[actor.run.remote(shard)] = (shard, actor)

    for actor in actors:
        submit(actor)
    last_poll = 0.0
    while pending or next_id < len(shards):
        if pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                shard, actor = pending.pop(ref)
                try:
                    st = ray.get(ref)
                except RayError as exc:
                    raise _shard_error(exc, shard, cluster, workdir) from exc
                if shard.id in finished or st.num_samples != shard.samples:     # never counted twice or short
                    raise RuntimeFailure(f"shard {shard.id}: a second result, or {st.num_samples} samples instead "
                                        f"of {shard.samples} (internal error)")
                if workdir is not None:
                    workdir.save(shard.id, st)
                results[shard.id] = None if workdir is not None else st
                order.append(shard.id)
                finished.add(shard.id)
                submit(actor)
        while next_id < len(shards) and (next_id in saved or next_id in results):
            shard = shards[next_id]
            st = results.pop(next_id, None)
            if st is None:
                st = workdir.load(shard, layers)      # type: ignore[union-attr]
            total = total.merge(st)
            next_id += 1
        now = time.perf_counter()
        if progress is not None and board is not None and (now - last_poll >= _POLL_S or not pending):
            last_poll = now
            try:
                done, rerun = ray.get(board.poll.remote(), timeout=10)
            except (RayError, GetTimeoutError):
                done = reported - base
            done = min(base + done, total_samples)
            if done > reported:
                progress(done - reported)
                reported = done
        if not pending and next_id < len(shards) and not queue:
            raise RuntimeFailure(f"shard {next_id} was never computed (internal error)")
    if progress is not None and reported < total_samples:
        progress(total_samples - reported)
    try:
        rerun = ray.get(board.poll.remote(), timeout=10)[1] if board is not None else []
    except (RayError, GetTimeoutError):
        pass
    if total.num_samples != total_samples:
        raise RuntimeFailure(f"shards add up to {total.num_samples} samples, expected {total_samples} (internal error)")
    if total.num_samples == 0:
        raise DataError("no calibration samples were read")
    return total, order, rerun, time.perf_counter() - t0
