"""The task head of a model: finding it, replacing it for another number of classes (seeded), and reading logits.

A classifier head is a module that trains in full by default (as in GPS); which module it is depends on the model
(the last ``nn.Linear`` with the model's output size for plain PyTorch models, the ``nn.Linear`` with
``config.num_labels`` outputs for transformers models) and on the task (a causal LM's vocabulary projection is no
task head). ``HeadInfo`` records what was found and done, and travels into the delta file so ``load_delta``
rebuilds the same head.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from fps_graph.errors import ModelError, OptionError

__all__ = ["HeadInfo", "find_head", "replace_head", "setup_head", "logits_of", "get_module", "is_transformers",
           "transformers_head", "num_labels_head"]


@dataclass
class HeadInfo:
    """The classifier head: its module name, and whether (and from which size) it was replaced.

    ``old_classes`` is None for a head that was not in the checkpoint at all (a new, seeded module)."""

    name: str
    replaced: bool = False
    old_classes: int | None = None
    num_classes: int | None = None
    in_features: int | None = None
    bias: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "replaced": self.replaced, "old_classes": self.old_classes,
                "num_classes": self.num_classes, "in_features": self.in_features, "bias": self.bias}

    @classmethod
    def from_json(cls, rec: Mapping[str, Any]) -> "HeadInfo":
        return cls(rec["name"], bool(rec.get("replaced")), rec.get("old_classes"), rec.get("num_classes"),
                   rec.get("in_features"), bool(rec.get("bias", True)))


def get_module(model: nn.Module, name: str, what: str) -> nn.Module:
    """model.get_submodule(name), or an error naming `what` and the nearest module names."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        mods = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, mods, n=3)
        raise OptionError(f"{what} {name!r} is no module of the model"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")) from exc


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, the first of a tuple, or 'logits' of a dict/object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"cannot find logits in a model output of type {type(out).__name__}")


def find_head(model: nn.Module, example_input: Any = None) -> str | None:
    """The last nn.Linear whose out_features equals the model's output size (with an example input), else the
    last nn.Linear; None when there is none."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    if example_input is None:
        return linears[-1][0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
    n_out = int(logits_of(out).shape[-1])
    cands = [n for n, m in linears if m.out_features == n_out]
    return cands[-1] if cands else None


def is_transformers(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (duck-typed: no transformers import needed)."""
    return hasattr(model, "config") and hasattr(model, "get_output_embeddings") and hasattr(model, "save_pretrained")


def num_labels_head(model: nn.Module) -> str | None:
    """The last nn.Linear with config.num_labels outputs (score, classifier, classifier.out_proj), or None."""
    n = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    cands = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n]
    return cands[-1] if cands else None


def transformers_head(model: nn.Module) -> str | None:
    """The task head of a transformers model: none when it has an LM head (output embeddings: the vocabulary
    projection, usually tied to the input embedding), else the classification head (num_labels_head)."""
    if model.get_output_embeddings() is not None:
        return None
    return num_labels_head(model)


def replace_head(model: nn.Module, name: str, num_classes: int, seed: int = 0) -> HeadInfo:
    """Swap the Linear module `name` for a fresh one with num_classes outputs (seeded PyTorch default init)."""
    old = get_module(model, name, "head")
    if not isinstance(old, nn.Linear):
        raise ModelError(f"head {name!r} is a {type(old).__name__}; only an nn.Linear head can be replaced")
    if num_classes < 1:
        raise OptionError(f"--num-classes must be at least 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return HeadInfo(name, True, old.out_features, num_classes, old.in_features, old.bias is not None)


def setup_head(model: nn.Module, name: str | None, num_classes: int | None = None, *, seed: int = 0,
               train_head: bool = True, fresh: bool = False) -> HeadInfo | None:
    """The head as training will use it: replaced by a fresh seeded Linear when num_classes differs from its size,
    or when it is new (``fresh``: not in the checkpoint, so its start values are random); else described as is.

    Returns None without a head (``name`` None)."""
    if name is None:
        if num_classes is not None:
            raise OptionError("--num-classes needs a head to replace; name it with --head")
        return None
    hm = get_module(model, name, "head")
    out_f = getattr(hm, "out_features", None)
    if (num_classes is not None and num_classes != out_f) or fresh:
        if not train_head:
            raise OptionError(f"a new head ({num_classes or out_f} classes) must be trained; drop --no-train-head")
        info = replace_head(model, name, int(num_classes or out_f), seed)
        if fresh:
            info.old_classes = None        # nothing in the checkpoint to start from
        return info
    return HeadInfo(name, False, out_f, out_f, getattr(hm, "in_features", None), getattr(hm, "bias", None) is not None)
