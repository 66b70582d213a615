"""`fps-graph export`: PyTorch -> ONNX with the weight-name map recorded (a factory, or a Hugging Face folder)."""
from __future__ import annotations

import click

from fps_graph_cli.common import TORCH_INSTALL, parse_ints, require

# options that only a FACTORY export takes (a Hugging Face folder knows its inputs)
FACTORY_ONLY = ("weights", "input_shape", "exporter", "dynamic_batch", "input_name", "fold")
HF_ONLY = ("task", "cache", "check")


@click.command()
@click.argument("model", metavar="FACTORY|hf:DIR")
@click.option("--weights", type=click.Path(dir_okay=False), help="FACTORY: safetensors state dict to load first.")
@click.option("--input-shape", help="FACTORY: example input shape, e.g. 1,3,224,224 (required for a factory).")
@click.option("-o", "--output", required=True,
              help="FACTORY: the ONNX file to write. hf:DIR: the folder to write (model.onnx, tokenizer.json, "
                   "config.json), which `select` reads.")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True,
              help="FACTORY: torch.onnx.export's exporter (hf:DIR always uses the TorchScript one, see docs).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True, help="FACTORY: batch axis.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--input-name", default="input", show_default=True, help="FACTORY: the ONNX input's name.")
@click.option("--fold/--no-fold", default=False, show_default=True,
              help="FACTORY: let the exporter fold constants (BatchNorm into Conv, transposed Linear weights). "
                   "Without it the ONNX weights are the module's own tensors; ONNX Runtime folds them when it loads "
                   "the model.")
@click.option("--task", type=click.Choice(["causal-lm", "seq-cls", "feature-extraction"]), default=None,
              help="hf:DIR: the head to export, as `train hf:DIR --task` names it (feature-extraction: the base "
                   "model, no head). Default: from config.json's architectures.")
@click.option("--cache/--no-cache", default=False, show_default=True,
              help="hf:DIR, causal-lm: add past key/value inputs and present outputs (Optimum's decoder_with_past "
                   "layout). Masks are the same either way; without a cache the graph is simpler for `select`.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="hf:DIR: after export, compare ONNX Runtime with PyTorch on two other batch shapes (one padded) "
                   "and write nothing unless they agree within a relative 1e-4.")
@click.option("--force", is_flag=True, help="Overwrite an existing output (hf:DIR: replace the folder's files).")
@click.pass_context
def export(ctx: click.Context, model: str, weights: str | None, input_shape: str | None, output: str,
           exporter: str, dynamic_batch: bool, opset: int | None, input_name: str, force: bool, fold: bool,
           task: str | None, cache: bool, check: bool) -> None:
    """Export a model to ONNX: FACTORY (module:function or file.py:function), or hf:DIR, a Hugging Face model
    folder (save_pretrained), to the ONNX folder that `select` reads."""
    given = {n for n in FACTORY_ONLY + HF_ONLY
             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT}
    require("torch", "export", TORCH_INSTALL)
    if model.startswith("hf:"):
        wrong = sorted(given & set(FACTORY_ONLY))
        if wrong:
            raise click.UsageError(f"--{wrong[0].replace('_', '-')} is for a FACTORY export; a Hugging Face folder "
                                   "knows its inputs")
        require("transformers", "export hf:DIR", "pip install 'fps-graph[torch]'")
        from fps_graph.integrations.hf_export import HfExportOptions, export_hf

        report = export_hf(model[3:], output, HfExportOptions(task=task, cache=cache, opset=opset, check=check,
                                                              force=force))
        missing = report["missing_keys"]
        if missing:
            click.echo(f"warning: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
                       f" not in {model[3:]}: initialised at random (seed 0) by transformers, as a new "
                       f"{report['task']} head; `train --task {report['task']}` trains its own", err=True)
        check_txt = f"; ONNX Runtime == PyTorch within {report['max_rel_error']:.1e}" if check else ""
        tied = "".join(f"; tied: {k} (also {', '.join(v)})" for k, v in report["tied"].items())
        click.echo(f"wrote {report['output']}/ ({report['class']}, {report['task']}, inputs "
                   f"{', '.join(report['inputs'][:3])}{' ...' if len(report['inputs']) > 3 else ''}): "
                   f"{report['mapped']} weights mapped to PyTorch names{tied}{check_txt}", err=True)
        return
    wrong = sorted(given & set(HF_ONLY))
    if wrong:
        raise click.UsageError(f"--{wrong[0]} is for an hf:DIR export")
    if input_shape is None:
        raise click.UsageError("Missing option '--input-shape' (a FACTORY export needs an example input shape)")
    if exporter == "dynamo":
        require("onnxscript", "export", "pip install onnxscript (or use --exporter legacy)")
    from fps_graph.integrations.torch_export import export as do_export

    report = do_export(model, parse_ints(input_shape, "--input-shape"), output, weights=weights, exporter=exporter,
                       dynamic_batch=dynamic_batch, opset=opset, input_name=input_name, force=force,
                       fold=fold)
    click.echo(f"wrote {report['output']} ({report['exporter']}): {report['layers']} scored layers, "
               f"{report['mapped']} weights mapped to PyTorch names", err=True)

