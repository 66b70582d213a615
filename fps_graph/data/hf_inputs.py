"""Filling the inputs of Hugging Face / Optimum exports that a tokenizer does not produce, by their conventions.

Given token ids ``[batch, length]`` (no padding, no cache), each model input is made by its name:

* ``input_ids``: the ids (or, if no input has that name, the one 2-D integer input no other rule claims);
* ``attention_mask``: ones ``[batch, length]`` (past length 0, no padding);
* ``token_type_ids``: zeros; ``position_ids``: ``arange(length)`` per row; ``cache_position``: ``arange(length)``;
* ``past_key_values.*`` / ``past_*`` (and ``past``): an empty cache, past length 0. Rank 4 is
  ``[batch, kv_heads, past, head_dim]``: fixed dims are taken from the graph, symbolic head dims from config.json
  (``num_key_value_heads`` or ``num_attention_heads``; ``head_dim`` or ``hidden_size / num_attention_heads``).
  Other ranks: axis 0 is the batch, the first symbolic axis after it the past length, every other axis fixed;
* ``use_cache_branch`` (merged decoders): False, so the no-cache branch runs;
* ``past_seq_len`` / ``seqlens_k`` (GroupQueryAttention models): total length - 1 per row, ``[batch, 1]`` or
  ``[batch]``; ``total_seq_len`` / ``total_sequence_length``: the total length, a scalar (Olive's and the model
  builder's conventions for a prefill with an empty cache).

An ONNX Runtime GenAI folder (``genai_config.json``, as onnxruntime-genai's model builder and Olive write it) names
its inputs by role in ``model.decoder.inputs``: those names are used instead (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_names``/``past_value_names`` patterns with ``%d``, ``past_sequence_length``,
``total_sequence_length``, ``current_sequence_length``), and its ``num_key_value_heads``, ``head_size``,
``hidden_size`` and ``context_length`` stand in for config.json's (``read_genai_config``).

Any other input is refused by name, with the way to supply it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fps_graph.data.sources import InputSpec, _fmt_shape
from fps_graph.errors import ModelError

__all__ = ["InputPlan", "plan_inputs", "read_hf_config", "takes_token_ids", "CONVENTIONS", "GenaiConfig",
           "read_genai_config", "GENAI_CONFIG"]

CONVENTIONS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "cache_position",
               "past_key_values.*", "past_*", "use_cache_branch", "past_seq_len", "total_seq_len")
GENAI_CONFIG = "genai_config.json"
_SEQLENS = ("past_seq_len", "seqlens_k")
_TOTAL = ("total_seq_len", "total_sequence_length")
# genai_config.json model.decoder.inputs roles -> how the input is made (see the module docstring)
_GENAI_ROLES = {"input_ids": "ids", "attention_mask": "ones", "position_ids": "positions",
                "past_key_names": "past", "past_value_names": "past", "past_sequence_length": "seqlens",
                "total_sequence_length": "total", "current_sequence_length": "total"}


@dataclass(frozen=True)
class GenaiConfig:
    """What fps-graph reads from an ONNX Runtime GenAI folder's genai_config.json."""

    folder: Path
    filename: str                     # the decoder's ONNX file, relative to the folder
    inputs: dict[str, str]            # role -> graph input name (or pattern with %d)
    config: dict[str, Any]            # the same sizes under config.json's keys

    def roles(self, names: list[str]) -> dict[str, str]:
        """Graph input name -> kind, for the inputs the config names by role."""
        out: dict[str, str] = {}
        for role, pattern in self.inputs.items():
            kind = _GENAI_ROLES.get(role)
            if kind is None or not isinstance(pattern, str):
                continue
            if "%d" in pattern:
                rx = re.compile(re.escape(pattern).replace("%d", r"\d+") + "$")
                out.update({n: kind for n in names if rx.match(n)})
            elif pattern in names:
                out[pattern] = kind
        return out


def read_genai_config(folder: str | os.PathLike) -> GenaiConfig | None:
    """The decoder file, input roles and sizes of an ONNX Runtime GenAI folder; None without genai_config.json."""
    p = Path(folder) / GENAI_CONFIG
    if not p.is_file():
        return None
    try:
        with open(p, encoding="utf-8") as f:
            raw = json.load(f)
        model = raw["model"]
        dec = model["decoder"]
        filename = str(dec["filename"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{p}: not a readable ONNX Runtime GenAI config (model.decoder.filename): {exc}") from exc
    if Path(filename).is_absolute() or ".." in Path(filename).parts:
        raise ModelError(f"{p}: model.decoder.filename {filename!r} points outside the folder")
    sizes = {"num_key_value_heads": dec.get("num_key_value_heads"), "num_attention_heads":
             dec.get("num_attention_heads"), "head_dim": dec.get("head_size"), "hidden_size": dec.get("hidden_size"),
             "num_hidden_layers": dec.get("num_hidden_layers"), "max_position_embeddings": model.get("context_length"),
             "vocab_size": model.get("vocab_size")}
    inputs = dec.get("inputs") if isinstance(dec.get("inputs"), dict) else {}
    return GenaiConfig(Path(folder), filename, dict(inputs), {k: v for k, v in sizes.items() if v is not None})


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of a Hugging Face model folder ({} when absent or unreadable); a nested text_config is merged
    under the top-level keys."""
    p = Path(folder) / "config.json"
    genai = read_genai_config(folder) if (Path(folder) / GENAI_CONFIG).is_file() else None
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return dict(genai.config) if genai else {}
    if not isinstance(cfg, dict):
        return dict(genai.config) if genai else {}
    if genai:
        cfg = {**genai.config, **cfg}
    text = cfg.get("text_config")
    return {**text, **cfg} if isinstance(text, dict) else cfg


def takes_token_ids(specs: list[InputSpec]) -> bool:
    """True when some input can take token ids: ``input_ids``, or an integer input of rank 2 (or unknown rank)."""
    return any(s.name == "input_ids" or (_is_int(s.dtype) and len(s.shape) in (0, 2)) for s in specs)


def _is_past(name: str) -> bool:
    return name.startswith(("past_key_values", "past_")) or name == "past"


def _is_int(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer)


def _cfg_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass
class InputPlan:
    """How each model input is made from a batch of token ids (see the module docstring)."""

    ids_name: str
    kinds: dict[str, str]                       # input name -> ids | ones | zeros | positions | cache_position | past | false
    specs: dict[str, InputSpec]
    past_shapes: dict[str, tuple] = field(default_factory=dict)   # dims with "B" for the batch and 0 for the past
    fixed_length: int | None = None             # the ids input's sequence length when the graph fixes it
    fixed_batch: int | None = None              # the ids input's batch size when the graph fixes it (1 only)
    max_positions: int | None = None            # config.json max_position_embeddings

    def build(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every model input for token ids ``[batch, length]`` (ids first, so its leading size counts samples)."""
        b, t = ids.shape
        out: dict[str, np.ndarray] = {self.ids_name: np.ascontiguousarray(ids, dtype=self.specs[self.ids_name].dtype)}
        for name, kind in self.kinds.items():
            if kind == "ids":
                continue
            dt = self.specs[name].dtype
            if kind == "ones":
                out[name] = np.ones((b, t), dtype=dt)
            elif kind == "zeros":
                out[name] = np.zeros((b, t), dtype=dt)
            elif kind == "positions":
                rows = 1 if self.specs[name].shape[:1] == (1,) else b
                out[name] = np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=dt), (rows, t)))
            elif kind == "cache_position":
                out[name] = np.arange(t, dtype=dt)
            elif kind == "past":
                out[name] = np.zeros(tuple(b if d == "B" else d for d in self.past_shapes[name]), dtype=dt)
            elif kind == "seqlens":      # GroupQueryAttention: total length - 1 per row (no padding)
                shape = (b, 1) if len(self.specs[name].shape) == 2 else (b,)
                out[name] = np.full(shape, t - 1, dtype=dt)
            elif kind == "total":        # the total sequence length, a scalar (or [1])
                out[name] = np.full(self.specs[name].shape if self.specs[name].shape == (1,) else (), t, dtype=dt)
            else:   # "false"
                out[name] = np.zeros(self.specs[name].shape if self.specs[name].shape == (1,) else (), dtype=dt)
        return out


def _past_shape(spec: InputSpec, cfg: dict[str, Any], where: str) -> tuple:
    """The shape of an empty cache input: "B" for the batch, 0 for the past length."""
    dims = list(spec.shape)
    if len(dims) == 4:
        heads = dims[1] if isinstance(dims[1], int) else _cfg_int(cfg, "num_key_value_heads", "num_attention_heads",
                                                                    "n_head", "num_heads")
        head_dim = dims[3] if isinstance(dims[3], int) else (
            _cfg_int(cfg, "head_dim") or (lambda h, n: h // n if h and n else None)(
                _cfg_int(cfg, "hidden_size", "n_embd", "d_model"), _cfg_int(cfg, "num_attention_heads", "n_head")))
        if heads is None or head_dim is None:
            raise ModelError(f"{where}: input {spec.name!r} {_fmt_shape(dims)} has symbolic head dims and no "
                                "config.json beside the model says them (num_key_value_heads, head_dim); put the "
                                "model's config.json beside it")
        if isinstance(dims[2], int) and dims[2] != 0:
            raise ModelError(f"{where}: input {spec.name!r} has a fixed past length of {dims[2]} (a static "
                                "cache); export the model with a dynamic past length")
        return ("B", heads, 0, head_dim)
    if not dims:
        raise ModelError(f"{where}: input {spec.name!r} has no declared shape; cannot make an empty cache for it")
    shape: list = ["B"]
    past_done = False
    for d in dims[1:]:
        if isinstance(d, int):
            shape.append(d)
        elif not past_done:
            shape.append(0)
            past_done = True
        else:
            raise ModelError(f"{where}: input {spec.name!r} {_fmt_shape(dims)} has more than one symbolic axis "
                                "besides the batch; cannot tell which is the past length")
    return tuple(shape)


def plan_inputs(specs: list[InputSpec], config: dict[str, Any], where: str | os.PathLike,
                roles: dict[str, str] | None = None) -> InputPlan:
    """Decide how to make every model input from token ids; refuse an input no convention covers. ``roles``
    (input name -> kind, from a genai_config.json) comes before the name conventions."""
    where = str(where)
    by_name = {s.name: s for s in specs}
    kinds: dict[str, str] = {}
    past_shapes: dict[str, tuple] = {}
    unknown: list[InputSpec] = []
    roles = roles or {}
    for s in specs:
        n = s.name
        if n in roles:
            kinds[n] = roles[n]
            if roles[n] == "past":
                past_shapes[n] = _past_shape(s, config, where)
        elif n in _SEQLENS:
            kinds[n] = "seqlens"
        elif n in _TOTAL:
            kinds[n] = "total"
        elif n == "input_ids":
            kinds[n] = "ids"
        elif n == "attention_mask":
            kinds[n] = "ones"
        elif n == "token_type_ids":
            kinds[n] = "zeros"
        elif n == "position_ids":
            kinds[n] = "positions"
        elif n == "cache_position":
            kinds[n] = "cache_position"
        elif n == "use_cache_branch":
            kinds[n] = "false"
        elif _is_past(n):
            kinds[n] = "past"
            past_shapes[n] = _past_shape(s, config, where)
        else:
            unknown.append(s)
    for n, k in kinds.items():
        if k in ("seqlens", "total") and (not _is_int(by_name[n].dtype) or len(by_name[n].shape) > 2):
            raise ModelError(f"{where}: input {n!r} {_fmt_shape(by_name[n].shape)} ({by_name[n].dtype.name}) "
                                "does not look like a sequence length (an integer scalar or [batch, 1])")
    if "ids" not in kinds.values():
        ints = [s for s in unknown if _is_int(s.dtype) and len(s.shape) == 2]
        if len(ints) == 1:
            kinds[ints[0].name] = "ids"
            unknown.remove(ints[0])
    if unknown:
        s = unknown[0]
        raise ModelError(f"{where}: model input {s.name!r} {_fmt_shape(s.shape)} is not made by the tokenizer "
                            f"and follows no transformers/Optimum convention ({', '.join(CONVENTIONS)}); give it once "
                            f"with --static {s.name}=FILE.npy if it has no sample axis, else select from an .npz "
                            "keyed by input name that holds every input")
    ids_name = next((n for n, k in kinds.items() if k == "ids"), None)
    if ids_name is None:
        raise ModelError(f"{where}: no input_ids input to feed token ids to (inputs: "
                            f"{', '.join(by_name) or 'none'})")
    ids_spec = by_name[ids_name]
    if not _is_int(ids_spec.dtype):
        raise ModelError(f"{where}: input {ids_name!r} expects {ids_spec.dtype.name}, not token ids (integers)")
    if len(ids_spec.shape) not in (0, 2):
        raise ModelError(f"{where}: input {ids_name!r} has shape {_fmt_shape(ids_spec.shape)}; token ids need "
                            "[batch, sequence]")
    for n, k in kinds.items():
        if k in ("ones", "zeros", "positions") and len(by_name[n].shape) not in (0, 2):
            raise ModelError(f"{where}: input {n!r} has shape {_fmt_shape(by_name[n].shape)}; the convention is "
                                "[batch, sequence]; feed this model from an .npz keyed by input name instead")
    shape = ids_spec.shape
    fixed_len = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
    fixed_batch = shape[0] if len(shape) == 2 and isinstance(shape[0], int) else None
    if fixed_batch is not None and fixed_batch != 1:
        raise ModelError(f"{where}: input {ids_name!r} has a fixed batch size of {fixed_batch}; text is fed in "
                            "batches of equal-length sequences of any size. Export with a dynamic batch axis "
                            "(or a batch of 1)")
    return InputPlan(ids_name, kinds, by_name, past_shapes, fixed_len, fixed_batch,
                     _cfg_int(config, "max_position_embeddings", "n_positions"))
