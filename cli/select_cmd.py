"""`fps-graph select`: choose the weights to fine-tune from one forward pass over calibration data."""
from __future__ import annotations

import click

from fps_graph import ImageOptions, OptionError, RuntimeConfig, Selection, TextOptions
from fps_graph import select as select_weights   # the API; loaded here, when the command loads
from fps_graph.data.sources import IMAGENET_MEAN, IMAGENET_STD
from fps_graph.data.static import parse_static
from fps_graph.runtime.config import OPT_LEVELS, PROVIDERS, REDUCE_MODES
from fps_graph.selection.ranking import GRANULARITIES
from fps_graph.runtime.memory import AUTO
from fps_graph.selection.scores import STATS, registered, score_names
from fps_graph_cli.common import parse_floats, parse_ints, tqdm_progress
from fps_graph_cli.scale_out import cluster_options, cluster_summary, scale_out_options


def _score_help() -> str:
    """--score's help, from the score registry (selection/scores/): each score's one-liner and what it needs."""
    parts = []
    for s in registered():
        needs = "; needs --anchor" if s.anchor and "--anchor" not in s.help else ""
        parts.append(f"{s.name}: {s.help}{needs}")
    return "; ".join(parts) + ". Variants and evidence: docs/quality.md."


def _with(prop: str) -> str:
    """The registered scores with a property (anchor, seeded), for the help of the options they read."""
    return ", ".join(s.name for s in registered() if getattr(s, prop))


class MemoryBudget(click.ParamType):
    """--max-memory: a number of MB, or auto."""

    name = "MB|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text == AUTO:
            return AUTO
        try:
            return float(text)
        except ValueError:
            self.fail(f"{value!r} is neither a number of MB nor 'auto'", param, ctx)


def _text_options(tokenizer: str | None, text_field: str, max_length: int | None, no_truncate: bool,
                  pack: int | None) -> TextOptions:
    """The text options, with the library's refusals worded in flags."""
    if pack is not None and max_length is not None:
        raise OptionError("give --pack LENGTH or --max-length, not both: packed rows are exactly LENGTH tokens and "
                            "no document is truncated")
    if pack is not None and no_truncate:
        raise OptionError("--no-truncate does not apply with --pack: packing truncates nothing (documents run on "
                            "into the next row)")
    return TextOptions(tokenizer=tokenizer, text_field=text_field, max_length=max_length, truncate=not no_truncate,
                       pack=pack)


@click.command()
@click.argument("model", type=click.Path())
@click.argument("data", required=False)
@click.option("-o", "--output", default="masks.safetensors", show_default=True, help="Masks file to write.")
@click.option("--score", type=click.Choice(score_names()), default="fps", show_default=True, help=_score_help())
@click.option("--stat", type=click.Choice(STATS), default=None, help="Activation statistic (default: the score's).")
@click.option("--k", "k", type=int, default=None, help="Top-K input connections per output neuron [default: 1].")
@click.option("--budget", default=None, help="Instead of --k: a fraction (0.005), percentage (0.5%) or count.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="neuron", show_default=True,
              help="How --budget is spread: evenly per neuron, per layer (by size), or one network-wide ranking.")
@click.option("--min-per-layer", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --granularity network: every scored tensor keeps at least its N best entries.")
@click.option("--include", multiple=True, help="Only layers whose name matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip layers whose name matches this glob (repeatable).")
@click.option("--anchor", default=None, help=f"{_with('anchor')}: reference data (the pre-training domain).")
@click.option("--anchor-stats", multiple=True, type=click.Path(dir_okay=False),
              help=f"{_with('anchor')}: saved anchor statistics.")
@click.option("--eps", type=float, default=1e-6, show_default=True, help="gd-fps: added to the anchor statistic.")
@click.option("--seed", type=int, default=0, show_default=True,
              help=f"Seed for --score {_with('seeded')} and --shuffle.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most this many samples.")
@click.option("--shuffle", is_flag=True, help="Shuffle samples (seeded) before taking --max-samples.")
@click.option("--image-size", default=None, help="H,W for images when the model input size is dynamic.")
@click.option("--mean", default=None, help=f"Per-channel mean for images [default: {','.join(map(str, IMAGENET_MEAN))}].")
@click.option("--std", default=None, help=f"Per-channel std for images [default: {','.join(map(str, IMAGENET_STD))}].")
@click.option("--crop-pct", type=float, default=0.875, show_default=True, help="Resize to size/crop_pct, then crop.")
@click.option("--tokenizer", default=None, type=click.Path(),
              help="Text: a tokenizer.json or a folder holding one [default: the one beside MODEL].")
@click.option("--text-field", default="text", show_default=True, help="Text: the field of each .jsonl record.")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Text: tokens per sample [default: the model's limit from its folder's configs, else 512].")
@click.option("--no-truncate", is_flag=True, help="Text: refuse samples longer than --max-length (default: cut them,"
              " with a warning count).")
@click.option("--pack", "pack", type=click.IntRange(min=1), default=None, metavar="LENGTH",
              help="Text: join the documents with the tokenizer's end-of-sequence token and cut them into rows of "
                   "exactly LENGTH tokens (the last partial row dropped, counted): full batches for long documents, "
                   "but windows, not documents (docs/text.md). Default: each document exactly, unpadded.")
@click.option("--reduce", type=click.Choice(REDUCE_MODES), default="graph", show_default=True,
              help=RuntimeConfig.help("reduce"))
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
              help=RuntimeConfig.help("provider"))
@click.option("--opt-level", type=click.Choice(OPT_LEVELS), default="all", show_default=True,
              help=RuntimeConfig.help("opt_level"))
@click.option("--threads", type=click.IntRange(min=0), default=None, help=RuntimeConfig.help("threads"))
@click.option("--max-memory", "max_memory", type=MemoryBudget(), default=None, metavar="MB|auto",
              help=RuntimeConfig.help("max_memory_mb"))
@click.option("--dense", is_flag=True, help="Write bool masks of each tensor's shape instead of indices.")
@click.option("--stats-out", type=click.Path(dir_okay=False), default=None,
              help="Also save the raw statistics (sums and counts) here.")
@click.option("--stats-in", multiple=True, type=click.Path(dir_okay=False),
              help="Select from saved statistics instead of running the model; repeat the flag to sum several "
                   "files (--stats-in A --stats-in B). Not with DATA.")
@click.option("--static", "static", multiple=True, metavar="NAME=FILE.npy",
              help="A model input with no sample axis (recurrent state, sample rate, a scalar), fed whole with every "
                   "batch; never used to guess a batch size (repeatable).")
@click.option("--state-dict", type=click.Path(dir_okay=False), default=None,
              help="safetensors state dict, to name weights by value where the graph does not say.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@scale_out_options
def select(model: str, data: str | None, output: str, score: str, stat: str | None, k: int | None,
           budget: str | None, granularity: str, min_per_layer: int, include: tuple[str, ...],
           exclude: tuple[str, ...],
           anchor: str | None, anchor_stats: tuple[str, ...], eps: float, seed: int, batch_size: int,
           max_samples: int | None, shuffle: bool, image_size: str | None, mean: str | None, std: str | None,
           crop_pct: float, tokenizer: str | None, text_field: str, max_length: int | None, no_truncate: bool,
           pack: int | None,
           reduce: str, provider: str, opt_level: str, threads: int | None, max_memory: float | str | None, dense: bool,
           stats_out: str | None, stats_in: tuple[str, ...], static: tuple[str, ...], state_dict: str | None, force: bool,
           quiet: bool, ray_address: str | None, workers: int | None, workdir: str | None, resume: str | None,
           shard_size: int) -> None:
    """Select the weights of MODEL (ONNX file or Hugging Face export folder) to fine-tune, from calibration DATA
    (images, .npy/.npz/.safetensors, or text: .txt/.jsonl, a file or a folder)."""
    if k is not None and budget is not None:
        raise OptionError("give either --k or --budget, not both")
    if not 0 < crop_pct <= 1:
        raise OptionError("--crop-pct must be in (0, 1]")
    size = parse_ints(image_size, "--image-size")
    if size is not None and len(size) == 1:
        size = (size[0], size[0])
    result = select_weights(
        model, data, score=score, stat=stat, k=k, budget=budget, granularity=granularity,
        min_per_layer=min_per_layer, include=include, exclude=exclude, anchor=anchor, anchor_stats=anchor_stats,
        stats_in=stats_in, seed=seed, eps=eps, batch_size=batch_size, max_samples=max_samples, shuffle=shuffle,
        image=ImageOptions(size=size, mean=parse_floats(mean, "--mean") or IMAGENET_MEAN,
                           std=parse_floats(std, "--std") or IMAGENET_STD, crop_pct=crop_pct),
        text=_text_options(tokenizer, text_field, max_length, no_truncate, pack),
        static=parse_static(static), state_dict=state_dict,
        runtime=RuntimeConfig(reduce=reduce, provider=provider, opt_level=opt_level, threads=threads,
                              max_memory_mb=max_memory),
        cluster=cluster_options(ray_address, workers, workdir, resume), shard_size=shard_size,
        output=output, stats_out=stats_out, dense=dense, force=force, progress=None if quiet else tqdm_progress)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        s = result.summary
        click.echo(
            f"selected {s['selected']:,} of {s['total']:,} weights ({100 * s['fraction']:.3f}%) in {s['weights']} tensors"
            f" ({s['layers']} layers; {100 * s['weight_share']:.1f}% of the model's weight values scored);"
            f" {_data_summary(s, result, score)}; {s['seconds']:.1f} s total; peak RSS {s['peak_rss_mb']:.0f} MB"
            + (f"; {s['empty_tensors']} tensor(s) with nothing selected" if s.get("empty_tensors") else "")
            + (f"; micro-batches of {s['micro_batch']}" if s.get("micro_batch") else "")
            + cluster_summary(s.get("cluster")) + f" -> {output}", err=True)


def _data_summary(s: dict, result: Selection, score: str) -> str:
    """Where the statistics came from: a calibration run, saved statistics, or no data at all."""
    if result.calibration is not None:
        return f"{s['samples']} samples on {s['provider']} at {s['samples_per_s']:.1f} samples/s"
    if result.stats is not None:
        return f"statistics of {s['samples']} samples read from --stats-in"
    return f"no data read (--score {score} uses none)"
