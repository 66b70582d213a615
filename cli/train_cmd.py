"""`fps-graph train`: fine-tune the selected weights of a model (a factory or a Hugging Face folder).

Every option is a field of a config in ``fps_graph.training.config``: its help and default come from there, so this
file only maps flags to fields and prints what the run reports (setup and warnings before training, per epoch,
memory and files after).
"""
from __future__ import annotations

from dataclasses import MISSING
from typing import Any, Callable

import click

from fps_graph.data.text import TextOptions
from fps_graph.training.config import (DataConfig, ModelConfig, OptimConfig, Optimizer, RunConfig, StepScale,
                                       TrainsConfig, default_of, help_of)
from fps_graph_cli.common import TORCH_INSTALL, parse_floats, parse_ints, require, tqdm_progress


def opt(cls: type, name: str, *decls: str, **kw: Any) -> Callable:
    """A click option for a config field: help and default from the field (kw overrides, e.g. type); the option's
    name is the field's, so the parsed values go to ``train_job`` as they are."""
    default = default_of(cls, name)
    kw.setdefault("help", help_of(cls, name))
    if "is_flag" not in kw and not kw.get("multiple") and default is not MISSING:
        kw.setdefault("default", default)
        kw.setdefault("show_default", default is not None and default != ())
    return click.option(*decls, **kw)


@click.command()
@click.argument("model", metavar="MODEL")
@opt(ModelConfig, "weights", "--weights", type=click.Path(dir_okay=False))
@click.option("--masks", required=True, type=click.Path(dir_okay=False),
              help="Masks file from `fps-graph select`: the entries that train as sparse deltas.")
@opt(DataConfig, "data", "--data", required=True)
@opt(DataConfig, "val", "--val")
@opt(RunConfig, "output", "-o", "--output", required=True)
@opt(OptimConfig, "epochs", "--epochs", type=click.IntRange(min=1))
@opt(OptimConfig, "lr", "--lr", type=float)
@opt(OptimConfig, "batch_size", "--batch-size", type=click.IntRange(min=1))
@opt(OptimConfig, "optimizer", "--optimizer", type=click.Choice([o.value for o in Optimizer]))
@opt(OptimConfig, "weight_decay", "--weight-decay", type=float)
@opt(OptimConfig, "warmup_epochs", "--warmup-epochs", type=float)
@opt(OptimConfig, "min_lr", "--min-lr", type=float)
@opt(OptimConfig, "grad_clip", "--grad-clip", type=float)
@opt(OptimConfig, "label_smoothing", "--label-smoothing", type=float)
@opt(RunConfig, "seed", "--seed", type=int)
@opt(TrainsConfig, "num_classes", "--num-classes", type=click.IntRange(min=1))
@opt(TrainsConfig, "head", "--head")
@opt(TrainsConfig, "train_bias", "--train-bias/--no-train-bias")
@opt(TrainsConfig, "train_head", "--train-head/--no-train-head")
@opt(TrainsConfig, "train_norms", "--train-norms", is_flag=True)
@opt(TrainsConfig, "train_embeddings", "--train-embeddings", is_flag=True)
@opt(TrainsConfig, "train_full", "--train-full", multiple=True)
@click.option("--step-scale", type=click.Choice([s.value for s in StepScale]), default=StepScale.INPUT.value,
              show_default=True,
              help="Per-entry step sizes: input slows each entry on an input larger than the layer's median by "
                   "median/its scale, from the statistics the masks file records (FPS puts entries on outlier "
                   "inputs; docs/quality.md); none: every entry at --lr.")
@opt(DataConfig, "max_samples", "--max-samples", type=click.IntRange(min=1))
@opt(DataConfig, "image_size", "--image-size", type=str)
@opt(DataConfig, "mean", "--mean", type=str)
@opt(DataConfig, "std", "--std", type=str)
@opt(DataConfig, "crop_pct", "--crop-pct", type=float)
@opt(RunConfig, "save_merged", "--save-merged", is_flag=True)
@opt(RunConfig, "plot", "--no-plot", is_flag=True, help="Do not draw training_curve.png.")
@opt(RunConfig, "device", "--device")
@opt(RunConfig, "threads", "--threads", type=click.IntRange(min=1))
@opt(ModelConfig, "task", "--task")
@opt(TextOptions, "max_length", "--max-length", type=click.IntRange(min=2),
     help="Text tasks: most tokens per sample; a longer text is an error naming file and line, never cut "
          "[default: select's (recorded in the masks file), else the model's limit].")
@opt(TextOptions, "tokenizer", "--tokenizer", help="Text tasks: tokenizer.json or its folder [default: select's, "
                                                    "else the model folder].")
@opt(TextOptions, "text_field", "--text-field", help="Text tasks: .jsonl field holding the text.")
@opt(DataConfig, "label_field", "--label-field")
@opt(DataConfig, "prompt_field", "--prompt-field")
@opt(DataConfig, "completion_field", "--completion-field")
@opt(RunConfig, "gradient_checkpointing", "--gradient-checkpointing", is_flag=True)
@click.option("--peft", is_flag=True, help="Also write the delta as a PEFT SHiRA adapter (adapter_config.json, "
                                           "adapter_model.safetensors); refused before training when it cannot be.")
@opt(RunConfig, "force", "--force", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, summary or per-epoch lines (warnings still).")
def train(model: str, masks: str, peft: bool, quiet: bool, **kw: Any) -> None:
    """Fine-tune the selected weights of MODEL: a factory (module:function or file.py:function) trained on images
    or arrays, or a Hugging Face model folder (hf:DIR, or a folder holding config.json) trained on text with
    --task causal-lm or seq-cls."""
    require("torch", "train", TORCH_INSTALL)
    from fps_graph.training.job import run_train, train_job

    kw.update(image_size=parse_ints(kw["image_size"], "--image-size"), mean=parse_floats(kw["mean"], "--mean"),
              std=parse_floats(kw["std"], "--std"), plot=not kw.pop("no_plot"))
    job = train_job(model, masks, kw.pop("data"), kw.pop("output"), **kw)
    callbacks: list[Any] = [Printer(quiet, job.optim.epochs)]
    if peft:
        from fps_graph.integrations.peft import ShiraExport

        callbacks.append(ShiraExport())
    result = run_train(job, callbacks)
    for w in result.metrics.get("warnings", [])[len(callbacks[0].said):]:   # said after training (a plot failure)
        click.echo(f"warning: {w}", err=True)
    if quiet:
        return
    m = result.metrics
    mem, t = m["memory"], m["time"]
    st = mem["train_state"]
    click.echo(f"memory: peak RSS {mem['peak_rss_mb']:.0f} MB ({mem['peak_rss_scope']}, +{mem['peak_increase_mb']:.0f} MB"
               f" over the loaded model and data); training state "
               f"{st['adapter_mb']:.2f} MB vs {st['full_finetune_mb']:.2f} MB for full fine-tuning"
               + (f"; CUDA peak {mem['cuda_peak_allocated_mb']:.0f} MB" if "cuda_peak_allocated_mb" in mem else ""),
               err=True)
    click.echo(f"wrote {', '.join(result.files.values())} ({t['train_seconds']:.1f} s training, "
               f"{1000 * t['seconds_per_step']:.1f} ms per step)", err=True)


class Printer:
    """What `train` shows (a fps_graph.training.loop.Callbacks, duck-typed so that this module loads without torch):
    warnings and the trainable summary before training, a line per epoch, progress bars."""

    def __init__(self, quiet: bool, epochs: int):
        self.quiet, self.epochs = quiet, epochs
        self.said: list[str] = []

    def on_attach(self, handle: Any) -> None:
        pass

    def on_setup(self, setup: Any) -> None:
        for w in setup.warnings:
            click.echo(f"warning: {w}", err=True)
        self.said = list(setup.warnings)
        if self.quiet:
            return
        for n in setup.notes:
            click.echo(f"note: {n}", err=True)
        for line in trainable_lines(setup.summary, head_from=setup.head_from):
            click.echo(line, err=True)

    def progress(self, total: int, desc: str) -> Callable[[int], None] | None:
        return None if self.quiet else tqdm_progress(total, desc)

    def on_epoch(self, rec: dict[str, Any]) -> None:
        if self.quiet:
            return
        m = "ppl" if "train_ppl" in rec else "acc"
        line = f"epoch {rec['epoch']:>3}/{self.epochs}: loss {rec['train_loss']:.4f} {m} {rec[f'train_{m}']:.3f}"
        if "val_loss" in rec:
            line += f" | val loss {rec['val_loss']:.4f} {m} {rec[f'val_{m}']:.3f}"
        click.echo(line + f" | lr {rec['lr']:.2e} | {rec['seconds']:.1f} s", err=True)

    def on_end(self, handle: Any, folder: Any, metrics: dict[str, Any]) -> dict[str, str]:
        return {}


def trainable_lines(t: dict[str, Any], head_from: str | None = None) -> list[str]:
    """The summary's head, trainable and selection lines, from the run's one trainable summary
    (``TrainableSummary.to_json()``): what trains in full is said and counted apart from the adapter's values."""
    lines = []
    h, how = t.get("head"), t.get("head_trains")
    by_reason = t.get("full_by_reason", {})
    if h:
        src = "--head" if head_from == "option" else "detected"
        new = (f"new, {h['num_classes']} classes, " if h.get("replaced") else "")
        if how == "full":
            why = "a new head always trains" if h.get("replaced") else \
                "the default; --no-train-head trains only its selected entries"
            lines.append(f"head: {h['name']} ({new}{src}) trains in full: {by_reason.get('head', 0):,} values ({why})")
        elif how == "adapter":
            lines.append(f"head: {h['name']} ({src}) trains only its selected entries (--no-train-head)")
        else:
            lines.append(f"head: {h['name']} ({src}) is frozen (--no-train-head; the masks select none of it)")
    full = t["full_tensors"]
    reasons = ", ".join(f"{r} {v:,}" for r, v in by_reason.items())
    in_full = (f"{full:,} trained in full in {t['full_tensor_count']} tensors ({reasons})" if full
               else "nothing trained in full")
    kind = t.get("kind", "sparse")
    if kind == "full":
        own = "full fine-tuning: every parameter"
        lines.append(f"trainable: {t['trainable']:,} values ({own}) = 100% of the model's {t['full_finetune']:,}")
        return lines
    own = (f"{t['adapter_values']:,} selected entries (sparse deltas in {t['adapter_tensors']} tensors)"
           if kind == "sparse" else f"{t['adapter_values']:,} {kind} values (in {t['adapter_tensors']} modules)")
    lines.append(f"trainable: {t['trainable']:,} values = {own} + {in_full} = {100 * t['fraction']:.2f}% of full "
                 f"fine-tuning's {t['full_finetune']:,}")
    inside = t.get("selected_in_full") or {}
    if inside:
        n = sum(inside.values())
        lines.append(f"selection: the masks select {t['masks_selected']:,} entries; {n:,} of them lie in "
                     f"{', '.join(inside)}, trained in full anyway, so {t['adapter_values']:,} train as sparse deltas")
    return lines
