"""Shared CLI pieces: progress bars, option parsers, and the check for optional packages."""
from __future__ import annotations

import importlib
from typing import Callable

import click

from fps_graph.errors import RuntimeFailure

# How to install what `train` and `export` need: the README's advice (torch first, so that pip does not pick a
# torch build for you through the extra; the CPU build here, or the CUDA build from pytorch.org on a GPU machine).
TORCH_INSTALL = "pip install torch==2.13.0, then pip install 'fps-graph[torch]'"


def require(module: str, command: str, install: str) -> None:
    """Refuse in one line, before any work, when an optional package a subcommand needs cannot be imported (the
    subcommand imports it next anyway, so this costs nothing)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        what = f"{module}, which is not installed" if missing == module else \
            f"{module}, which cannot be imported ({missing} is missing)"
        raise RuntimeFailure(f"`fps-graph {command}` needs {what}: {install}") from exc
    except OSError as exc:   # a wheel whose compiled libraries do not load
        raise RuntimeFailure(f"`fps-graph {command}` needs {module}, which fails to load ({exc}): reinstall it; "
                            f"{install}") from exc


def tqdm_progress(total: int, label: str) -> Callable[[int], None]:
    """A per-batch callback that drives a tqdm bar on stderr (samples, samples/s, ETA)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="sample", unit_scale=False, dynamic_ncols=True, leave=False, disable=None,
               file=click.get_text_stream("stderr"))

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update


def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from exc


def parse_ints(text: str | None, name: str) -> tuple[int, ...] | None:
    """'224,224' -> (224, 224)."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from exc
