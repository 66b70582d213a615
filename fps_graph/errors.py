"""The exceptions the library raises: one base class, one subclass per kind of problem.

Callers catch ``FpsGraphError`` for every problem the library reports (the CLI does, and prints its message as one
line); the subclasses say which kind it was, so a program can react to bad data differently from a missing GPU.
Every error raised while handling another keeps it as ``__cause__`` (``raise DataError(...) from err``), so a
traceback (``fps-graph --debug``) shows what the underlying library said.

Example:
    >>> import fps_graph
    >>> try:
    ...     fps_graph.load_masks("missing.safetensors")
    ... except fps_graph.DataError as err:
    ...     print(err)
    masks file not found: missing.safetensors
"""
from __future__ import annotations

__all__ = ["FpsGraphError", "OptionError", "DataError", "ModelError", "RuntimeFailure"]


class FpsGraphError(Exception):
    """Bad input or an impossible request, with a message that names the file, tensor or option at fault.

    The base of every error below; catch it to handle them all.
    """


class OptionError(FpsGraphError):
    """An option, or a combination of options, that is invalid or contradictory (a budget above 100%, --k with
    --budget, an output file that exists without force). Nothing was read or written."""


class DataError(FpsGraphError):
    """Input data or a saved artifact that cannot be used: calibration or training data, static inputs, statistics,
    masks, delta or state-dict files that are missing, unreadable, malformed, or do not fit the model."""


class ModelError(FpsGraphError):
    """A model that cannot be read, or that holds something this tool does not support (a layout, an input
    convention, a folder without an ONNX file, a PyTorch factory that fails)."""


class RuntimeFailure(FpsGraphError):
    """The inputs passed every check, but running them failed: ONNX Runtime, a provider, Ray workers, an optional
    package that is missing or broken, or an internal inconsistency (reported, never hidden)."""
