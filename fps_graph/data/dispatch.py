"""Opening data by what a path holds: images, array files or text, checked against the model's inputs.

Above ``sources`` (images, arrays) and ``text`` (tokenized text, itself a ``Source``), so neither imports the other
to dispatch.
"""
from __future__ import annotations

import os
from pathlib import Path

from fps_graph.data.hf_inputs import takes_token_ids
from fps_graph.data.sources import (ARRAY_EXTS, IMAGE_EXTS, ArraySource, ImageOptions, InputSpec, Source,
                                    _fmt_shape, _image_source, list_files)
from fps_graph.data.text import TextOptions, TextSource, is_text_path
from fps_graph.errors import DataError

__all__ = ["open_source"]


def open_source(path: str | os.PathLike, specs: list[InputSpec], image_opts: ImageOptions | None = None,
                text_opts: TextOptions | None = None, model_path: str | os.PathLike | None = None) -> Source:
    """A Source for a data folder or file, checked against the model inputs (text needs the model's path, where
    its tokenizer lives, or text_opts.tokenizer)."""
    p = Path(path)
    opts = image_opts or ImageOptions()
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    text = is_text_path(p)
    if text and p.is_file() and not takes_token_ids(specs):
        raise DataError(f"{p} is text, but the model takes no token ids (inputs: "
                            f"{', '.join(f'{s.name} {s.dtype.name} {_fmt_shape(s.shape)}' for s in specs)})")
    if text and takes_token_ids(specs):   # a folder of .txt notes beside images is not text data for an image model
        if p.is_dir() and (list_files(p, ARRAY_EXTS) or list_files(p, IMAGE_EXTS)):
            raise DataError(f"{p}: holds text files beside images or array files; point at one kind")
        return TextSource(p, specs, model_path, text_opts)
    if p.is_file():
        ext = p.suffix.lower()
        if ext in ARRAY_EXTS:
            return ArraySource([p], specs)
        if ext in IMAGE_EXTS:
            return _image_source([p], specs, opts)
        raise DataError(f"{p}: not a data file (expected an image, .npy/.npz/.safetensors or .txt/.jsonl)")
    arrays = list_files(p, ARRAY_EXTS)
    images = list_files(p, IMAGE_EXTS)
    if arrays and images:
        raise DataError(f"{p}: holds both images and array files; point at one kind")
    if arrays:
        return ArraySource(arrays, specs)
    if images:
        return _image_source(images, specs, opts)
    if not any(p.iterdir()):
        raise DataError(f"data folder is empty: {p}")
    if text:
        raise DataError(f"no data files (images or .npy/.npz/.safetensors) found in {p}; its .txt/.jsonl files "
                            "are text, and this model takes no token ids")
    raise DataError(f"no data files (images, .npy/.npz/.safetensors or .txt/.jsonl) found in {p}")
