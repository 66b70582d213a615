"""Keep ``W + scatter(delta)`` out of autograd's saved tensors: rebuild it in the backward pass instead.

A layer whose weight carries a sparse delta computes ``W' = W + scatter(delta)`` in every forward. Its op (``linear``,
``conv``) saves ``W'`` for the backward pass (the input's gradient needs it), so without care every masked weight
exists twice until its backward: on a 290M decoder that is ~1 GB that neither LoRA nor plain inference holds
(bench/train_memory.py). ``W'`` is cheap to rebuild from what is alive anyway (the frozen ``W``, the indices and
the delta), so while an owner module runs its forward, a ``saved_tensors_hooks`` pair replaces any saved tensor
that is ``W'`` (or a view of it, e.g. the transpose ``linear`` saves) with a recipe, and unpacking rebuilds it,
bit for bit. Nothing changes where other saved-tensor hooks are active (gradient checkpointing already recomputes
the whole layer), and a delta changed in place between forward and backward is an error, as autograd's own
version check would make it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class _Recipe:
    """How to rebuild a saved tensor: the parametrization, its input weight, and the view that was saved."""

    rebuild: Callable[[], torch.Tensor]
    version: int
    delta: torch.Tensor
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class Rebuilder:
    """Per-module forward hooks that pack W + scatter(delta) as a recipe while the module runs."""

    def __init__(self) -> None:
        self.made: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor], torch.Tensor]] = {}
        self.depth = 0
        self.ctx: list[Any] = []

    def note(self, out: torch.Tensor, rebuild: Callable[[], torch.Tensor], delta: torch.Tensor) -> None:
        """Called by the parametrization: `out` can be rebuilt by `rebuild()` while `delta` is unchanged."""
        if self.depth and out.requires_grad:
            self.made[out.untyped_storage().data_ptr()] = (weakref.ref(out), rebuild, delta)

    def _pack(self, t: torch.Tensor) -> Any:
        if not self.made or t.layout != torch.strided:
            return t
        rec = self.made.get(t.untyped_storage().data_ptr())
        if rec is None or rec[0]() is None:
            return t
        _, rebuild, delta = rec
        return _Recipe(rebuild, delta._version, delta, tuple(t.size()), tuple(t.stride()), t.storage_offset())

    @staticmethod
    def _unpack(v: Any) -> torch.Tensor:
        if not isinstance(v, _Recipe):
            return v
        if v.delta._version != v.version:
            raise RuntimeError("a sparse delta was modified in place between the forward and the backward pass")
        with torch.no_grad():
            return v.rebuild().as_strided(v.size, v.stride, v.offset)

    def pre(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: start packing (only when gradients flow and no other saved-tensor hooks are active)."""
        active = torch.is_grad_enabled() and torch._C._autograd._saved_tensors_hooks_is_enabled() and \
            torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        self.ctx.append(None)
        if active:
            ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            ctx.__enter__()
            self.ctx[-1] = ctx
            self.depth += 1

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook (always called): stop packing, forget this forward's tensors."""
        ctx = self.ctx.pop() if self.ctx else None
        if ctx is not None:
            ctx.__exit__(None, None, None)
            self.depth -= 1
        if not self.depth:
            self.made.clear()


def install(owners: list[nn.Module]) -> tuple[Rebuilder, list[Any]]:
    """A Rebuilder hooked on every owner module of a sparse delta; returns it and the hook handles."""
    rb = Rebuilder()
    handles = []
    for m in owners:
        handles.append(m.register_forward_pre_hook(rb.pre))
        handles.append(m.register_forward_hook(rb.post, always_call=True))
    return rb, handles
