"""``fps-graph compare``: the default selection against random selection and LoRA at the same trainable count, on
one's own Hugging Face model and data.

Random sparse masks are strong baselines (Xu & Zhang, ICML 2024: they match LoRA given a larger learning rate), so
before relying on a selection a user should see, on their own task, whether it beats them. ``run_compare`` does
the whole comparison, every method through the product's own steps:

1. **Export** the folder's transformer body to ONNX (``integrations.hf_export``, ``feature-extraction``: the
   blocks' Linear layers, no LM head), so that every method adapts the same modules, the ones LoRA adapts.
2. **Select** (the public select path) at each budget, ``--granularity layer`` (the same fraction of every block
   Linear, so every selection has the same count per weight): activation statistics collected once on the training
   texts, then one masks file per score (and per seed for seeded scores such as ``random``).
3. **Match LoRA** (PEFT) module by module to the selection's count (``integrations.lora_match``: rank
   ``round(n / (in + out))``, at least 1).
4. **Sweep** the learning rates on seed 0 at the middle budget, methods interleaved, and keep per method the best
   on validation (a method never loses because it got another method's learning rate); then train every seed and
   budget at the chosen rate. Every run goes through ``fit`` (``runs.train_run``) with the task's default recipe:
   ``OptimConfig``'s optimiser and schedule and ``TrainsConfig``'s rule for what trains in full (the seq-cls head;
   biases of adapted layers), the same for every method; the sparse adapters train as ``train`` trains a masks
   file by default.
5. **Report** (``report.report``): ``compare.md``, ``compare.json`` (every run, git commit, machine, threads, load)
   and ``compare.png``, the tables and plot of the LM study (bench/quality_lm).

The run folder also keeps ``onnx/`` (the export), ``stats.safetensors``, ``masks/`` and ``runs.jsonl`` (one record
per finished run). Bad input (missing files, wrong fields, options out of range) is refused before the folder is
made; a failure or an interruption later removes the folder this run made.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fps_graph.compare.config import CompareConfig
from fps_graph.compare.report import RunMeta, budget_label, report, score
from fps_graph.compare.runs import train_run
from fps_graph.data.text import TextOptions
from fps_graph.errors import OptionError
from fps_graph.formats.masks import load_indices, read_metadata
from fps_graph.integrations.hf_export import HfExportOptions, Task as ExportTask, export_hf
from fps_graph.integrations.lora_match import LoraMatch, match_lora
from fps_graph.selection.pipeline import SelectOptions, run_select, write_result, write_stats
from fps_graph.selection.ranking import Budget
from fps_graph.selection.scores import get_score
from fps_graph.training.adapters import Adapter, LoraAdapter, SparseAdapter
from fps_graph.training.config import DataConfig, OptimConfig, RunConfig, TrainsConfig
from fps_graph.training.loop import Callbacks
from fps_graph.training.models import default_task, hf_folder, load_hf_model
from fps_graph.training.tasks import DataContext, get_task
from fps_graph.training.tasks.base import Task, TaskData

__all__ = ["CompareCallbacks", "CompareResult", "run_compare", "FILES"]

FILES = {"md": "compare.md", "json": "compare.json", "plot": "compare.png", "runs": "runs.jsonl",
         "onnx": "onnx", "stats": "stats.safetensors", "masks": "masks"}
LORA_ALPHA_RATIO = 2.0                               # lora_alpha = 2 r: the scale alpha / r is 2 in every module


class CompareCallbacks:
    """What a comparison reports while it runs (all optional; the library never prints)."""

    def on_stage(self, text: str) -> None:
        """A step begins (export, statistics, a selection, the sweep, the seeds, the report)."""

    def progress(self, total: int, label: str) -> Callable[[int], None] | None:
        """A per-batch callback for the calibration pass over ``total`` samples (None: no progress)."""
        return None

    def on_plan(self, runs: int, samples: int) -> None:
        """The training work ahead: runs, and training samples over all their epochs."""

    def on_samples(self, n: int, label: str) -> None:
        """``n`` more training samples done in the run ``label``."""

    def on_run(self, rec: dict[str, Any]) -> None:
        """A run finished: its record (method, lr, seed, budget, metrics...)."""


@dataclass
class CompareResult:
    """What a comparison ran and wrote: every run's record, the chosen learning rates, the report, the files."""

    runs: list[dict[str, Any]]
    lrs: dict[str, float | None]
    doc: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class _Samples(Callbacks):
    """Forwards the loop's per-epoch progress to ``CompareCallbacks.on_samples``."""

    def __init__(self, cb: CompareCallbacks, label: str):
        self.cb, self.label = cb, label

    def progress(self, total: int, desc: str) -> Callable[[int], None]:
        return lambda n: self.cb.on_samples(n, self.label)


@dataclass
class _Data:
    folder: Path
    task: Task
    config: DataConfig
    train: TaskData
    evals: dict[str, TaskData]
    n_train: int



def _seeded(method: str) -> bool:
    """Whether a selection method's masks depend on --seed (the score registry says), so each seed draws its own."""
    return get_score(method).seeded

def _read_data(cfg: CompareConfig, folder: Path, task_name: str) -> _Data:
    """Every split read and tokenized as training reads it: wrong fields, labels or lengths are refused here,
    before anything is written."""
    task = get_task(task_name)
    model = load_hf_model(folder, task.hf_class)
    dcfg = DataConfig(data=cfg.train, val=cfg.val, max_samples=cfg.max_samples, label_field=cfg.label_field,
                      text=TextOptions(text_field=cfg.text_field, max_length=cfg.max_length, truncate=False))
    ctx = DataContext(model, dcfg, folder)
    train = task.read(cfg.train, ctx)
    classes = train.classes or None
    evals = {"val": task.read(cfg.val, ctx, classes=classes)}
    if cfg.test is not None:
        evals["test"] = task.read(cfg.test, ctx, classes=classes)
    for split, data in [("train", train), *evals.items()]:
        if len(data) == 0:
            raise OptionError(f"--{split} {getattr(data, 'source', '')}: no samples")
    del model
    return _Data(folder, task, dcfg, train, evals, min(len(train), cfg.max_samples or len(train)))


@contextlib.contextmanager
def _run_folder(path: Path, force: bool) -> Iterator[Path]:
    """The run folder: refused when it exists with files (unless force); removed again if the block fails and
    this run made it."""
    if path.exists() and not path.is_dir():
        raise OptionError(f"--output {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OptionError(f"--output {path} exists and is not empty (use --force to replace its files)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OptionError(f"--output {path}: its parent folder {parent} does not exist")
    made = not path.exists()
    path.mkdir(exist_ok=True)
    try:
        yield path
    except BaseException:
        if made:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _options(cfg: CompareConfig, score_name: str, budget: float, seed: int, stats_in: tuple[str, ...]
             ) -> SelectOptions:
    return SelectOptions(score=score_name, budget=Budget(fraction=budget), k=None, granularity="layer", seed=seed,
                         threads=cfg.threads, max_samples=cfg.max_samples, batch_size=cfg.batch_size,
                         text=TextOptions(text_field=cfg.text_field, max_length=cfg.max_length),
                         stats_in=stats_in)


@dataclass
class _Selections:
    masks: dict[tuple[str, str, int], Path]      # (method, budget label, seed) -> masks file
    lora: dict[str, LoraMatch]                     # budget label -> LoRA ranks matched to the selection's counts


def _selections(cfg: CompareConfig, out: Path, cb: CompareCallbacks) -> _Selections:
    """The statistics (one pass over the training texts), then every masks file from them, and LoRA's ranks."""
    onnx_dir, stats, mdir = out / FILES["onnx"], out / FILES["stats"], out / FILES["masks"]
    cb.on_stage(f"select: activation statistics of {cfg.train} -> {stats}")
    res = run_select(onnx_dir, cfg.train, _options(cfg, "fps", cfg.budgets[0], 0, ()), progress=cb.progress,
                     stats_out=True)
    write_stats(res.stats, stats, force=True)
    mdir.mkdir(exist_ok=True)
    masks: dict[tuple[str, str, int], Path] = {}
    lora: dict[str, LoraMatch] = {}
    for budget in cfg.budgets:
        label = budget_label(budget)
        for m in cfg.sparse or ("magnitude",):      # no selection asked for: one to count LoRA's budget from
            for seed in (range(cfg.seeds) if _seeded(m) else (0,)):
                path = mdir / f"{m}_{label}_s{seed}.safetensors"
                cb.on_stage(f"select --score {m} --budget {label} --granularity layer"
                            + (f" --seed {seed}" if _seeded(m) else "") + f" -> {path.name}")
                write_result(run_select(onnx_dir, None, _options(cfg, m, budget, seed, (str(stats),))), path,
                             force=True)
                for s in (range(cfg.seeds) if not _seeded(m) else (seed,)):
                    masks[(m, label, s)] = path
        first = masks[((cfg.sparse or ("magnitude",))[0], label, 0)]
        counts = {k: len(v) for k, v in load_indices(first).items()}
        shapes = {k: r["shape"] for k, r in read_metadata(first)["tensors"].items()}
        lora[label] = match_lora(counts, shapes)
    return _Selections(masks, lora)


def _adapter(method: str, budget: str, seed: int, sel: _Selections) -> Adapter | None:
    """The adapter of a method: the default rule for what trains in full (TrainsConfig()) for every method."""
    trains = TrainsConfig()
    if method == "lora":
        match = sel.lora[budget]
        return LoraAdapter(rank=dict(match.ranks), target_modules=tuple(sorted(match.ranks)),
                           alpha_ratio=LORA_ALPHA_RATIO, trains=trains)
    if method == "head":
        return SparseAdapter(None, trains)
    if method == "none":
        return None
    return SparseAdapter(str(sel.masks[(method, budget, seed)]), trains)


def _run(cfg: CompareConfig, data: _Data, sel: _Selections, method: str, budget: str, lr: float | None, seed: int,
         cb: CompareCallbacks, runs_file: Path) -> dict[str, Any]:
    label = f"{method} lr {lr:g} seed {seed}" if lr is not None else f"{method} seed {seed}"
    optim = OptimConfig(lr=lr if lr is not None else OptimConfig().lr, epochs=cfg.epochs, batch_size=cfg.batch_size)
    run = RunConfig(output=None, seed=seed, threads=cfg.threads, plot=False, stop_on_divergence=True)
    rec: dict[str, Any] = {"model": data.folder.name, "task": data.task.name, "method": method, "lr": lr,
                           "seed": seed, "extra": {"budget": budget}}
    t0 = time.perf_counter()
    rec.update(train_run(data.folder, data.task, data.train, data.evals, _adapter(method, budget, seed, sel), optim,
                         run, data_config=data.config, callbacks=_Samples(cb, label)))
    rec["wall_seconds"] = round(time.perf_counter() - t0, 2)
    if method == "lora":
        m = sel.lora[budget]
        rec["lora"] = {"ranks": m.ranks, "lora_total": m.lora_total, "sparse_total": m.sparse_total,
                       "unmatched": list(m.unmatched)}
    with open(runs_file, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    cb.on_run(rec)
    return rec


def _best(runs: list[dict[str, Any]], method: str) -> float | None:
    """The learning rate with the best validation score; a tie goes to the smaller rate."""
    cand = [r for r in runs if r["method"] == method]
    if not cand or cand[0]["lr"] is None:
        return None
    return max(cand, key=lambda r: (score(r, "val"), -r["lr"]))["lr"]


def run_compare(cfg: CompareConfig, callbacks: CompareCallbacks | None = None) -> CompareResult:
    """Run the comparison ``cfg`` describes and write its run folder (see the module docstring).

    Args:
        cfg: the model, data, methods, budgets, learning rates, seeds and the run folder.
        callbacks: progress and per-run reports (``CompareCallbacks``).

    Returns:
        `CompareResult`: every run's record, the learning rate chosen per method, the report document and the
        files written.

    Raises:
        `OptionError`, `DataError`, `ModelError`, `RuntimeFailure` (all `FpsGraphError`): bad options, data or
        model, or a failed step; a failure after the run folder was made removes it.

    Example:
        >>> from fps_graph.compare import CompareConfig, run_compare
        >>> res = run_compare(CompareConfig(model="hf:my_model", train="train.jsonl", val="val.jsonl",
        ...                                 output="compare_run", task="seq-cls", seeds=2))
        >>> res.doc["experiments"]["my_model/seq-cls"]["paired"]["fps"]["random"]   # mean_pp, sem_pp over seeds
    """
    cb = callbacks or CompareCallbacks()
    t_start = time.perf_counter()
    folder = hf_folder(cfg.model if cfg.model.startswith("hf:") else f"hf:{cfg.model}")
    task_name = cfg.task or default_task(folder)
    meta = RunMeta(threads=cfg.threads or torch.get_num_threads())
    data = _read_data(cfg, folder, task_name)
    split = "test" if cfg.test is not None else "val"
    methods = [("none" if m == "head" and task_name == "causal-lm" else m) for m in cfg.methods]
    mid = budget_label(cfg.sweep_budget)
    labels = [budget_label(b) for b in cfg.budgets]
    prev_threads = torch.get_num_threads()
    with _run_folder(Path(cfg.output), cfg.force) as out:
        try:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            for name in (FILES["runs"], FILES["md"], FILES["json"], FILES["plot"]):
                (out / name).unlink(missing_ok=True)
            cb.on_stage(f"export hf:{folder} --task feature-extraction -> {out / FILES['onnx']}")
            export_hf(folder, out / FILES["onnx"], HfExportOptions(task=ExportTask.FEATURE_EXTRACTION, force=True))
            sel = _selections(cfg, out, cb)
            runs_file = out / FILES["runs"]
            trained = [m for m in methods if m != "none"]
            n_sweep = len(trained) * len(cfg.lrs) + (1 if "none" in methods else 0)
            n_rest = sum(1 for s in range(cfg.seeds) for b in labels for m in trained
                         if not (s == 0 and b == mid) and (m != "head" or b == mid))
            cb.on_plan(n_sweep + n_rest, (len(trained) * len(cfg.lrs) + n_rest) * data.n_train * cfg.epochs)
            runs: list[dict[str, Any]] = []
            cb.on_stage(f"learning-rate sweep: seed 0, budget {mid}, {n_sweep} runs")
            for lr in cfg.lrs:                      # methods interleaved at each rate
                for m in trained:
                    runs.append(_run(cfg, data, sel, m, mid if m != "head" else "-", lr, 0, cb, runs_file))
            if "none" in methods:
                runs.append(_run(cfg, data, sel, "none", "-", None, 0, cb, runs_file))
            chosen = {m: _best(runs, m) for m in methods}
            if n_rest:
                cb.on_stage(f"seeds and budgets at the chosen rates: {n_rest} runs")
            for seed in range(cfg.seeds):
                for b in labels:
                    for m in trained:
                        if (seed == 0 and b == mid) or (m == "head" and b != mid):
                            continue
                        runs.append(_run(cfg, data, sel, m, b if m != "head" else "-", chosen[m], seed, cb,
                                         runs_file))
            cb.on_stage("writing the report")
            key = f"{folder.name}/{task_name}"
            plan = {"lrs": {key: chosen}, "budgets": list(cfg.budgets), "sweep_budget": cfg.sweep_budget,
                    "methods": methods, "split": split, "config": _config_json(cfg, task_name),
                    "lora": {b: {"ranks": m.ranks, "lora_total": m.lora_total, "sparse_total": m.sparse_total,
                                 "unmatched": list(m.unmatched)} for b, m in sel.lora.items()},
                    "seconds": round(time.perf_counter() - t_start, 1)}
            doc = report(runs, out / "compare", plan, header=_header(cfg, folder, task_name, split, sel),
                         meta=meta.finish(), split=split)
        finally:
            torch.set_num_threads(prev_threads)
    files = {k: str(out / v) for k, v in FILES.items() if (out / v).exists()}
    warnings = [doc["plot_warning"]] if doc.get("plot_warning") else []
    return CompareResult(runs, chosen, doc, files, warnings)


def _config_json(cfg: CompareConfig, task: str) -> dict[str, Any]:
    d = asdict(cfg)
    d.update(task=task, methods=list(cfg.methods), budgets=list(cfg.budgets), lrs=list(cfg.lrs),
             optim={k: (v.value if hasattr(v, "value") else v) for k, v in asdict(
                 OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size)).items() if k != "lr"})
    return d


def _header(cfg: CompareConfig, folder: Path, task: str, split: str, sel: _Selections) -> list[str]:
    lora = "; ".join(f"{b}: selection {m.sparse_total:,}, LoRA {m.lora_total:,}"
                     + (f" (LoRA's rank 1 exceeds the selection on {len(m.unmatched)} modules)" if m.unmatched else "")
                     for b, m in sel.lora.items())
    return [f"# fps-graph compare: {folder.name} ({task})", "",
            f"Generated by `fps-graph compare` on {cfg.train} (training and calibration), {cfg.val} (choosing each "
            "method's learning rate)" + (f" and {cfg.test} (reported)" if cfg.test else "") + ". Reported split: "
            + ("test." if split == "test" else "validation, which also chose the learning rates (optimistic for every "
               "method alike; give --test for an unbiased number).") + " Score: accuracy (seq-cls) or perplexity "
            "(causal-lm, lower is better).",
            "",
            "Selections: `select --budget B --granularity layer` on the ONNX export of the blocks (the LM head and "
            "embeddings are not adapted by any method); LoRA (PEFT) on the same modules, rank matched per module "
            f"({lora}). Every method: epochs {cfg.epochs}, batch size {cfg.batch_size}, the default optimiser and "
            "schedule of `train`; what trains in full beside the adapter (seq-cls: the head) is the same for every "
            f"method. Learning rates {', '.join(f'{x:g}' for x in cfg.lrs)} swept on seed 0; {cfg.seeds} seed(s) at "
            "each method's best."]
