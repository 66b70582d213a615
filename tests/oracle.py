"""Independent references: FPS statistics from PyTorch forward hooks (F.unfold for convs) and plain rankings."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def hook_stats(model: nn.Module, data: np.ndarray, batch_size: int = 8) -> tuple[dict, list[str]]:
    """{module name: (abs sums float64, sq sums float64, count)} over the data, and the modules' call order."""
    names = {m: n for n, m in model.named_modules()}
    acc: dict[str, list] = {}
    order: list[str] = []

    def hook(mod, inputs):
        x = inputs[0].detach().double()
        name = names[mod]
        if name not in order:
            order.append(name)
        if isinstance(mod, nn.Conv2d):
            pad = mod.padding if isinstance(mod.padding, tuple) else (mod.padding,) * 2
            cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)
            a = cols.abs().sum((0, 2)).reshape(mod.in_channels, *mod.kernel_size)
            s = cols.square().sum((0, 2)).reshape(mod.in_channels, *mod.kernel_size)
            cnt = cols.shape[0] * cols.shape[2]
        else:
            flat = x.reshape(-1, x.shape[-1])
            a, s, cnt = flat.abs().sum(0), flat.square().sum(0), flat.shape[0]
        prev = acc.get(name)
        if prev is None:
            acc[name] = [a.numpy(), s.numpy(), cnt]
        else:
            prev[0] = prev[0] + a.numpy()
            prev[1] = prev[1] + s.numpy()
            prev[2] += cnt

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                model(torch.from_numpy(data[i:i + batch_size]))
    finally:
        for h in handles:
            h.remove()
    return {k: tuple(v) for k, v in acc.items()}, order


def torch_scores(model: nn.Module, stats: dict, score: str) -> dict[str, np.ndarray]:
    """{weight name: [out, fan_in] float64 scores} computed on PyTorch weights."""
    out = {}
    for name, mod in model.named_modules():
        if name not in stats:
            continue
        w = mod.weight.detach().double().numpy()
        a, s, cnt = stats[name]
        stat = a / cnt if score == "fps" else np.sqrt(s / cnt)
        if isinstance(mod, nn.Conv2d):
            g = mod.groups
            rows = stat.reshape(g, -1)                          # [groups, C/g * kh * kw]
            stat2 = np.repeat(rows, mod.out_channels // g, axis=0)
            w2 = w.reshape(w.shape[0], -1)
        else:
            stat2 = stat[None, :]
            w2 = w
        out[f"{name}.weight"] = np.abs(w2) if score == "magnitude" else np.abs(w2) * stat2
    return out


def topk_oracle(score: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k best per row; ties to the lower column (plain Python sort)."""
    mask = np.zeros(score.shape, dtype=bool)
    for r in range(score.shape[0]):
        cols = sorted(range(score.shape[1]), key=lambda c: (-score[r, c], c))[:k]
        mask[r, cols] = True
    return mask


def network_oracle(scores: dict[str, np.ndarray], order: list[str], n: int) -> dict[str, np.ndarray]:
    """Bool masks of the n best scores over all weights (ties: earlier weight, then lower position)."""
    items = []
    for li, name in enumerate(order):
        flat = scores[name].reshape(-1)
        items.extend((-flat[j], li, j) for j in range(flat.size))
    items.sort()
    masks = {name: np.zeros(scores[name].size, dtype=bool) for name in order}
    for _, li, j in items[:n]:
        masks[order[li]][j] = True
    return {k: v.reshape(scores[k].shape) for k, v in masks.items()}
