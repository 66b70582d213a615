"""`fps-graph compare`: the default selection vs random selection vs LoRA at the same trainable count, on your own
Hugging Face model and data. Thin: options are the fields of ``fps_graph.compare.config.CompareConfig`` (help and
defaults from there); it prints progress, one line per finished run and the summary."""
from __future__ import annotations

import statistics
from dataclasses import MISSING
from typing import Any, Callable

import click

from fps_graph.compare.config import TASKS, CompareConfig
from fps_graph.compare.report import budget_label
from fps_graph.errors import OptionError
from fps_graph.selection.ranking import parse_budget
from fps_graph.training.config import default_of, help_of
from fps_graph_cli.common import TORCH_INSTALL, require, tqdm_progress


def opt(name: str, *decls: str, **kw: Any) -> Callable:
    """A click option for a CompareConfig field: help and default from the field."""
    default = default_of(CompareConfig, name)
    kw.setdefault("help", help_of(CompareConfig, name))
    if "is_flag" not in kw and default is not MISSING:
        if isinstance(default, tuple):
            default = ",".join(f"{v * 100:g}%" if name == "budgets" else f"{v:g}" if isinstance(v, float) else str(v)
                               for v in default)
        kw.setdefault("default", default)
        kw.setdefault("show_default", default is not None)
    return click.option(*decls, **kw)


def _list(text: str, flag: str, parse: Callable[[str], Any]) -> tuple[Any, ...]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise OptionError(f"{flag} {text!r}: comma-separated values, none empty")
    try:
        return tuple(parse(t) for t in items)
    except ValueError as exc:
        raise OptionError(f"{flag} {text!r}: {exc}") from exc


def _budget(text: str) -> float:
    b = parse_budget(text)
    if b.fraction is None:
        raise OptionError(f"--budget {text}: a fraction of each layer's weights (0.5% or 0.005), not a count")
    return b.fraction


@click.command()
@click.argument("model", metavar="MODEL")
@opt("train", "--train", required=True)
@opt("val", "--val", required=True)
@opt("test", "--test")
@opt("task", "--task", type=click.Choice(TASKS))
@opt("output", "-o", "--output", required=True)
@opt("methods", "--methods")
@opt("budgets", "--budget", "budgets")
@opt("lrs", "--lrs")
@opt("seeds", "--seeds", type=click.IntRange(min=1))
@opt("epochs", "--epochs", type=click.IntRange(min=1))
@opt("batch_size", "--batch-size", type=click.IntRange(min=1))
@opt("max_length", "--max-length", type=click.IntRange(min=2))
@opt("max_samples", "--max-samples", type=click.IntRange(min=1))
@opt("text_field", "--text-field")
@opt("label_field", "--label-field")
@opt("threads", "--threads", type=click.IntRange(min=1))
@opt("force", "--force", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-run lines (the summary and warnings stay).")
def compare(model: str, methods: str, budgets: str, lrs: str, quiet: bool, **kw: Any) -> None:
    """Compare the default selection with random selection and LoRA at the same trainable count on MODEL (hf:DIR)
    and your data: learning rates swept and chosen on validation, several seeds, paired differences; writes
    compare.md, compare.json and compare.png into the run folder (docs/quality.md)."""
    cfg = CompareConfig(model=model, methods=_list(methods, "--methods", str), budgets=_list(budgets, "--budget",
                        _budget), lrs=_list(lrs, "--lrs", float), **kw)
    require("torch", "compare", TORCH_INSTALL)
    require("transformers", "compare", "pip install 'fps-graph[compare]'")
    require("peft", "compare", "pip install 'fps-graph[compare]'")
    from fps_graph.compare.job import run_compare

    res = run_compare(cfg, Printer(quiet))
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    sec = next(iter(res.doc["experiments"].values()))
    mid = budget_label(res.doc["plan"]["sweep_budget"])
    causal = any("ppl" in r["metrics"].get(sec["split"], {}) for r in sec["runs"])
    what = f"{sec['split']} {'perplexity' if causal else 'accuracy %'}"
    for m, lr in res.lrs.items():
        vals = (sec["cells"].get(f"{m}@{mid}") or sec["cells"].get(m) or {}).get("values", [])
        if not vals:
            continue
        mean = statistics.fmean(vals)
        sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        d = sec["paired"].get(m, {}).get("random", {})
        unit = " (loss per token x100, + = better)" if causal else " pp"
        vs = (f"; vs random {d['mean_pp']:+.2f}" + (f" ± {d['sem_pp']:.2f}" if d["n"] > 1 else "") + unit
              if d.get("n") else "")
        rate = f"lr {lr:g}" if lr is not None else "untrained"
        click.echo(f"{m:>12}: {rate}; {what} {mean:.2f}{sd} ({len(vals)} seed(s)){vs}", err=True)
    click.echo(f"wrote {res.files['md']}, {res.files['json']}" + (f", {res.files['plot']}" if "plot" in res.files
                                                                   else ""), err=True)


class Printer:
    """What `compare` shows: its steps, a progress bar over the training samples of every run, a line per run."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: Any = None

    def on_stage(self, text: str) -> None:
        if not self.quiet:
            self._echo(text)

    def progress(self, total: int, label: str) -> Callable[[int], None] | None:
        return None if self.quiet else tqdm_progress(total, label)

    def on_plan(self, runs: int, samples: int) -> None:
        if self.quiet or not samples:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=samples, desc=f"{runs} runs", unit="sample", dynamic_ncols=True, leave=False,
                        disable=None, file=click.get_text_stream("stderr"))

    def on_samples(self, n: int, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(n)

    def on_run(self, rec: dict[str, Any]) -> None:
        if self.quiet:
            return
        parts = []
        for split, m in rec["metrics"].items():
            parts.append(f"{split} " + (f"perplexity {m['ppl']:.2f}" if "ppl" in m
                                        else f"accuracy {100 * m['acc']:.1f}%"))
        lr = f" lr {rec['lr']:g}" if rec["lr"] is not None else ""
        budget = f" budget {rec['extra']['budget']}" if rec["extra"]["budget"] != "-" else ""
        what = "diverged; " if rec.get("diverged") else ""
        self._echo(f"{rec['method']}{lr} seed {rec['seed']}{budget}: {what}{', '.join(parts)} "
                   f"({rec['trainable']:,} trainable, {rec['wall_seconds']:.0f} s)")

    def _echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=click.get_text_stream("stderr"))
        else:
            click.echo(text, err=True)
