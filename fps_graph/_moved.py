"""Old import paths that keep working for one release, with a DeprecationWarning naming the new one.

A module that moved leaves a stub whose ``__getattr__`` is ``moved(__name__, {...})``: the first access to each
old name warns once per call site (Python's warning filter) and returns the object from its new home.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

__all__ = ["moved"]


def moved(old_module: str, targets: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module`` whose names now live at ``targets[name]`` ("pkg.module:attr")."""

    def __getattr__(name: str) -> Any:
        target = targets.get(name)
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        warnings.warn(f"{old_module}.{name} moved to {module}.{attr or name}; the old path will be removed in the "
                      "next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr or name)

    return __getattr__
