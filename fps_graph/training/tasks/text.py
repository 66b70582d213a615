"""Text for the text tasks, read and tokenized as `select` reads and tokenizes it (``fps_graph.data.text``:
``read_texts``, ``TextTokenizer``), then right-padded per batch for training (padding never counts in the loss).

Which tokenizer and maximum length: the options' (``DataConfig.text``), else the masks file's record of what
`select` used, else the model folder's tokenizer.json and the model's limit (as `select` chooses it). A text
longer than the maximum length is an error naming file and line, never cut.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fps_graph.data.text import TextTokenizer, default_max_length
from fps_graph.errors import DataError, OptionError
from fps_graph.training.models import read_config
from fps_graph.training.tasks.base import DataContext, TaskData

__all__ = ["TextData", "TextSetup", "text_setup"]


@dataclass
class TextData(TaskData):
    """Tokenised samples: ids per sample, the position where the loss starts, labels (seq-cls), and where each
    sample came from."""

    ids: list[np.ndarray]
    loss_from: np.ndarray
    labels: np.ndarray | None
    classes: list[str]
    source: str
    pad_id: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Right-padded input_ids and attention_mask; loss_mask (tokens predicted from what precedes them, never
        padding or prompt) and labels (seq-cls)."""
        idx = np.asarray(indices)
        width = max(len(self.ids[i]) for i in idx)
        ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
        am = np.zeros((len(idx), width), dtype=np.int64)
        lm = np.zeros((len(idx), width), dtype=bool)
        for r, i in enumerate(idx):
            x = self.ids[i]
            ids[r, :len(x)] = x
            am[r, :len(x)] = 1
            lm[r, max(1, int(self.loss_from[i])):len(x)] = True
        out = {"input_ids": ids, "attention_mask": am, "loss_mask": lm}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out


@dataclass
class TextSetup:
    """The tokenizer and maximum length a run uses, and the record of them for metrics and the delta file."""

    tokenizer: TextTokenizer
    max_length: int
    record: dict[str, Any]


def text_setup(ctx: DataContext) -> TextSetup:
    """The tokenizer and maximum length, as select chose them unless the options say otherwise."""
    if ctx.folder is None:
        raise OptionError("text tasks need a Hugging Face model folder (hf:DIR), not a factory")
    text = ctx.config.text
    rec = ctx.record if ctx.record.get("kind") == "text" else {}
    max_length = int(text.max_length or rec.get("max_length") or default_max_length([ctx.folder])[0])
    tok_path = Path(text.tokenizer or rec.get("tokenizer") or ctx.folder)
    if not text.tokenizer and rec.get("tokenizer") and not tok_path.exists():
        tok_path = ctx.folder      # the record names select's path; the model folder holds the same tokenizer
    tok = TextTokenizer(tok_path, read_config(ctx.folder))
    return TextSetup(tok, max_length, {"tokenizer": str(tok.path), "max_length": max_length, "masks_record": rec})


def check_lengths(ids: list[np.ndarray], where: list[str], max_length: int, min_tokens: int) -> None:
    """Every sample within max_length tokens and at least min_tokens long (errors name file and line)."""
    for place, x in zip(where, ids):
        if len(x) > max_length:
            raise DataError(f"{place}: {len(x)} tokens, longer than max_length {max_length}; raise --max-length "
                                "or shorten the text (texts are never cut silently)")
        if len(x) < min_tokens:
            raise DataError(f"{place}: {len(x)} token(s); causal-lm needs at least {min_tokens} to predict one"
                                if min_tokens > 1 else f"{place}: empty text")
