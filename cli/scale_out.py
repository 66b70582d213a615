"""`select --ray`: the options that send calibration to Ray workers, and the summary line of such a run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from fps_graph.errors import OptionError
from fps_graph.runtime.shards import DEFAULT_SHARD_SIZE, ClusterOptions


def scale_out_options(command: Callable) -> Callable:
    """Add --ray, --workers, --workdir, --resume and --shard-size to a click command."""
    options = [
        click.option("--ray", "ray_address", default=None, metavar="ADDRESS", callback=_check_address,
                     help="Calibrate on Ray workers (pip install 'fps-graph[ray]'): 'local' starts a local Ray "
                          "(or joins RAY_ADDRESS), 'auto' joins the running cluster, else a Ray address "
                          "(HOST:6379, ray://HOST:10001). See docs/scale_out.md."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="With --ray: workers, one ONNX Runtime session each [default: one per GPU, else per CPU]."),
        click.option("--workdir", type=click.Path(file_okay=False), default=None,
                     help="With --ray: save each finished shard here, so a stopped run can be resumed."),
        click.option("--resume", type=click.Path(file_okay=False), default=None,
                     help="With --ray: continue the run saved in this work folder, skipping its finished shards."),
        click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True,
                     help="Samples per shard (whole batches): the unit of work with --ray and of the exact sum; the "
                          "same value gives byte-identical masks with or without --ray."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _check_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--ray takes a value; a model or data path given there (``--ray model.onnx data/``) is refused by name."""

    if value is not None and value not in ("local", "auto") and Path(value).exists():
        raise click.BadParameter(f"{value!r} is a path, not a Ray address: write --ray local (a Ray for this run), "
                                 "--ray auto (the running cluster) or --ray HOST:PORT", ctx=ctx, param=param)
    return value


def cluster_options(ray_address: str | None, workers: int | None, workdir: str | None,
                    resume: str | None) -> ClusterOptions | None:
    """ClusterOptions from the CLI values, or None for a run in this process."""
    if ray_address is None:
        given = [name for name, v in (("--workers", workers), ("--workdir", workdir), ("--resume", resume)) if v]
        if given:
            raise OptionError(f"{'/'.join(given)} only apply with --ray")
        return None
    if workdir and resume:
        raise OptionError("give either --workdir (a new run) or --resume (continue one), not both")
    return ClusterOptions(address=None if ray_address == "local" else ray_address, workers=workers,
                          workdir=resume or workdir,
                          resume=bool(resume))


def cluster_summary(report: dict[str, Any] | None) -> str:
    """The Ray part of the summary line (empty for a run in this process)."""
    if not report:
        return ""
    each = f"{report['cpus_per_worker']:g} CPU" + (", 1 GPU" if report["gpus_per_worker"] else "")
    text = (f"; Ray: {report['workers']} worker(s) ({each} each) on {len(report['hosts'])} host(s),"
            f" {report['shards']} shard(s) of {report['shard_samples']} samples")
    if report["resumed"]:
        text += f", {report['resumed']} resumed from {report['workdir']}"
    if report["rerun"]:
        text += f", shard(s) {', '.join(map(str, report['rerun']))} run again after a worker died"
    if report["worker_peak_rss_mb"]:
        text += (f", start-up {report['startup_seconds']:.1f} s,"
                 f" worker peak RSS {max(report['worker_peak_rss_mb']):.0f} MB")
    return text
