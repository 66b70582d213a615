"""Safe output files: written to a temporary file beside the target and renamed at the end."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

from safetensors.numpy import save

from fps_graph.errors import OptionError


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output whose folder is missing, or that exists already unless force is set."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OptionError(f"output folder does not exist: {parent}")
    if out.is_dir():
        raise OptionError(f"output path is a folder: {out}")
    if out.exists() and not force:
        raise OptionError(f"output file exists: {out} (use --force to overwrite)")
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it onto path only if the block succeeds."""
    out = check_output_path(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600 files; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so big models do not sit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.numpy.save_file with a canonical (sorted) header, so equal inputs give equal bytes.

    safetensors writes its metadata map in hash order; we re-serialise the JSON header with sorted keys (tensor
    offsets are relative to the data section, so the data bytes are kept as they are).
    """


    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(raw[8 + n:])


def decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """A safetensors header's string values, JSON-decoded where they are JSON (structured records), else kept."""
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return meta
