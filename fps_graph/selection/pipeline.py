"""The `select` job end to end: model -> layers -> statistics -> scores -> masks (and the `inspect` view)."""
from __future__ import annotations

import functools
import os
import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.numpy import load_file

from fps_graph._version import __version__
from fps_graph.runtime.calibrate import CalibrationInfo, Progress, collect_stats
from fps_graph.runtime.config import RuntimeConfig
from fps_graph.runtime.ray import collect_stats_ray   # imports Ray itself only when called
from fps_graph.runtime.memory import peak_rss_mb
from fps_graph.runtime.shards import DEFAULT_SHARD_SIZE, ClusterOptions, batch_groups, shard_batches
from fps_graph.data.static import WithStatic, load_static, with_static_hint
from fps_graph.data.dispatch import open_source
from fps_graph.data.sources import ImageOptions, InputSpec, Loader
from fps_graph.data.text import TextOptions, TextSource, resolve_model_path
from fps_graph.errors import FpsGraphError, DataError, ModelError, OptionError
from fps_graph.formats.io import atomic_output
from fps_graph.graph.inventory import name_the_rest, primary_storage
from fps_graph.graph.layers import Layer, Skipped
from fps_graph.formats.masks import write_masks
from fps_graph.graph.model import OnnxModel, data_inputs, input_dtype, input_shape
from fps_graph.graph.plan import Plan, make_plan
from fps_graph.graph.recurrent import zero_state_notes
from fps_graph.graph.walk import branch_conditions
from fps_graph.selection.positions import canonical_to_stored, stored_to_key
from fps_graph.selection.step_scale import entry_scales
from fps_graph.selection.scores import STATS, WeightScores, default_stat, get_score, input_statistic
from fps_graph.selection.ranking import Budget, select
from fps_graph.selection.reach import split_unreached
from fps_graph.formats.stats import Stats, load_merged
from fps_graph.selection.variants import select_cover

ProgressFactory = Callable[[int, str], Progress]   # (total samples, label) -> per-batch callback


_RUNTIME_SHORTHANDS = ("reduce", "provider", "opt_level", "threads", "max_memory_mb", "micro_batch")

@dataclass
class SelectOptions:
    """Every knob of `fps-graph select` (see the CLI help for each).

    How ONNX Runtime runs is one ``RuntimeConfig`` (``runtime``), handed whole to calibration and to Ray workers;
    ``reduce=``, ``provider=``, ``opt_level=``, ``threads=``, ``max_memory_mb=`` and ``micro_batch=`` are
    shorthands that build it (not together with ``runtime=``).
    """

    score: str = "fps"
    stat: str | None = None
    k: int | None = None
    budget: Budget | None = None
    granularity: str = "neuron"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    seed: int = 0
    eps: float = 1e-6
    batch_size: int = 32
    max_samples: int | None = None
    shuffle: bool = False
    image: ImageOptions = field(default_factory=ImageOptions)
    text: TextOptions = field(default_factory=TextOptions)
    stats_in: Sequence[str] = ()
    anchor: str | None = None
    anchor_stats_in: Sequence[str] = ()
    state_dict: str | None = None
    static: dict[str, str] = field(default_factory=dict)   # input name -> .npy fed whole with every batch
    shard_size: int = DEFAULT_SHARD_SIZE   # samples per shard: --ray's unit of work and of the exact float64 sum
    cluster: ClusterOptions | None = None  # calibrate on Ray workers (runtime.ray) instead of in this process
    min_per_layer: int = 0          # network budget: every scored tensor keeps at least this many (selection/floor.py)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)   # how ONNX Runtime runs (runtime/config.py)
    reduce: InitVar[str | None] = None          # shorthands for runtime=RuntimeConfig(...)
    provider: InitVar[str | None] = None
    opt_level: InitVar[str | None] = None
    threads: InitVar[int | None] = None
    max_memory_mb: InitVar[float | str | None] = None
    micro_batch: InitVar[int | None] = None

    def __post_init__(self, *shorthands: Any) -> None:
        given = {name: v for name, v in zip(_RUNTIME_SHORTHANDS, shorthands) if v is not None}
        if given:
            if self.runtime != RuntimeConfig():
                raise OptionError(f"give runtime=RuntimeConfig(...) or {', '.join(given)}, not both")
            self.runtime = RuntimeConfig(**given)


for _name in _RUNTIME_SHORTHANDS:   # InitVar defaults would stay as class attributes; read opts.runtime instead
    delattr(SelectOptions, _name)


@dataclass
class SelectResult:
    """Selected flat indices per key, the per-key metadata, and what the run measured."""

    indices: dict[str, np.ndarray]
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, Any]
    stats: Stats | None
    calibration: CalibrationInfo | None
    warnings: list[str]
    summary: dict[str, Any]
    scales: dict[str, np.ndarray] = field(default_factory=dict)   # per key: each selected entry's input statistic


def spec_list(model: OnnxModel) -> list[InputSpec]:
    """The model inputs that data must feed."""
    return [InputSpec(vi.name, input_shape(vi), input_dtype(vi)) for vi in data_inputs(model)]


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A safetensors state dict as NumPy arrays."""

    if not Path(path).is_file():
        raise DataError(f"state dict file not found: {path}")
    try:
        return load_file(path)
    except Exception as exc:
        raise DataError(f"cannot read state dict {path}: {exc}") from exc


def describe(plan: Plan, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `inspect` view: scored layers (with names and layouts) and skipped nodes.

    Each layer lists the If branches it sits in (``branches``: it runs only when all are taken, so `select` scores it
    only if the calibration data takes them). ``run``: the header of a masks file selected on this model
    (``formats.masks.read_metadata``); the view is then that run's: the layers it skipped (an If branch its data
    never took, ``--include``/``--exclude``) move to the skipped list with its reason, and each scored layer gets
    ``selected``, the entries the masks hold for its weight.
    """
    tensors: dict[str, Any] = {}
    if run is not None:
        plan = _as_run(plan, run)
        tensors = run.get("tensors", {})
    layers = []
    for layer in plan.layers:
        info = plan.names[layer.weight]
        layers.append({
            "node": layer.node, "op": layer.node_op or layer.op, "weight": layer.weight, "name": info.key,
            "name_source": info.how, "weight_shape": list(layer.stored_shape), "node_weight_shape": list(layer.op_shape),
            "chain": [s["op"] for s in layer.chain], "canonical": list(layer.canonical_shape),
            "input_axis": _axis_text(layer), "params": int(np.prod(layer.stored_shape)),
            "activation": layer.activation,
            "stored": primary_storage(plan.model, layer),      # the ONNX constant holding it (int8/int4 if quantized)
            "stored_dtype": np.dtype(plan.model.tensor_dtype(primary_storage(plan.model, layer))).name,
            "shared": len(next(g for g in plan.groups if any(l is layer for l in g.layers)).layers) > 1,
            "branches": branch_conditions(plan.model, layer.graph),
        })
        if run is not None:
            layers[-1]["selected"] = int(tensors.get(info.key, {}).get("selected", 0))
    return {
        "model": str(plan.model.path), "sha256": plan.model.sha256,
        "layers": layers,
        "skipped": [s.to_json() for s in plan.skipped],
        "scored_params": int(sum(g.size for g in plan.groups)),
        "weights": plan.inventory().to_json(),
        "inputs": [{"name": s.name, "shape": [d if isinstance(d, int) else str(d) for d in s.shape],
                    "dtype": s.dtype.name} for s in spec_list(plan.model)],
    }


def _as_run(plan: Plan, run: dict[str, Any]) -> Plan:
    """The plan as a `select` run saw it (its masks header): the layers it skipped taken out, with its records."""
    if run.get("model_sha256") and run["model_sha256"] != plan.model.sha256:
        raise DataError(f"the masks file was selected on another model ({run.get('model', '?')}, sha256 "
                        f"{str(run['model_sha256'])[:12]}...), not {plan.model.path}")
    records = {r["node"]: r for r in run.get("skipped", []) if r.get("weight")}
    moved = [layer for layer in plan.layers if layer.node in records]
    if not moved:
        return plan
    gone = {id(layer) for layer in moved}
    skipped = plan.skipped + [Skipped(**{**records[layer.node], "shape": tuple(records[layer.node]["shape"])})
                              for layer in moved]
    groups = [g for g in plan.groups if not all(id(layer) in gone for layer in g.layers)]
    layers = [layer for layer in plan.layers if id(layer) not in gone]
    return Plan(plan.model, layers, groups, {k: v for k, v in plan.names.items()
                                            if any(layer.weight == k for layer in layers)}, skipped, plan.data)


def _axis_text(layer: Layer) -> str:
    """How the input features line up with the stored weight, in words."""
    if hasattr(layer, "axis_text"):     # recurrent layers (graph/recurrent.py)
        return layer.axis_text
    if layer.op == "Conv":
        g = layer.conv["group"]
        return f"[out, in/{g}, *kernel]; input channel axis 1 (im2col)" if g > 1 else "[out, in, *kernel]; input axis 1"
    if layer.op == "Gemm":
        return "[out, in] (transB=1)" if layer.trans_b else "[in, out] (transB=0)"
    return "[in, out] (x @ W)"


def _needed_kinds(score: str, stat: str | None, stats_out: bool) -> tuple[str, ...]:
    if stats_out:
        return ("abs", "sq")
    s = stat or default_stat(score)
    if s is None:
        return ()
    return ("abs",) if s == "mean-abs" else ("sq",)


def calibrate(plan: Plan, data: str, opts: SelectOptions, kinds: tuple[str, ...],
              progress: ProgressFactory | None, label: str, warnings: list[str]) -> tuple[Stats, CalibrationInfo]:
    """Open the data, check it against the model inputs and collect statistics."""
    if plan.model.runtime_problem:   # e.g. IR version features newer than ONNX Runtime reads (graph/versions.py)
        raise ModelError(f"{plan.model.path}: {plan.model.runtime_problem}")
    static = load_static(opts.static, spec_list(plan.model))   # no sample axis: never data, never a batch size
    specs = [s for s in spec_list(plan.model) if s.name not in static]
    if not specs:
        raise OptionError("every model input is a static input; DATA has nothing left to feed")
    open_data = functools.partial(open_source, data, specs, opts.image, text_opts=opts.text,
                                  model_path=plan.model.path)   # picklable: Ray workers open the data the same way
    source = open_data()
    if opts.text.pack is not None and not isinstance(source, TextSource):   # never drop an option silently
        raise OptionError(f"{data}: packing applies to text data (.txt/.jsonl); this data is not text")
    warnings.extend(getattr(source, "notes", []))
    plan.data[label] = source.record()
    batch_size, max_samples = opts.batch_size, opts.max_samples
    # text batches group equal lengths and fill their own fixed dims (data.text); no leftover rule applies
    # only inputs fed per sample count (static ones are out of specs); a fixed first dimension next to a dynamic one
    # is no batch axis (silero-vad's state [2, B, 128] beside its audio [B, N]): guess nothing then
    firsts = [s.shape[0] if s.shape else None for s in specs]
    fixed = {d for d in firsts if isinstance(d, int)} if not isinstance(source, TextSource) else set()
    if len(fixed) == 1 and all(isinstance(d, int) for d in firsts):
        batch_size = fixed.pop()
        if batch_size != opts.batch_size:
            warnings.append(f"the model's batch size is fixed at {batch_size}; using --batch-size {batch_size}")
        n = min(len(source), max_samples or len(source))
        if n % batch_size:
            warnings.append(f"{n % batch_size} samples left over after whole batches of {batch_size} are not used")
            max_samples = n - n % batch_size
    loader = Loader(source, batch_size=batch_size, max_samples=max_samples, shuffle=opts.shuffle, seed=opts.seed)
    if len(loader) == 0:
        raise DataError(f"{data}: no samples to read")
    cb = progress(len(loader), label) if progress else None
    per_shard = shard_batches(batch_size, opts.shard_size)
    if opts.cluster is not None:
        return collect_stats_ray(plan.model, plan.layers, open_data, batch_groups(source, loader.order(), batch_size),
                                 static=static, shard_batches=per_shard, cluster=opts.cluster, label=label,
                                 data_key={"path": str(Path(data).resolve()), "record": plan.data[label]},
                                 kinds=kinds, runtime=opts.runtime, progress=cb)
    batches = WithStatic(loader, static) if static else loader
    try:
        return collect_stats(plan.model, plan.layers, batches, kinds=kinds, runtime=opts.runtime, progress=cb,
                             shard_batches=per_shard)
    except FpsGraphError as exc:
        if static and str(exc).startswith("ONNX Runtime failed"):
            raise with_static_hint(exc, static, batch_size) from exc
        raise


def _check_stats_file(st: Stats, plan: Plan, source: str) -> None:
    if st.model_sha256 and st.model_sha256 != plan.model.sha256:
        raise DataError(f"{source}: statistics were collected on another model (sha256 differs)")
    st.check_layers(plan.layers, source)


def _check_options(opts: SelectOptions) -> str | None:
    """Refuse contradictory options early; return the activation statistic the score uses."""
    score = get_score(opts.score)            # unknown: an OptionError listing the registered scores
    if opts.stat is not None and opts.stat not in STATS:
        raise OptionError(f"unknown --stat {opts.stat!r} (use {', '.join(STATS)})")
    if score.own_stat and opts.stat not in (None, score.stat):
        raise OptionError(f"--score {score.name} uses the {score.stat} statistic; drop --stat or use --score fps")
    if score.anchor and not (opts.anchor or opts.anchor_stats_in):
        raise OptionError(f"--score {score.name} needs --anchor DATA (or --anchor-stats FILE)")
    return opts.stat or score.stat


def _gather_stats(plan: Plan, data: str | None, opts: SelectOptions, stat: str | None, stats_out: bool,
                  progress: ProgressFactory | None, warnings: list[str]
                  ) -> tuple[Stats | None, CalibrationInfo | None, Stats | None]:
    """Statistics of the data (run or loaded), and of the anchor for gd-fps."""
    kinds = _needed_kinds(opts.score, stat, stats_out)
    stats: Stats | None = None
    calib: CalibrationInfo | None = None
    if opts.stats_in and data is not None:   # never drop input silently
        raise OptionError(f"DATA ({data}) and --stats-in both given: the statistics would come from --stats-in "
                            "alone and DATA would be ignored; to merge several files repeat the flag (--stats-in A "
                            "--stats-in B), to collect new statistics drop --stats-in")
    if get_score(opts.score).anchor and opts.anchor and opts.anchor_stats_in:
        raise OptionError("--anchor and --anchor-stats both given: use one (--anchor would be ignored)")
    if opts.stats_in:
        stats = load_merged(list(opts.stats_in))
        _check_stats_file(stats, plan, ", ".join(opts.stats_in))
        if stats.data:            # the data record of the run that collected them (train follows it)
            plan.data["calibration"] = dict(stats.data)
        need = {"mean-abs": "abs", "l2": "sq"}.get(stat or "")
        if need and need not in stats.kinds:
            raise DataError(f"statistics files hold {list(stats.kinds)} sums; --stat {stat} needs {need}")
    elif kinds:
        if data is None:
            raise OptionError(f"--score {opts.score} needs calibration DATA (or --stats-in FILE)")
        stats, calib = calibrate(plan, data, opts, kinds, progress, "calibration", warnings)
        stats.data = dict(plan.data.get("calibration", {}))     # kept in a --stats-out file (--stats-in reads it)
    anchor: Stats | None = None
    if get_score(opts.score).anchor:
        if opts.anchor_stats_in:
            anchor = load_merged(list(opts.anchor_stats_in))
            _check_stats_file(anchor, plan, ", ".join(opts.anchor_stats_in))
        else:
            anchor, _ = calibrate(plan, opts.anchor, opts, _needed_kinds(opts.score, stat, False), progress,
                                  "anchor", warnings)
    return stats, calib, anchor


def _to_keys(plan: Plan, chosen: list[np.ndarray], stats: Stats | None = None, stat: str | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Canonical positions -> sorted flat indices in each key tensor's own layout, the per-key records, and (with
    statistics) each selected entry's input statistic aligned with the indices (selection/step_scale.py)."""
    indices: dict[str, np.ndarray] = {}
    tensors: dict[str, dict[str, Any]] = {}
    scales: dict[str, np.ndarray] = {}
    for group, pos in zip(plan.groups, chosen):
        info = plan.names[group.weight]
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        unsorted = stored_to_key(canonical_to_stored(group.primary, pos), group.primary.stored_shape, info.perm)
        order = np.argsort(unsorted, kind="stable")          # O(selected): no full-size index arrays
        key_pos = unsorted[order]
        indices[info.key] = key_pos
        rec = info.to_json()
        if stats is not None and stat is not None:
            entry, ref = entry_scales(input_statistic(group, stats, stat), group.primary.canonical_shape, pos)
            scales[info.key] = entry[order]
            rec["input_scale_ref"] = ref
        rec.update({"selected": int(key_pos.size), "total": int(group.size), "nodes": [l.node for l in group.layers],
                    "op": group.primary.op, "onnx_shape": list(group.primary.stored_shape)})
        if group.primary.node_op:
            rec["node_op"] = group.primary.node_op
        tensors[info.key] = rec
    return indices, tensors, scales


def _metadata(model_path: str | Path, plan: Plan, opts: SelectOptions, stat: str | None, stats: Stats | None,
              anchor: Stats | None, selected: int, total: int) -> dict[str, Any]:
    """The masks file header (see README: Masks format)."""
    budget = opts.budget
    return {
        "fps_graph_version": __version__,
        "score": opts.score, "stat": stat or "none",
        "k": "" if opts.k is None else str(opts.k),
        "budget": "" if budget is None else (f"{budget.fraction}" if budget.fraction is not None else str(budget.count)),
        "granularity": opts.granularity if budget is not None else "neuron",
        "num_samples": str(stats.num_samples if stats else 0),
        "anchor_samples": str(anchor.num_samples if anchor else 0),
        "model_sha256": plan.model.sha256,
        "model": Path(model_path).name,
        "selected": str(selected), "total": str(total),
        # every weight-like constant not scored, with the reason; and the share of weight values scored
        "skipped": [s.to_json() for s in plan.skipped],
        "weights": plan.inventory().to_json(),
        # how the data was prepared (Source.record(): kind, inputs, size, mean, std, ...); `train` follows it
        "data": plan.data.get("calibration", {"kind": "none"}),
        "options": {"seed": opts.seed, "eps": opts.eps, "include": list(opts.include),
                    "exclude": list(opts.exclude), "reduce": opts.runtime.reduce, "batch_size": opts.batch_size,
                    "max_samples": opts.max_samples, "shuffle": opts.shuffle},
    }




UNREACHED_NAMED = 20    # weights named in the warning; the masks header's skipped list holds them all


def _drop_unreached(plan: Plan, stats: Stats, warnings: list[str]) -> None:
    """Take weights no calibration data reached out of the plan, listed as skipped (selection.reach)."""
    kept, dropped = split_unreached(plan.model, plan.groups, stats)
    if not dropped:
        return
    if not kept:
        raise DataError(f"no calibration data reached any scored layer ({dropped[0].reason})")
    plan.layers = [layer for g in kept for layer in g.layers]
    kept_ids = {id(g) for g in kept}
    names = [plan.names[g.weight].key for g in plan.groups if id(g) not in kept_ids]
    shown = ", ".join(names[:UNREACHED_NAMED]) + (f" and {len(names) - UNREACHED_NAMED} more"
                                                   if len(names) > UNREACHED_NAMED else "")
    warnings.append(f"{len(names)} weights saw no calibration data (inside If branches never taken) and are skipped, "
                    f"not selected: {shown} (the masks header lists each under 'skipped'; inspect --masks shows them)")
    plan.groups, plan.skipped = kept, plan.skipped + dropped
    plan.skipped.extend(name_the_rest(plan.model, plan.layers, plan.skipped))


def run_select(model_path: str | Path, data: str | None, opts: SelectOptions,
               progress: ProgressFactory | None = None, stats_out: bool = False) -> SelectResult:
    """Select the weights to fine-tune; nothing is written (see write_result)."""
    t0 = time.perf_counter()
    model_path = resolve_model_path(model_path)   # a Hugging Face / Optimum export folder -> its ONNX file
    stat = _check_options(opts)
    sd = load_state_dict(opts.state_dict) if opts.state_dict else None
    plan = make_plan(model_path, opts.include, opts.exclude, sd)
    if not plan.groups:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in plan.skipped[:3])
        raise ModelError(f"{model_path}: no selectable layer (MatMul/Gemm/Conv/ConvTranspose with a constant weight)"
                            + (f"; skipped {reasons}" if reasons else ""))
    warnings: list[str] = [n for g in plan.groups for n in plan.names[g.weight].notes]
    stats, calib, anchor = _gather_stats(plan, data, opts, stat, stats_out, progress, warnings)
    score = get_score(opts.score)
    if stats is not None and score.needs_stats:   # If branches the data never took
        _drop_unreached(plan, stats, warnings)
        warnings.extend(zero_state_notes(plan.layers, stats, {w: n.key for w, n in plan.names.items()}))
    groups = plan.groups

    def scorer(i: int) -> WeightScores:
        return WeightScores(groups[i], plan.model, opts.score, stats, stat, anchor, opts.seed, opts.eps)

    chooser = select_cover if score.cover else \
        functools.partial(select, min_per_layer=opts.min_per_layer, row_argmax=lambda i: scorer(i).argmax_rows(),
                          workers=opts.runtime.threads or os.cpu_count() or 1)
    if opts.min_per_layer and chooser is select_cover:
        raise OptionError(f"--min-per-layer does not apply to --score {opts.score}")
    chosen, select_warnings = chooser(len(groups), [g.primary.canonical_shape for g in groups],
                                     lambda i: scorer(i).full(), k=opts.k,
                                     budget=opts.budget, granularity=opts.granularity,
                                     names=[plan.names[g.weight].key for g in groups],
                                     row_blocks=lambda i: scorer(i).blocks())
    # the input statistic of each selected entry: training's per-entry step sizes (selection/step_scale.py)
    with_scales = stats is not None and stat is not None and score.needs_stats
    indices, tensors, scales = _to_keys(plan, chosen, stats if with_scales else None, stat)
    inv = plan.inventory()
    if inv.warning():
        select_warnings.append(inv.warning())
    empty = [key for key, v in indices.items() if v.size == 0]
    if empty:   # a budget can leave a scored tensor with nothing to train: say so (--min-per-layer prevents it)
        select_warnings.append(f"{len(empty)} of {len(indices)} scored tensors got no selected entry under this "
                               f"budget ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); "
                               "--min-per-layer N keeps at least N in each")
    selected = int(sum(v.size for v in indices.values()))
    total = int(sum(g.size for g in groups))
    meta = _metadata(model_path, plan, opts, stat, stats, anchor, selected, total)
    meta["input_scale"] = stat if scales else "none"
    summary = {
        "layers": len(plan.layers), "weights": len(groups), "selected": selected, "total": total,
        "fraction": selected / total if total else 0.0, "samples": stats.num_samples if stats else 0,
        "seconds": time.perf_counter() - t0, "calibration_seconds": calib.seconds if calib else 0.0,
        "calibration_runtime_seconds": calib.runtime_seconds if calib else 0.0,
        "calibration_host_seconds": calib.host_seconds if calib else 0.0,
        "samples_per_s": (calib.samples / calib.seconds) if calib and calib.seconds > 0 else 0.0,
        "provider": calib.provider if calib else "none", "peak_rss_mb": peak_rss_mb(),
        "micro_batch": calib.micro_batch if calib else 0,
        "cluster": calib.cluster if calib else None,
        "empty_tensors": len(empty),
        "weight_share": inv.share, "weight_values": inv.total_values,
    }
    return SelectResult(indices, tensors, meta, stats, calib, warnings + select_warnings, summary, scales)


def write_result(result: SelectResult, out: str | Path, dense: bool = False, force: bool = False) -> None:
    """Write the masks file atomically."""
    with atomic_output(out, force) as tmp:
        write_masks(tmp, result.indices, result.tensors, result.metadata, dense=dense, scales=result.scales)


def write_stats(stats: Stats, out: str | Path, force: bool = False) -> None:
    """Write the raw statistics atomically."""
    with atomic_output(out, force) as tmp:
        stats.save(tmp)
