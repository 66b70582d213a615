"""The optimiser over the trained values and its schedule: linear warm-up, then cosine decay to the minimum rate."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from fps_graph.training.config import OptimConfig, Optimizer

if TYPE_CHECKING:
    import torch

__all__ = ["SGD_MOMENTUM", "make_optimizer", "lr_factor", "clip_gradients"]

SGD_MOMENTUM = 0.9


def make_optimizer(params: Sequence["torch.nn.Parameter"], cfg: OptimConfig,
                   steps_per_epoch: int) -> tuple["torch.optim.Optimizer", "torch.optim.lr_scheduler.LRScheduler"]:
    """torch.optim's AdamW / Adam / SGD (momentum 0.9) over ``params`` with the warm-up + cosine schedule."""
    import torch

    if cfg.optimizer is Optimizer.ADAMW:
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer is Optimizer.ADAM:
        optim = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optim = torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay)
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    min_ratio = cfg.min_lr / cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, warmup, total, min_ratio))
    return optim, sched


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def clip_gradients(params: Sequence[Any], max_norm: float | None) -> float | None:
    """Scale the gradients of params so that their global norm is at most max_norm (torch's clip_grad_norm_);
    returns the norm before clipping, or None when not clipping."""
    if max_norm is None:
        return None
    import torch

    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
