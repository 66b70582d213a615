"""Causal language modelling (``causal-lm``): next-token cross-entropy over the learnt tokens; loss, perplexity,
token accuracy and tokens learnt per epoch.

Data: ``.txt`` (one sample per non-empty line) or ``.jsonl`` (the text under ``text_field``); every token after the
first is learnt. With ``prompt_field`` (and ``completion_field``, default ``completion``) only the completion and
its end-of-sequence token are learnt. Padding never counts. The LM head (the vocabulary projection, usually tied to
the input embedding) is no task head: it trains only through the selection.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fps_graph.data.text import read_texts
from fps_graph.training.tasks.base import DataContext, Step, Task
from fps_graph.training.tasks.text import TextData, check_lengths, text_setup

__all__ = ["CausalLM"]


class CausalLM(Task):
    """Next-token prediction on text (Hugging Face AutoModelForCausalLM)."""

    name = "causal-lm"
    hf_class = "AutoModelForCausalLM"
    extra_metrics = ("ppl",)

    def __init__(self) -> None:
        self._record: dict[str, Any] = {}

    def read(self, path: str, ctx: DataContext, classes: list[str] | None = None) -> TextData:
        setup = text_setup(ctx)
        self._record = setup.record
        tok, cfg = setup.tokenizer, ctx.config
        if cfg.prompt_field:
            comp = cfg.completion_field or "completion"
            samples = read_texts(path, cfg.prompt_field, {comp: "--completion-field"})
            tail = np.asarray([tok.eos_id] if tok.eos_id is not None else [], dtype=np.int64)
            prompts = tok.encode([s.text for s in samples], special=True)
            comps = tok.encode([str(s.extra[comp]) for s in samples], special=False)
            ids = [np.concatenate([p, c, tail]) for p, c in zip(prompts, comps)]   # the completion ends with eos
            loss_from = [len(p) for p in prompts]
        else:
            samples = read_texts(path, cfg.text.text_field)
            toks = tok.tokenize([s.text for s in samples], setup.max_length, truncate=False,
                                where=[f"{s.file}:{s.line}" for s in samples])
            ids = [toks.sample(i) for i in range(len(toks))]
            loss_from = [0] * len(ids)
        check_lengths(ids, [f"{s.file}:{s.line}" for s in samples], setup.max_length, min_tokens=2)
        return TextData(ids, np.asarray(loss_from, dtype=np.int64), None, [], path, pad_id=_pad_id(ctx.model, tok))

    def record(self) -> dict[str, Any]:
        return dict(self._record)

    def step(self, model: torch.nn.Module, batch: dict[str, np.ndarray], device: str, label_smoothing: float) -> Step:
        ids = torch.from_numpy(batch["input_ids"]).to(device)
        am = torch.from_numpy(batch["attention_mask"]).to(device)
        logits = model(input_ids=ids, attention_mask=am).logits
        w = torch.from_numpy(batch["loss_mask"][:, 1:]).to(device)
        pred = logits[:, :-1][w]                        # only the positions whose next token is learnt
        target = ids[:, 1:][w]
        n = int(target.numel())
        loss = F.cross_entropy(pred.float(), target, reduction="sum", label_smoothing=label_smoothing) / max(n, 1)
        correct = float((pred.detach().argmax(-1) == target).sum())
        return Step(loss, float(n), correct, int(ids.shape[0]))

    def epoch_extras(self, n: float) -> dict[str, Any]:
        return {"tokens": int(n)}                       # tokens learnt (no padding, no prompt)


def _pad_id(model: torch.nn.Module, tok: Any) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else int(tok.pad_id)
