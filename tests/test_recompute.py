"""W + scatter(delta) is rebuilt in the backward pass instead of kept by autograd: same gradients bit for bit,
no materialised weight alive between forward and backward, in-place changes caught, checkpointing unaffected."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fps_graph.training.sparse import SparseDelta, attach  # noqa: E402


class Net(nn.Module):
    """Conv (4-D weight), Linear on 3-D input (the transposed weight is what linear saves), a tied embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(self.fc2(torch.relu(self.fc1(h))))


MASKS = {"emb.weight": np.arange(0, 160, 3), "conv.weight": np.arange(0, 768, 5), "fc1.weight": np.arange(0, 512, 2),
         "fc2.weight": np.arange(1, 512, 4)}


def _run(rebuild: bool, ckpt: bool = False, watch: list | None = None):
    torch.manual_seed(0)
    net = Net()
    h = attach(net, MASKS, head=None, train_bias=False)
    with torch.no_grad():
        for d in h.deltas.values():
            d.delta.normal_()
    if not rebuild:
        for d in h.deltas.values():
            d.rebuilder = None
    ids = torch.randint(0, 10, (3, 7))
    if ckpt:
        logits = torch.utils.checkpoint.checkpoint(net, ids, use_reentrant=False)
    else:
        logits = net(ids)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 10), ids.reshape(-1))
    alive = None
    if watch is not None:
        alive = [not torch.UntypedStorage._expired(r) for r in watch]
    loss.backward()
    return {k: d.delta.grad.clone() for k, d in h.deltas.items()}, float(loss.detach()), alive


def test_same_gradients_bit_for_bit():
    g0, l0, _ = _run(False)
    g1, l1, _ = _run(True)
    assert l0 == l1 and g0.keys() == g1.keys() == set(MASKS)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
        assert g0[k].abs().sum() > 0
    g2, l2, _ = _run(True, ckpt=True)          # under checkpointing (its own saved-tensor hooks) too
    assert l2 == l0 and all(torch.equal(g0[k], g2[k]) for k in g0)


def test_no_materialised_weight_is_kept_between_forward_and_backward(monkeypatch):
    refs: list = []
    orig = SparseDelta._materialise

    def recording(self, w):
        out = orig(self, w)
        refs.append(out.untyped_storage()._weak_ref())
        return out

    monkeypatch.setattr(SparseDelta, "_materialise", recording)
    _, _, kept = _run(False, watch=refs)
    assert sum(kept) >= 3              # autograd keeps W' of the conv and linears (their inputs need gradients)
    refs.clear()
    _, _, kept = _run(True, watch=refs)
    assert len(refs) >= 5 and not any(kept)


def test_in_place_change_between_forward_and_backward_is_an_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    h = attach(net, {"1.weight": np.arange(0, 64, 3)}, head=None)
    loss = net(torch.randn(2, 3, 8, requires_grad=True)).sum()     # the input needs W' in the backward
    with torch.no_grad():
        h.deltas["1.weight"].delta.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()
