"""The Python API: the jobs of the CLI as functions, with the same options and the same checks.

``fps_graph.select`` chooses the weights to fine-tune, ``fps_graph.inspect`` lists the layers it would score,
``fps_graph.load_masks`` reads a masks file, ``fps_graph.apply`` writes fine-tuned values back into the ONNX model.
The torch side (``fps_graph.attach``, ``fps_graph.load_delta``) is imported only when used. Everything here is
re-exported at the package face; import it from there (``import fps_graph``), deep paths are private.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fps_graph.data.sources import ImageOptions
from fps_graph.data.text import TextOptions, resolve_model_path
from fps_graph.errors import OptionError
from fps_graph.formats import masks as _masks
from fps_graph.formats.io import check_output_path
from fps_graph.formats.stats import Stats
from fps_graph.graph.apply import apply_delta
from fps_graph.graph.plan import make_plan
from fps_graph.runtime.calibrate import CalibrationInfo
from fps_graph.runtime.config import RuntimeConfig
from fps_graph.runtime.shards import DEFAULT_SHARD_SIZE, ClusterOptions
from fps_graph.selection.pipeline import (ProgressFactory, SelectOptions, SelectResult, describe, load_state_dict,
                                          run_select, write_result, write_stats)
from fps_graph.selection.ranking import Budget, parse_budget

__all__ = ["Selection", "select", "inspect", "load_masks", "apply"]


@dataclass
class Selection:
    """What ``select`` chose, ready to save or to hand to ``attach``.

    Attributes:
        indices (`dict[str, np.ndarray]`): sorted flat int64 indices of the selected entries, per PyTorch name,
            in that tensor's own layout.
        tensors (`dict[str, dict]`): per name: shape, ONNX initializer, layout, selected and total counts.
        metadata (`dict`): the masks file header (score, statistic, budget, model hash, how the data was prepared).
        summary (`dict`): what the run measured (selected, total, samples, seconds, provider, peak memory, ...).
        warnings (`list[str]`): what the run would print as warnings (the library never prints).
        stats (`Stats`, *optional*): the activation statistics, when they were collected or loaded.
        calibration (`CalibrationInfo`, *optional*): how the calibration ran (provider, seconds, samples, a Ray
            run's report); None when the statistics were loaded or the score reads none.
        scales (`dict[str, np.ndarray]`): per name, each selected entry's input statistic aligned with ``indices``
            (written as ``<name>::input_scale``; training's per-entry step sizes); empty for scores that read none.
    """

    indices: dict[str, np.ndarray]
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, Any]
    summary: dict[str, Any]
    warnings: list[str]
    stats: Stats | None = None
    calibration: CalibrationInfo | None = None
    scales: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def selected(self) -> int:
        """Entries selected over all tensors."""
        return int(self.summary["selected"])

    @property
    def total(self) -> int:
        """Entries of all scored tensors."""
        return int(self.summary["total"])

    def masks(self) -> dict[str, np.ndarray]:
        """Dense bool masks (True = selected, trainable) of each tensor's shape, like ``load_masks`` returns."""
        out = {}
        for key, idx in self.indices.items():
            shape = tuple(self.tensors[key]["shape"])
            m = np.zeros(int(np.prod(shape)), dtype=bool)
            m[idx] = True
            out[key] = m.reshape(shape)
        return out

    def save(self, path: str | os.PathLike, *, dense: bool = False, force: bool = False) -> Path:
        """Write the masks file atomically (``dense``: bool masks instead of indices); returns its path."""
        check_output_path(path, force)
        write_result(self._result(), path, dense=dense, force=force)
        return Path(path)

    def save_stats(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the activation statistics (float64 sums and counts) for ``select(stats_in=...)`` later."""
        if self.stats is None:
            raise OptionError("this selection holds no statistics (its score reads no activations)")
        check_output_path(path, force)
        write_stats(self.stats, path, force)
        return Path(path)

    def _result(self) -> SelectResult:
        return SelectResult(self.indices, self.tensors, self.metadata, self.stats, self.calibration, self.warnings,
                            self.summary, self.scales)


def _budget(budget: str | float | int | Budget | None) -> Budget | None:
    if budget is None or isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        return parse_budget(budget)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise OptionError(f"budget must be a fraction, a count or a string such as '0.5%' (got {budget!r})")
    if isinstance(budget, float):
        return parse_budget(repr(budget)) if budget <= 1 else parse_budget(str(int(budget)))
    return Budget(count=budget) if budget > 0 else parse_budget(str(budget))


def select(model: str | os.PathLike, data: str | os.PathLike | None = None, *, score: str = "fps",
           k: int | None = None, budget: str | float | int | Budget | None = None, granularity: str = "neuron",
           min_per_layer: int = 0, stat: str | None = None, include: Sequence[str] = (),
           exclude: Sequence[str] = (), anchor: str | os.PathLike | None = None,
           anchor_stats: Sequence[str | os.PathLike] = (), stats_in: Sequence[str | os.PathLike] = (),
           seed: int = 0, eps: float = 1e-6, batch_size: int = 32, max_samples: int | None = None,
           shuffle: bool = False, image: ImageOptions | None = None, text: TextOptions | None = None,
           static: dict[str, str] | None = None, state_dict: str | os.PathLike | None = None,
           runtime: RuntimeConfig | None = None, cluster: ClusterOptions | None = None,
           shard_size: int = DEFAULT_SHARD_SIZE, output: str | os.PathLike | None = None,
           stats_out: str | os.PathLike | None = None, dense: bool = False, force: bool = False,
           progress: ProgressFactory | None = None) -> Selection:
    """Choose the weights of an ONNX model to fine-tune, from one forward pass over calibration data.

    The same job, options and checks as ``fps-graph select`` (docs/select.md); nothing is printed.

    Args:
        model (`str` or `PathLike`): an ONNX file, or a folder holding one (a Hugging Face / Optimum export, an
            ONNX Runtime GenAI folder).
        data (`str` or `PathLike`, *optional*): calibration data: an image folder, ``.npy``/``.npz``/
            ``.safetensors`` arrays, or text (``.txt``/``.jsonl``). Not needed by ``magnitude``/``random`` or with
            ``stats_in``.
        score (`str`, defaults to ``"fps"``): a registered score (``fps``, ``wanda``, ``magnitude``, ``random``,
            ``gd-fps``, and the variants of docs/quality.md).
        k (`int`, *optional*): entries per output neuron (the default when no budget is given: 1).
        budget (`str`, `float` or `int`, *optional*): instead of ``k``: a fraction (0.005), a percentage string
            ("0.5%") or a count, spread by ``granularity`` ("neuron", "layer" or "network").
        min_per_layer (`int`, defaults to 0): with a network budget, every scored tensor keeps its N best entries.
        stat (`str`, *optional*): "mean-abs" or "l2" instead of the score's own statistic.
        include, exclude (`Sequence[str]`): globs on a layer's PyTorch name, weight name or node name.
        anchor, anchor_stats: the anchor data, or its saved statistics, for the scores that compare with one.
        stats_in (`Sequence[str]`): saved statistics to select from instead of running the model (summed).
        seed (`int`, defaults to 0): for ``random``, the sampled scores and ``shuffle``.
        eps (`float`, defaults to 1e-6): added to the anchor statistic by ``gd-fps``.
        batch_size (`int`, defaults to 32), max_samples (`int`, *optional*), shuffle (`bool`): how data is read.
        image (`ImageOptions`, *optional*), text (`TextOptions`, *optional*): how images and text are prepared.
        static (`dict[str, str]`, *optional*): model inputs with no sample axis, name -> ``.npy`` file.
        state_dict (`str`, *optional*): a safetensors state dict, to name weights by value.
        runtime (`RuntimeConfig`, *optional*): how ONNX Runtime runs (provider, threads, memory budget, ...).
        cluster (`ClusterOptions`, *optional*): calibrate on Ray workers (docs/scale_out.md).
        shard_size (`int`): samples per shard of the exact float64 sum (the same value gives the same bytes).
        output (`str`, *optional*): also write the masks file here (``dense``: bool masks; ``force``: overwrite).
        stats_out (`str`, *optional*): also write the statistics here.
        progress (`callable`, *optional*): ``progress(total_samples, label)`` returns a per-batch callback.

    Returns:
        `Selection`: the selected indices per PyTorch name, the file header, the run's summary and warnings.

    Raises:
        `OptionError`, `DataError`, `ModelError`, `RuntimeFailure` (all `FpsGraphError`): bad options, data or
        model, or a failed run; nothing is written then.

    Example:
        >>> import fps_graph
        >>> sel = fps_graph.select("samples/tiny_hybrid.onnx", "samples/images", k=4,
        ...                        runtime=fps_graph.RuntimeConfig(provider="cpu"))
        >>> sel.selected <= sel.total
        True
        >>> path = sel.save("masks.safetensors", force=True)
    """
    if k is not None and budget is not None:
        raise OptionError("give either k or budget, not both")
    for path in (output, stats_out):          # refuse before any work: never a finished run with nowhere to go
        if path is not None:
            check_output_path(path, force)
    opts = SelectOptions(
        score=score, stat=stat, k=k if (k is not None or budget is not None) else 1, budget=_budget(budget),
        granularity=granularity, include=tuple(include), exclude=tuple(exclude), seed=seed, eps=eps,
        batch_size=batch_size, max_samples=max_samples, shuffle=shuffle, image=image or ImageOptions(),
        text=text or TextOptions(), stats_in=tuple(map(str, stats_in)),
        anchor=None if anchor is None else str(anchor), anchor_stats_in=tuple(map(str, anchor_stats)),
        state_dict=None if state_dict is None else str(state_dict), static=dict(static or {}),
        shard_size=shard_size, cluster=cluster, min_per_layer=min_per_layer, runtime=runtime or RuntimeConfig())
    if budget is not None:
        opts.k = None
    res = run_select(model, None if data is None else str(data), opts, progress=progress,
                     stats_out=stats_out is not None)
    sel = Selection(res.indices, res.tensors, res.metadata, res.summary, res.warnings, res.stats, res.calibration, res.scales)
    if stats_out is not None and res.stats is not None:
        sel.save_stats(stats_out, force=force)
    if output is not None:
        sel.save(output, dense=dense, force=force)
    return sel


def inspect(model: str | os.PathLike, *, state_dict: str | os.PathLike | None = None,
            masks: str | os.PathLike | None = None) -> dict[str, Any]:
    """The layers of a model that selection scores, and the nodes it skips (``fps-graph inspect --json``).

    Args:
        model (`str` or `PathLike`): an ONNX file or a folder holding one.
        state_dict (`str`, *optional*): a safetensors state dict, to name weights by value.
        masks (`str`, *optional*): a masks file selected on this model: the view of that run (the layers it
            skipped, such as those in If branches its data never took, listed as skipped; ``selected`` entries per
            scored layer).

    Returns:
        `dict`: ``layers`` (node, op, weight, PyTorch ``name`` and where it came from, shapes, layout, params),
        ``skipped`` (node, op, reason), ``scored_params``, ``inputs``, ``model`` and its ``sha256``.

    Example:
        >>> view = fps_graph.inspect("samples/tiny_hybrid.onnx")
        >>> [layer["name"] for layer in view["layers"]][:2]
        ['patch_embed.weight', 'blocks.0.qkv.weight']
    """
    sd = load_state_dict(str(state_dict)) if state_dict is not None else None
    run = _masks.read_metadata(masks) if masks is not None else None
    return describe(make_plan(resolve_model_path(model), state_dict=sd), run)


def load_masks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Dense bool masks (True = selected, trainable) per PyTorch name, from a masks file in either layout.

    NumPy and safetensors only: no torch, no ONNX model needed.

    Args:
        path (`str` or `PathLike`): a masks file written by ``select`` (``Selection.save``, ``fps-graph select``).

    Returns:
        `dict[str, np.ndarray]`: one bool array of each tensor's shape.

    Example:
        >>> masks = fps_graph.load_masks("masks.safetensors")
        >>> sum(int(m.sum()) for m in masks.values()) > 0
        True
    """
    return _masks.load_masks(path)


def apply(model: str | os.PathLike, delta: str | os.PathLike, output: str | os.PathLike, *, force: bool = False,
          check: bool = True) -> dict[str, Any]:
    """Write a copy of an ONNX model with the fine-tuned values of a delta file (``fps-graph apply``; no torch).

    Every stored copy of a trained tensor is patched; with ``check`` each copy must hold the values training
    started from, so a delta never lands on another model.

    Args:
        model (`str` or `PathLike`): the base ONNX file, or an ONNX Runtime GenAI folder.
        delta (`str` or `PathLike`): ``delta.safetensors`` from training (``handle.save``, ``fps-graph train``).
        output (`str` or `PathLike`): the ONNX file to write (external data goes to ``<output>.data``); for a GenAI
            folder, the folder to write (every file copied, the model patched).
        force (`bool`, defaults to False): overwrite an existing output.
        check (`bool`, defaults to True): require the base values training started from.

    Returns:
        `dict`: ``output``, ``tensors``, ``sparse``, ``full``, ``initializers``, ``values_changed``,
        ``external_data`` and ``notes``.

    Example:
        >>> report = fps_graph.apply("model.onnx", "run/delta.safetensors", "model_finetuned.onnx")
    """
    return apply_delta(model, delta, output, force=force, check=check)
