"""`fps-graph export`: PyTorch -> ONNX with the weight-name map recorded."""
from __future__ import annotations

import click

from fps_graph_cli.common import TORCH_INSTALL, parse_ints, require


@click.command()
@click.argument("factory")
@click.option("--weights", type=click.Path(dir_okay=False), help="safetensors state dict to load first.")
@click.option("--input-shape", required=True, help="Example input shape, e.g. 1,3,224,224.")
@click.option("-o", "--output", required=True, help="ONNX file to write.")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True)
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--input-name", default="input", show_default=True)
@click.option("--fold/--no-fold", default=False, show_default=True,
              help="Let the exporter fold constants (BatchNorm into Conv, transposed Linear weights). Without it the"
                   " ONNX weights are the module's own tensors; ONNX Runtime folds them when it loads the model.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def export(factory: str, weights: str | None, input_shape: str, output: str, exporter: str, dynamic_batch: bool,
           opset: int | None, input_name: str, force: bool, fold: bool) -> None:
    """Export the model built by FACTORY (module:function or file.py:function) to ONNX."""
    require("torch", "export", TORCH_INSTALL)
    if exporter == "dynamo":
        require("onnxscript", "export", "pip install onnxscript (or use --exporter legacy)")
    from fps_graph.integrations.torch_export import export as do_export

    report = do_export(factory, parse_ints(input_shape, "--input-shape"), output, weights=weights, exporter=exporter,
                       dynamic_batch=dynamic_batch, opset=opset, input_name=input_name, force=force,
                       fold=fold)
    click.echo(f"wrote {report['output']} ({report['exporter']}): {report['layers']} scored layers, "
               f"{report['mapped']} weights mapped to PyTorch names", err=True)
