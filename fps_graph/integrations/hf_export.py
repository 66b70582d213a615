"""`fps-graph export hf:DIR`: a Hugging Face model folder -> the ONNX folder that `select` reads.

The folder written holds ``model.onnx`` (weights inline, or in ``model.onnx.data`` beside it when the model is
over 1.8 GB: protobuf's 2 GB limit), ``tokenizer.json`` (converted by transformers' ``AutoTokenizer`` when the
source folder has only a slow tokenizer), the tokenizer's config files and ``config.json``. What the graph is:

* **Inputs** ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has token types), each
  ``[batch, sequence]`` with both axes dynamic; **output** ``logits`` (causal-lm: ``[batch, sequence, vocab]``;
  seq-cls: ``[batch, labels]``) or ``last_hidden_state`` (feature-extraction). Padding masks work as in PyTorch.
* **No cache by default** (``cache=False``): the graph ``select`` handles best (nothing to fill, every weight in
  the main graph, equal-length text batches). ``cache=True`` (causal-lm) adds ``position_ids`` and the inputs
  ``past_key_values.{i}.key|value`` ``[batch, kv_heads, past, head_dim]`` (past dynamic, 0 allowed) and outputs
  ``present.{i}.key|value``, the layout of Optimum's ``decoder_with_past`` that ``select`` fills with an empty cache.
* **Exporter**: PyTorch's TorchScript exporter (``torch.onnx.export(dynamo=False)``): it traces the model with an
  example batch and keeps the batch and sequence axes symbolic. It exports every Llama/Qwen2/BERT-style model of
  the installed transformers 5.x we tried, in under a second for tiny ones, and masks keep working with padding;
  the dynamo exporter (``torch.export``) fails on these models' masking code in this transformers version.
* **Weights keep their PyTorch names and layouts** (no constant folding: a Linear's weight is read through a
  ``Transpose`` node, folded by ONNX Runtime when it loads the model), so a tied LM head / input embedding is stored
  once. The map from every scored weight to its PyTorch name is checked by value and recorded in the model
  (``fps_graph.weight_map``, as ``fps-graph export FACTORY`` does), under the name ``train hf:DIR --task TASK``
  uses: a tied tensor under its first name in ``named_parameters`` (the input embedding,
  ``model.embed_tokens.weight``), its other names recorded as aliases.
* **Checked**: after export, ONNX Runtime runs two batches of different shapes (one padded) and must give
  PyTorch's outputs within a relative 1e-4, else nothing is written.

Task heads: ``causal-lm`` (``AutoModelForCausalLM``), ``seq-cls`` (``AutoModelForSequenceClassification``),
``feature-extraction`` (``AutoModel``: the plain encoder or decoder, no head). Mask keys of a feature-extraction
export are the base model's names (``encoder.layer.0...``); ``attach`` (and so ``train hf:DIR``) maps them onto a
task model's names by the model's ``base_model_prefix`` (``bert.encoder.layer.0...``) and back.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from fps_graph.errors import DataError, ModelError, OptionError
from fps_graph.graph.names import META_KEY
from fps_graph.integrations.torch_export import weight_map

if TYPE_CHECKING:  # pragma: no cover
    import torch

EXTERNAL_OVER = 1_800_000_000     # bytes: protobuf refuses messages over 2 GB
TOLERANCE = 1e-4                  # relative: max |ORT - PyTorch| / max |PyTorch|
# files of a tokenizer / model folder that `select` and `train` read, copied as they are
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "sentence_bert_config.json")


class Task(str, Enum):
    """The head of the exported model (the names `train hf:DIR --task` uses, plus the plain base model)."""

    CAUSAL_LM = "causal-lm"
    SEQ_CLS = "seq-cls"
    FEATURE_EXTRACTION = "feature-extraction"


@dataclass(frozen=True)
class HfExportOptions:
    """Options of ``export_hf``.

    Args:
        task: the head (None: from config.json's ``architectures``: ``*ForCausalLM`` -> causal-lm,
            ``*ForSequenceClassification`` -> seq-cls, else feature-extraction).
        cache: causal-lm only: add past key/value inputs and present outputs (Optimum's decoder_with_past layout).
        opset: ONNX opset (None: the exporter's default).
        check: run ONNX Runtime against PyTorch after export (relative 1e-4) and refuse to write on a mismatch.
        force: replace files of an existing output folder.
    """

    task: Task | None = None
    cache: bool = False
    opset: int | None = None
    check: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.task is not None and not isinstance(self.task, Task):
            object.__setattr__(self, "task", _task(self.task))
        if self.cache and self.task not in (None, Task.CAUSAL_LM):
            raise OptionError(f"a cache (--cache) exists for causal-lm exports only, not {self.task.value}")


def _task(value: str) -> Task:
    try:
        return Task(value)
    except ValueError as exc:
        raise OptionError(f"unknown task {value!r} (use {', '.join(t.value for t in Task)})") from exc


def hf_source(spec: str) -> Path | None:
    """The folder of an ``hf:DIR`` spec (None for anything else); refuses a folder without config.json/weights."""
    if not spec.startswith("hf:"):
        return None
    path = Path(spec[3:])
    if not path.is_dir():
        raise DataError(f"Hugging Face model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise DataError(f"{path} holds no config.json; export needs a folder written by save_pretrained")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise DataError(f"{path} holds no weights (*.safetensors); save the model with save_pretrained")
    return path


def default_task(folder: Path) -> Task:
    """The task config.json's ``architectures`` name (causal-lm, seq-cls, else feature-extraction)."""
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return Task.SEQ_CLS
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return Task.CAUSAL_LM
    return Task.FEATURE_EXTRACTION


@contextlib.contextmanager
def _quiet():
    """The exporters' and transformers' informational output off (the library prints nothing)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(folder: Path, task: Task) -> Any:
    """The transformers model of a local folder for a task (float32, eval, eager attention); nothing downloaded."""
    import torch
    import transformers

    cls = {Task.CAUSAL_LM: transformers.AutoModelForCausalLM,
           Task.SEQ_CLS: transformers.AutoModelForSequenceClassification,
           Task.FEATURE_EXTRACTION: transformers.AutoModel}[task]
    try:
        with _quiet(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)      # a head the checkpoint lacks is initialised the same way every time
            model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                              attn_implementation="eager", output_loading_info=True)
    except Exception as exc:
        raise ModelError(f"cannot build a {task.value} model from {folder} with transformers ({cls.__name__}): "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    missing = sorted(info.get("missing_keys") or [])
    model.fps_missing_keys = missing
    return model.eval()


def canonical_names(model: Any) -> tuple[dict[str, "torch.Tensor"], dict[str, list[str]]]:
    """The model's floating-point tensors under one name each (a tied tensor under its first name in
    ``named_parameters(remove_duplicate=False)``, as ``attach`` keys it) and, per such name, its other names."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    tensors: dict[str, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.setdefault(first[id(p)], []).append(name)
            continue
        first[id(p)] = name
        if p.is_floating_point():
            tensors[name] = p
    return tensors, aliases


def _input_names(model: Any, task: Task) -> list[str]:

    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def _layers(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


def _kv_shape(model: Any) -> tuple[int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return heads, head_dim


def _wrap(model: Any, task: Task, names: list[str], cache: bool) -> Any:
    """The model itself with a positional forward (inputs in `names` order, then the flat cache) returning plain
    tensors; its class is swapped for a subclass, so parameter names stay the model's own."""

    base = type(model)
    n_layers = _layers(model) if cache else 0
    # transformers 5.x renames forward's `past_key_values` to `cache` (the old name warns)
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    out_key = "last_hidden_state" if task == Task.FEATURE_EXTRACTION else "logits"

    class Export(base):  # type: ignore[misc, valid-type]
        def forward(self, *args: Any) -> Any:
            kwargs = dict(zip(names, args))
            if task == Task.CAUSAL_LM:
                kwargs["use_cache"] = cache
            if cache:
                from transformers import DynamicCache

                flat = args[len(names):]
                past = DynamicCache(config=self.config)
                for i in range(n_layers):
                    past.update(flat[2 * i], flat[2 * i + 1], i)
                kwargs[cache_arg] = past
            out = base.forward(self, **kwargs)
            if not cache:
                return out[out_key]
            present = out["past_key_values"] if "past_key_values" in out else out["cache"]
            flat_out = []
            for i in range(n_layers):
                layer = present.layers[i]
                flat_out += [layer.keys, layer.values]
            return (out[out_key], *flat_out)

    Export.__name__ = base.__name__
    Export.__qualname__ = base.__qualname__
    model.__class__ = Export
    return model


def _example(model: Any, names: list[str], cache: bool, batch: int, length: int, past: int,
             pad: bool, seed: int) -> tuple:
    """Example inputs: random ids (special ids avoided), a mask (the last rows padded when pad), zeros types."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config")
                else model.config.vocab_size)
    ids = torch.randint(min(4, vocab - 1), vocab, (batch, length), generator=g)
    mask = torch.ones(batch, past + length, dtype=torch.int64)
    if pad and batch > 1:
        mask[-1, past + length - max(1, length // 3):] = 0     # right padding of the last row
    out = [ids, mask]
    if "token_type_ids" in names:
        out.append(torch.zeros_like(ids))
    if cache:
        out.insert(names.index("position_ids"), torch.arange(past, past + length).expand(batch, length).clone())
        heads, head_dim = _kv_shape(model)
        for _ in range(_layers(model)):
            out += [torch.randn(batch, heads, past, head_dim, generator=g) for _ in range(2)]
    return tuple(out)


def _export(model: Any, names: list[str], task: Task, cache: bool, path: Path, opset: int | None) -> list[str]:
    """torch.onnx.export (TorchScript) with dynamic batch and sequence axes; returns the output names."""
    import torch

    out_names = ["last_hidden_state" if task == Task.FEATURE_EXTRACTION else "logits"]
    axes: dict[str, dict[int, str]] = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    in_names = list(names)
    if cache:
        axes["attention_mask"] = {0: "batch_size", 1: "past_sequence_length + sequence_length"}
        for i in range(_layers(model)):
            for kv in ("key", "value"):
                in_names.append(f"past_key_values.{i}.{kv}")
                axes[in_names[-1]] = {0: "batch_size", 2: "past_sequence_length"}
                out_names.append(f"present.{i}.{kv}")
                axes[out_names[-1]] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    axes[out_names[0]] = {0: "batch_size"} if task == Task.SEQ_CLS else {0: "batch_size", 1: "sequence_length"}
    example = _example(model, names, cache, batch=2, length=8, past=4 if cache else 0, pad=False, seed=0)
    kwargs: dict[str, Any] = {"input_names": in_names, "output_names": out_names, "dynamic_axes": axes,
                              "dynamo": False, "do_constant_folding": False}
    if opset:
        kwargs["opset_version"] = opset
    try:
        with torch.no_grad(), _quiet():
            torch.onnx.export(model, example, str(path), **kwargs)
    except Exception as exc:
        raise ModelError(f"torch.onnx.export failed on {type(model).__name__}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from exc
    return out_names


def _check(model: Any, names: list[str], cache: bool, path: Path) -> float:
    """Largest relative difference between ONNX Runtime and PyTorch over two batches of other shapes (one padded)."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    worst = 0.0
    for batch, length, past, seed in ((1, 5, 3 if cache else 0, 1), (3, 11, 0, 2)):
        ex = _example(model, names, cache, batch, length, past, pad=not cache, seed=seed)
        with torch.no_grad():
            ref = model(*ex)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(None, {n: t.numpy() for n, t in zip(in_names, ex)})
        mask = ex[1].numpy().astype(bool)
        for r, o in zip(refs, got):
            r = r.numpy()
            diff = np.abs(o - r)
            if r.ndim == 3 and r.shape[:2] == mask.shape:
                diff = diff[mask]           # padded positions' outputs are not defined
            scale = float(np.abs(r).max()) or 1.0
            worst = max(worst, float(diff.max()) / scale if diff.size else 0.0)
    return worst


def _tokenizer_files(folder: Path, staged: Path) -> list[str]:
    """Copy the tokenizer and config files; write tokenizer.json through AutoTokenizer when only a slow one exists."""
    copied = []
    for name in COPIED:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, staged / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        try:
            from transformers import AutoTokenizer

            with _quiet():
                tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
        except Exception as exc:
            raise DataError(f"{folder} has no tokenizer.json and transformers cannot make one "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); `select` needs a "
                                "tokenizer.json for text (export anyway with --no-tokenizer and feed arrays)") from exc
        if not getattr(tok, "is_fast", False):
            raise DataError(f"{folder} has no tokenizer.json and its tokenizer has no fast version to write one")
        with tempfile.TemporaryDirectory(dir=staged) as tmp:
            tok.save_pretrained(tmp)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(tmp) / name).is_file() and name not in copied:
                    shutil.copyfile(Path(tmp) / name, staged / name)
                    copied.append(name)
    return copied


def _record(path: Path, model: Any, task: Task, source: Path) -> dict[str, Any]:
    """Write the weight map (checked by value) and the export record into the model; external data when large."""


    tensors, aliases = canonical_names(model)
    sd = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    wmap = weight_map(path, sd)
    for rec in wmap.values():
        if rec["torch"] in aliases:
            rec["aliases"] = aliases[rec["torch"]]
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    info = {"source": str(source), "task": task.value, "class": type(model).__mro__[1].__name__,
            "tied": {k: v for k, v in aliases.items()}}
    for key, value in {META_KEY: json.dumps(wmap, sort_keys=True),
                       "fps_graph.source": f"hf:{source}",
                       "fps_graph.hf_export": json.dumps(info, sort_keys=True)}.items():
        proto.metadata_props.add(key=key, value=value)
    path.unlink()
    for f in path.parent.glob("*"):        # the exporter's own external data files, if it wrote any
        if f.is_file() and f.suffix not in (".json",) and f.name != path.name:
            f.unlink()
    if proto.ByteSize() > EXTERNAL_OVER or any(t.data_location == onnx.TensorProto.EXTERNAL
                                               for t in proto.graph.initializer):
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(proto, str(path))
    return {"mapped": len(wmap), "tied": info["tied"]}


def _publish(staged: Path, out: Path) -> None:
    """Move the staged files into the output folder (created when missing)."""
    if not out.exists():
        os.replace(staged, out)
        return
    if not (staged / "model.onnx.data").exists():
        (out / "model.onnx.data").unlink(missing_ok=True)     # the replaced model's weights
    for f in sorted(staged.iterdir()):
        os.replace(f, out / f.name)


def export_hf(source: str | os.PathLike, output: str | os.PathLike,
              options: HfExportOptions = HfExportOptions()) -> dict[str, Any]:
    """Export a Hugging Face model folder to an ONNX folder for ``select``; return a short report.

    Args:
        source (`str`): the model folder (``save_pretrained``: config.json, *.safetensors, tokenizer files).
        output (`str`): the folder to write (created; its parent must exist).
        options (`HfExportOptions`): task, cache, opset, check, force.

    Returns:
        `dict`: output folder, task, model class, inputs, outputs, weights mapped, tied names, check result.

    Example:
        ```py
        export_hf("llama/", "llama_onnx/")          # then: fps-graph select llama_onnx/ calib.txt
        ```
    """
    folder = Path(source)
    hf_source(f"hf:{folder}")
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OptionError(f"output folder's parent does not exist: {parent}")
    if out.exists() and not out.is_dir():
        raise OptionError(f"output path is a file, not a folder: {out}")
    if out.exists() and any(out.iterdir()) and not options.force:
        raise OptionError(f"output folder exists and is not empty: {out} (use --force to replace its files)")
    task = options.task or default_task(folder)
    if options.cache and task != Task.CAUSAL_LM:
        raise OptionError(f"a cache (--cache) exists for causal-lm exports only; {folder} exports as {task.value}")
    if out.resolve() == folder.resolve():
        raise OptionError(f"output {out} is the model folder itself; choose another -o")
    model = load_model(folder, task)
    names = _input_names(model, task)
    if options.cache:
        names = names + ["position_ids"]
    wrapped = _wrap(model, task, names, options.cache)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        onnx_path = staged / "model.onnx"
        out_names = _export(wrapped, names, task, options.cache, onnx_path, options.opset)
        rec = _record(onnx_path, model, task, folder)
        err = _check(wrapped, names, options.cache, onnx_path) if options.check else None
        if err is not None and not err <= TOLERANCE:
            raise ModelError(f"the exported model's outputs differ from PyTorch's by {err:.2e} (relative, more "
                                f"than {TOLERANCE:g}); nothing written (report this model's architecture)")
        copied = _tokenizer_files(folder, staged)
        _publish(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return {"output": str(out), "task": task.value, "class": type(model).__mro__[1].__name__,
            "inputs": names + ([f"past_key_values.{i}.{kv}" for i in range(_layers(model)) for kv in ("key", "value")]
                               if options.cache else []),
            "outputs": out_names, "mapped": rec["mapped"], "tied": rec["tied"], "max_rel_error": err,
            "files": sorted(["model.onnx", *copied] + (["model.onnx.data"] if (out / "model.onnx.data").exists()
                                                        else [])),
            "missing_keys": model.fps_missing_keys}


__all__ = ["HfExportOptions", "Task", "canonical_names", "default_task", "export_hf", "hf_source"]
