"""`fps-graph train`: masked fine-tuning of a PyTorch model with the selected weights."""
from __future__ import annotations

import click

from fps_graph.data.sources import IMAGENET_MEAN, IMAGENET_STD
from fps_graph.errors import FpsGraphError
from fps_graph_cli.common import TORCH_INSTALL, parse_floats, parse_ints, require, tqdm_progress


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
@click.option("--image-size", default=None, help="H,W of the model input [default: as select prepared its images "
                                                  "(recorded in the masks file), else from the model].")
@click.option("--mean", default=None, help="Per-channel mean for images [default: select's, else "
                                           f"{','.join(map(str, IMAGENET_MEAN))}].")
@click.option("--std", default=None, help="Per-channel std for images [default: select's, else "
                                          f"{','.join(map(str, IMAGENET_STD))}].")
@click.option("--crop-pct", type=float, default=None, help="Resize to size/crop_pct, then crop [default: select's, "
                                                           "else 0.875].")
@click.option("--save-merged", is_flag=True, help="Also write the merged state dict (merged.safetensors).")
@click.option("--no-plot", is_flag=True, help="Do not draw training_curve.png.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="PyTorch CPU threads.")
@click.option("--task", type=click.Choice(["image-cls", "causal-lm", "seq-cls"]), default=None,
              help="What to learn [default: image-cls for factories; for hf:DIR, from config.json's architectures].")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Text tasks: most tokens per sample; longer texts are an error [default: select's, else the "
                   "model's limit].")
@click.option("--tokenizer", default=None, help="Text tasks: tokenizer.json or its folder [default: select's, "
                                                "else the model folder].")
@click.option("--text-field", default="text", show_default=True, help="Text tasks: .jsonl field holding the text.")
@click.option("--label-field", default="label", show_default=True, help="seq-cls: .jsonl field holding the label.")
@click.option("--prompt-field", default=None, help="causal-lm: .jsonl field of a prompt that is not learnt.")
@click.option("--completion-field", default=None, help="causal-lm: .jsonl field of the completion that is learnt "
                                                       "[default: completion, with --prompt-field].")
@click.option("--gradient-checkpointing", is_flag=True, help="Hugging Face models: recompute activations in the "
                                                              "backward pass (less memory, ~30% more time).")
@click.option("--peft", is_flag=True, help="Also write the delta as a PEFT SHiRA adapter (adapter_config.json, "
                                           "adapter_model.safetensors); refused before training when it cannot be.")
@click.option("--force", is_flag=True, help="Overwrite the files of an existing run folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-epoch lines.")
def train(factory: str, weights: str | None, masks: str, data: str, val: str | None, output: str, epochs: int,
          lr: float, batch_size: int, optimizer: str, weight_decay: float, warmup_epochs: float, min_lr: float,
          grad_clip: float | None, label_smoothing: float, seed: int, num_classes: int | None, head: str | None,
          train_bias: bool, train_head: bool, train_norms: bool, train_embeddings: bool, train_full: tuple[str, ...],
          max_samples: int | None, image_size: str | None, mean: str | None, std: str | None, crop_pct: float | None,
          save_merged: bool, no_plot: bool, device: str, threads: int | None, task: str | None,
          max_length: int | None, tokenizer: str | None, text_field: str, label_field: str, prompt_field: str | None,
          completion_field: str | None, gradient_checkpointing: bool, peft: bool, force: bool, quiet: bool) -> None:
    """Fine-tune the selected weights of the model built by FACTORY (module:function or file.py:function), or of
    a Hugging Face model folder (hf:DIR, or a folder holding config.json) with --task causal-lm or seq-cls."""
    require("torch", "train", TORCH_INSTALL)
    from fps_graph.training.hf import TextOptions
    from fps_graph.training.train import TrainOptions, run_train

    if crop_pct is not None and not 0 < crop_pct <= 1:
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
        image_size=size, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), crop_pct=crop_pct,
        save_merged=save_merged, plot=not no_plot, threads=threads, device=device, force=force, task=task,
        text=TextOptions(max_length=max_length, tokenizer=tokenizer, text_field=text_field, label_field=label_field,
                         prompt_field=prompt_field, completion_field=completion_field),
        gradient_checkpointing=gradient_checkpointing, peft=peft)

    def on_epoch(rec: dict) -> None:
        if quiet:
            return
        m = "ppl" if "train_ppl" in rec else "acc"
        line = f"epoch {rec['epoch']:>3}/{epochs}: loss {rec['train_loss']:.4f} {m} {rec[f'train_{m}']:.3f}"
        if "val_loss" in rec:
            line += f" | val loss {rec['val_loss']:.4f} {m} {rec[f'val_{m}']:.3f}"
        click.echo(line + f" | lr {rec['lr']:.2e} | {rec['seconds']:.1f} s", err=True)

    result = run_train(opts, progress=None if quiet else tqdm_progress, on_epoch=on_epoch)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if quiet:
        return
    m = result.metrics
    for n in m.get("notes", []):
        click.echo(f"note: {n}", err=True)
    for line in trainable_lines(m, head_given=head is not None):
        click.echo(line, err=True)
    mem = m["memory"]
    st = mem["train_state"]
    click.echo(f"memory: peak RSS {mem['peak_rss_mb']:.0f} MB ({mem['peak_rss_scope']}, +{mem['peak_increase_mb']:.0f} MB"
               f" over the loaded model and data); training state "
               f"{st['sparse_mb']:.2f} MB vs {st['full_finetune_mb']:.2f} MB for full fine-tuning"
               + (f"; CUDA peak {mem['cuda_peak_allocated_mb']:.0f} MB" if "cuda_peak_allocated_mb" in mem else ""),
               err=True)
    click.echo(f"wrote {', '.join(result.files.values())} ({m['time']['train_seconds']:.1f} s training)", err=True)


def trainable_lines(m: dict, head_given: bool = False) -> list[str]:
    """The summary's head, trainable and selection lines: what trains in full is said, and counted apart from
    the selection, so the selected count is the masks' own."""
    t = m["trainable"]
    by_reason = t.get("full_by_reason", {})
    lines = []
    h = m.get("head")
    if h:
        how = "--head" if head_given else "detected"
        new = f"new, {h['num_classes']} classes, " if h.get("replaced") else ""
        if "head" in by_reason:
            lines.append(f"head: {h['name']} ({new}{how}) trains in full: {by_reason['head']:,} values (the default; "
                         "--no-train-head trains only its selected entries)")
        else:
            lines.append(f"head: {h['name']} ({how}) trains only its selected entries (--no-train-head)")
    reasons = ", ".join(f"{r} {v:,}" for r, v in by_reason.items())
    lines.append(f"trainable: {t['trainable']:,} values = {t['selected']:,} selected entries (sparse deltas in "
                 f"{t['sparse_tensors']} tensors) + {t['full_tensors']:,} trained in full in "
                 f"{len(m['trained_in_full'])} tensors ({reasons or 'none'}) = {100 * t['fraction']:.2f}% of full "
                 f"fine-tuning's {t['full_finetune']:,}")
    inside = t.get("selected_in_full") or {}
    if inside:
        n = sum(inside.values())
        lines.append(f"selection: the masks select {t['masks_selected']:,} entries; {n:,} of them lie in "
                     f"{', '.join(inside)}, trained in full anyway, so {t['selected']:,} train as sparse deltas")
    return lines
