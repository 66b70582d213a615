"""`fps-graph train`: masked fine-tuning of a PyTorch model with the selected weights."""
from __future__ import annotations

import click

from fps_graph.data.sources import IMAGENET_MEAN, IMAGENET_STD, ImageOptions
from fps_graph.errors import FpsGraphError
from fps_graph_cli.common import parse_floats, parse_ints, tqdm_progress


@click.command()
@click.argument("factory")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="safetensors state dict to load first.")
@click.option("--masks", required=True, type=click.Path(dir_okay=False), help="Masks file from `fps-graph select`.")
@click.option("--data", required=True, help="Training data: image folder with class subfolders, or .npz (x, y).")
@click.option("--val", default=None, help="Validation data, same kinds as --data.")
@click.option("-o", "--output", required=True, help="Run folder to write (delta.safetensors, metrics, plot).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True, help="Linear warm-up, then cosine.")
@click.option("--min-lr", type=float, default=0.0, show_default=True, help="Learning rate at the end of the cosine.")
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm of the trained values.")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds data order, dropout and a new head.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classes of the task; a different number than the head's trains a new head.")
@click.option("--head", default=None, help="Name of the classifier module [default: the last Linear with the "
                                            "model's output size].")
@click.option("--train-bias/--no-train-bias", default=True, show_default=True,
              help="Train the biases of the masked layers in full.")
@click.option("--train-head/--no-train-head", default=True, show_default=True, help="Train the head in full.")
@click.option("--train-norms", is_flag=True, help="Also train normalisation layers (frozen by default, as in GPS).")
@click.option("--train-embeddings", is_flag=True, help="Also train position embeddings and class tokens.")
@click.option("--train-full", multiple=True, help="Also train parameters matching this glob in full (repeatable).")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most this many training samples.")
@click.option("--image-size", default=None, help="H,W of the model input [default: from the model].")
@click.option("--mean", default=None, help=f"Per-channel mean for images [default: {','.join(map(str, IMAGENET_MEAN))}].")
@click.option("--std", default=None, help=f"Per-channel std for images [default: {','.join(map(str, IMAGENET_STD))}].")
@click.option("--crop-pct", type=float, default=0.875, show_default=True, help="Resize to size/crop_pct, then crop.")
@click.option("--save-merged", is_flag=True, help="Also write the merged state dict (merged.safetensors).")
@click.option("--no-plot", is_flag=True, help="Do not draw training_curve.png.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="PyTorch CPU threads.")
@click.option("--force", is_flag=True, help="Overwrite the files of an existing run folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-epoch lines.")
def train(factory: str, weights: str | None, masks: str, data: str, val: str | None, output: str, epochs: int,
          lr: float, batch_size: int, optimizer: str, weight_decay: float, warmup_epochs: float, min_lr: float,
          grad_clip: float | None, label_smoothing: float, seed: int, num_classes: int | None, head: str | None,
          train_bias: bool, train_head: bool, train_norms: bool, train_embeddings: bool, train_full: tuple[str, ...],
          max_samples: int | None, image_size: str | None, mean: str | None, std: str | None, crop_pct: float,
          save_merged: bool, no_plot: bool, device: str, threads: int | None, force: bool, quiet: bool) -> None:
    """Fine-tune the selected weights of the model built by FACTORY (module:function or file.py:function)."""
    from fps_graph.training.train import TrainOptions, run_train

    if not 0 < crop_pct <= 1:
        raise FpsGraphError("--crop-pct must be in (0, 1]")
    size = parse_ints(image_size, "--image-size")
    if size is not None and len(size) == 1:
        size = (size[0], size[0])
    opts = TrainOptions(
        factory=factory, masks=masks, data=data, output=output, weights=weights, val=val, epochs=epochs, lr=lr,
        batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        min_lr=min_lr, grad_clip=grad_clip, label_smoothing=label_smoothing, seed=seed, num_classes=num_classes,
        head=head, train_bias=train_bias, train_head=train_head, train_norms=train_norms,
        train_embeddings=train_embeddings, train_full=train_full, max_samples=max_samples,
        image=ImageOptions(size=size, mean=parse_floats(mean, "--mean") or IMAGENET_MEAN,
                           std=parse_floats(std, "--std") or IMAGENET_STD, crop_pct=crop_pct),
        save_merged=save_merged, plot=not no_plot, threads=threads, device=device, force=force)

    def on_epoch(rec: dict) -> None:
        if quiet:
            return
        line = f"epoch {rec['epoch']:>3}/{epochs}: loss {rec['train_loss']:.4f} acc {rec['train_acc']:.3f}"
        if "val_loss" in rec:
            line += f" | val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.3f}"
        click.echo(line + f" | lr {rec['lr']:.2e} | {rec['seconds']:.1f} s", err=True)

    result = run_train(opts, progress=None if quiet else tqdm_progress, on_epoch=on_epoch)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if quiet:
        return
    m = result.metrics
    for n in m.get("notes", []):
        click.echo(f"note: {n}", err=True)
    t, mem = m["trainable"], m["memory"]
    click.echo(f"trainable: {t['trainable']:,} values ({t['selected']:,} selected in {t['sparse_tensors']} tensors "
               f"+ {t['full_tensors']:,} in {len(m['trained_in_full'])} tensors trained in full) = "
               f"{100 * t['fraction']:.2f}% of full fine-tuning's {t['full_finetune']:,}", err=True)
    st = mem["train_state"]
    click.echo(f"memory: peak RSS {mem['peak_rss_mb']:.0f} MB ({mem['peak_rss_scope']}, +{mem['peak_increase_mb']:.0f} MB"
               f" over the loaded model and data); training state "
               f"{st['sparse_mb']:.2f} MB vs {st['full_finetune_mb']:.2f} MB for full fine-tuning"
               + (f"; CUDA peak {mem['cuda_peak_allocated_mb']:.0f} MB" if "cuda_peak_allocated_mb" in mem else ""),
               err=True)
    click.echo(f"wrote {', '.join(result.files.values())} ({m['time']['train_seconds']:.1f} s training)", err=True)
