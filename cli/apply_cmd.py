"""`fps-graph apply`: write the fine-tuned ONNX model from a base model and a delta file."""
from __future__ import annotations

import click

from fps_graph import apply as apply_delta   # the API; loaded here, when the command loads


@click.command()
@click.argument("model", type=click.Path())
@click.argument("delta", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, help="ONNX file to write (external data goes to <output>.data); for an "
              "ONNX Runtime GenAI folder MODEL, the folder to write (every file copied, the model patched).")
@click.option("--no-check", is_flag=True, help="Do not require the model to hold the values training started from.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
def apply(model: str, delta: str, output: str, no_check: bool, force: bool, quiet: bool) -> None:
    """Patch the initializers of MODEL (an ONNX file, or an ONNX Runtime GenAI folder) with the fine-tuned values in
    DELTA (from `fps-graph train`)."""
    report = apply_delta(model, delta, output, force=force, check=not no_check)
    if quiet:
        return
    for n in report["notes"]:
        click.echo(f"note: {n}", err=True)
    click.echo(f"wrote {report['output']}: {report['tensors']} tensors ({report['sparse']} sparse, {report['full']} "
               f"full) into {report['initializers']} initializers, {report['values_changed']:,} values"
               + (f"; external data in {report['external_data']}" if report["external_data"] else ""), err=True)
