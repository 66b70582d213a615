"""Shared CLI pieces: progress bars and option parsers."""
from __future__ import annotations

from typing import Callable

import click


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
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def parse_ints(text: str | None, name: str) -> tuple[int, ...] | None:
    """'224,224' -> (224, 224)."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
