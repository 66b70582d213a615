"""The PyTorch model a run trains: built by a factory (``module:function`` or ``file.py:function``, weights from
safetensors), or read from a local Hugging Face folder (``hf:DIR``: config.json + safetensors, nothing downloaded)
with the transformers Auto class of the task.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from fps_graph.errors import DataError, FpsGraphError, ModelError, OptionError, RuntimeFailure

__all__ = ["load_factory", "build_model", "hf_folder", "read_config", "default_task", "load_hf_model"]


def load_factory(spec: str) -> Callable[..., Any]:
    """Resolve 'package.module:factory' or 'path/to/file.py:factory' to a callable."""
    if ":" not in spec:
        raise OptionError(f"expected MODULE:FACTORY, got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise OptionError(f"module file not found: {path}")
            s = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(s)
            sys.modules[path.stem] = module
            s.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except FpsGraphError:
        raise
    except Exception as exc:   # user code: any error while importing it is reported, with its cause
        raise ModelError(f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ModelError(f"{mod_name!r} has no callable {attr!r}")
    return fn


def build_model(spec: str, weights: str | None = None, kwargs: dict[str, Any] | None = None) -> Any:
    """Call the factory and load safetensors weights into the module (strict); eval mode."""
    import torch
    from safetensors.torch import load_file

    model = load_factory(spec)(**(kwargs or {}))
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{spec} did not return a torch.nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise DataError(f"weights file not found: {weights}")
        sd = load_file(weights)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise DataError(f"{weights} does not fit {spec}: missing {list(missing)[:5]}, "
                                f"unexpected {list(unexpected)[:5]}")
    return model.eval()


def hf_folder(spec: str) -> Path | None:
    """The model folder of 'hf:DIR' or of a directory holding config.json; None for a factory spec."""
    if spec.startswith("hf:"):
        path = Path(spec[3:])
    elif Path(spec).is_dir():
        path = Path(spec)
    else:
        return None
    if not path.is_dir():
        raise ModelError(f"Hugging Face model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} holds no config.json; `fps-graph train hf:DIR` needs a folder written by "
                            "save_pretrained (config.json and *.safetensors)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{path} holds no weights (*.safetensors); save the model with save_pretrained")
    return path


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc}") from exc


def default_task(folder: Path) -> str:
    """causal-lm or seq-cls, from the architectures that config.json names."""
    archs = read_config(folder).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq-cls"
    return "causal-lm"


def load_hf_model(folder: Path, auto_class: str) -> Any:
    """The transformers model of a local folder with an Auto class (float32, eval mode); no download is attempted.

    The names of tensors the checkpoint lacks (new, randomly initialised) are kept in ``model.fps_missing_keys``."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise RuntimeFailure("Hugging Face models need transformers: pip install transformers") from exc
    import torch

    cls = getattr(transformers, auto_class)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()      # the library prints nothing; missing weights are reported by the caller
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True)
    except Exception as exc:   # transformers raises many kinds for a folder it cannot build; the cause is kept
        raise ModelError(f"cannot build a model from {folder} with transformers ({auto_class}): "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.fps_missing_keys = sorted(info.get("missing_keys") or [])
    return model.eval()
