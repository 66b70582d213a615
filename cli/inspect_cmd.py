"""`fps-graph inspect`: the selectable layers of a model, and the ones skipped."""
from __future__ import annotations

import json

import click

from fps_graph import inspect as inspect_model   # the API; loaded here, when the command loads


@click.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--state-dict", type=click.Path(dir_okay=False), help="safetensors state dict to match names by value.")
@click.option("--masks", "masks", type=click.Path(dir_okay=False),
              help="A masks file `select` wrote for this model: show that run's view (the layers it skipped, e.g. in "
                   "If branches its data never took, listed as skipped; entries selected per scored layer).")
def inspect(model: str, as_json: bool, state_dict: str | None, masks: str | None) -> None:
    """List the layers of MODEL (ONNX file or Hugging Face export folder) that selection scores
    (MatMul/Gemm/Conv/ConvTranspose/LSTM/GRU/RNN with constant weights)."""
    view = inspect_model(model, state_dict=state_dict, masks=masks)
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    rows = [("node", "op", "weight (PyTorch name)", "shape", "input-feature layout", "params", "name from", "runs")
            + (("selected",) if masks else ())]
    for l in view["layers"]:
        name = l["name"] if l["name"] == l["weight"] else f"{l['name']} <- {l['weight']}"
        if l["stored"] != l["weight"] and l["stored_dtype"] != "float32":      # a quantized weight
            name += f" <- {l['stored']} ({l['stored_dtype']})"
        rows.append((l["node"], l["op"], name, "x".join(map(str, l["weight_shape"])), l["input_axis"],
                     f"{l['params']:,}", l["name_source"], "if branch" if l["branches"] else "always")
                    + ((f"{l['selected']:,}",) if masks else ()))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))
    w = view["weights"]
    click.echo(f"\n{len(view['layers'])} scored layers, {view['scored_params']:,} scored parameters; "
               f"{100 * w['share']:.1f}% of the model's {w['total_values']:,} weight values are scored")
    branched = sum(1 for l in view["layers"] if l["branches"])
    if branched and not masks:
        click.echo(f"{branched} of them sit in If branches (runs: if branch): select scores them only when the "
                   "calibration data takes their branch, and lists them as skipped otherwise (inspect --masks FILE "
                   "shows what a run did)")
    if view["skipped"]:
        click.echo(f"\nskipped ({len(view['skipped'])}):")
        for s in view["skipped"]:
            what = f"{s['weight']} {s['shape']} {s['dtype']}: " if s["weight"] else ""
            click.echo(f"  {s['node']} ({s['op']}): {what}{s['reason']}")
