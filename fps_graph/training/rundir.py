"""The run folder: its file names, its creation (refusing to overwrite a run without force) and JSON writing.

Every run writes ``metrics.json`` (``metrics.py`` describes the schema) and ``run_config.json`` (what the run
trained and how to rebuild it; not a PEFT file), the adapter's own files (``delta.safetensors`` for sparse deltas,
``lora.safetensors`` + ``lora_config.json`` for LoRA, ``model.safetensors`` for full fine-tuning), and
optionally ``training_curve.png`` and ``merged.safetensors``. A run that fails removes the folders it created.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fps_graph.errors import OptionError
from fps_graph.formats.io import atomic_output

__all__ = ["FILES", "check_output", "prepare_output", "write_json"]

# every file a run folder can hold, by role; adapter_config.json + adapter_model.safetensors only as a real PEFT
# adapter (the SHiRA export), so that PeftModel.from_pretrained(model, run_folder) either loads or says why not
FILES = {"delta": "delta.safetensors", "run_config": "run_config.json", "metrics": "metrics.json",
         "plot": "training_curve.png", "merged": "merged.safetensors", "adapter_config": "adapter_config.json",
         "adapter_model": "adapter_model.safetensors", "lora": "lora.safetensors", "lora_config": "lora_config.json",
         "model": "model.safetensors"}


def prepare_output(output: str | Path, force: bool) -> tuple[Path, Path | None]:
    """The run folder, created; and the topmost folder this call created (to remove again if the run fails)."""
    out = Path(output)
    check_output(out, force)
    made = None
    for folder in [out, *out.parents]:
        if folder.exists():
            break
        made = folder
    out.mkdir(parents=True, exist_ok=True)
    return out, made


def check_output(output: str | Path, force: bool) -> None:
    """prepare_output's refusals, without creating anything (checked before the long work starts)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise OptionError(f"output path is a file, not a run folder: {out}")
    if out.is_dir() and not force:
        clash = [n for n in FILES.values() if (out / n).exists()]
        if clash:
            raise OptionError(f"{out} holds a run already ({', '.join(clash)}); use --force to overwrite")


def write_json(path: Path, obj: Any) -> None:
    """obj as indented JSON, atomically (overwrites)."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
