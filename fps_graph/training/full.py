"""What trains in full beside an adapter's own values, and why: the rule every adapter (sparse deltas, LoRA, head
only) shares, so the run summary can say it the same way for each.

Reasons: ``head`` (the task head, as in GPS), ``bias`` (biases of the adapted layers), ``norm`` (normalisation
layers), ``embedding`` (position embeddings and class tokens), ``train-full`` (a user glob), ``all`` (full
fine-tuning).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

from torch import nn

from fps_graph.errors import OptionError
from fps_graph.training.heads import HeadInfo, get_module

__all__ = ["EMBEDDING_PATTERNS", "REASONS", "is_norm", "trained_in_full", "check_globs"]

EMBEDDING_PATTERNS = ("*pos_embed*", "*pos_embedding*", "*position_embedding*", "*position_embeddings*",
                      "*absolute_pos_embed*", "*cls_token*", "*class_token*", "*dist_token*", "*reg_token*",
                      "*register_tokens*", "*class_embedding*")
REASONS = ("head", "bias", "norm", "embedding", "train-full", "all")


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, GroupNorm, BatchNorm, RMSNorm, or a class named *Norm*)."""
    norm_types: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types += (nn.RMSNorm,)
    return isinstance(m, norm_types) or "Norm" in type(m).__name__


def check_globs(model: nn.Module, patterns: Sequence[str]) -> None:
    """Every --train-full glob must match a parameter name (the whole name)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise OptionError(f"--train-full {pat!r} matches no parameter of the model (a glob must match the "
                                "whole name, e.g. '*norm*')")


def trained_in_full(model: nn.Module, head: HeadInfo | None, layer_weights: Iterable[str], *, train_head: bool = True,
                    train_bias: bool = True, train_norms: bool = False, train_embeddings: bool = False,
                    train_full: Sequence[str] = ()) -> dict[str, str]:
    """{parameter name: reason} for the floating-point parameters that train in full, in the model's order.

    layer_weights: the weights an adapter adapts (the masked ones); their biases train with train_bias."""
    params = dict(model.named_parameters(remove_duplicate=False))
    full: dict[str, str] = {}
    if head is not None and train_head:
        for n, _ in get_module(model, head.name, "head").named_parameters(prefix=head.name):
            full[n] = "head"
    if train_bias:
        for key in layer_weights:
            prefix, _, attr = key.rpartition(".")
            bias = f"{prefix}.{attr.replace('weight', 'bias')}" if prefix else attr.replace("weight", "bias")
            if "weight" in attr and bias in params and params[bias] is not None:
                full.setdefault(bias, "bias")
    if train_norms:
        for mname, m in model.named_modules():
            if is_norm(m):
                for n, _ in m.named_parameters(prefix=mname, recurse=False):
                    full.setdefault(n, "norm")
    for n in params:
        if train_embeddings and any(fnmatch.fnmatchcase(n, p) for p in EMBEDDING_PATTERNS):
            full.setdefault(n, "embedding")
        if any(fnmatch.fnmatchcase(n, p) for p in train_full):
            full.setdefault(n, "train-full")
    order = {n: i for i, n in enumerate(params)}
    return {n: full[n] for n in sorted(full, key=order.__getitem__) if params[n].is_floating_point()}
