"""fps_graph.training.sparse: sparse deltas on frozen weights, what trains in full, merge/unmerge, delta files, errors."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from conftest_train import conv_data, conv_net, token_data, token_net  # noqa: E402

from fps_graph import FpsGraphError  # noqa: E402
from fps_graph.training.sparse import SparseDelta, attach, find_head, load_delta  # noqa: E402


def random_masks(model: nn.Module, keys: list[str], k: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """k random input connections per output row of each key (bool masks)."""
    rng = np.random.default_rng(seed)
    sd = dict(model.named_parameters())
    out = {}
    for key in keys:
        shape = tuple(sd[key].shape)
        m = np.zeros((shape[0], int(np.prod(shape[1:]))), dtype=bool)
        for r in range(shape[0]):
            m[r, rng.choice(m.shape[1], size=k, replace=False)] = True
        out[key] = m.reshape(shape)
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Effective values of every state_dict entry (names as the model has them)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(model: nn.Module, handle, x: torch.Tensor, y: torch.Tensor, steps: int = 6) -> torch.optim.Optimizer:
    """AdamW with weight decay and gradient clipping: the things that leak through gradient masking."""
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.5)
    handle.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(handle.trainable_parameters(), 0.1)
        opt.step()
    model.eval()
    return opt


def test_only_selected_entries_change_and_frozen_stay_bit_identical():
    model = token_net()
    keys = ["embed.weight", "fc1.weight", "fc2.weight"]
    masks = random_masks(model, keys, k=2)
    before = snapshot(model)
    handle = attach(model, masks)
    assert handle.head is not None and handle.head.name == "head" and not handle.head.replaced
    # the GPS default: biases of the masked layers and the head in full; norms, pos_embed, cls_token frozen
    assert sorted(handle.full) == ["embed.bias", "fc1.bias", "fc2.bias", "head.bias", "head.weight"]
    assert sorted(handle.deltas) == keys
    assert all(d.delta.dtype == torch.float32 and d.delta.dim() == 1 for d in handle.deltas.values())
    assert all(isinstance(d, SparseDelta) for d in handle.deltas.values())
    requiring = {id(p) for p in model.parameters() if p.requires_grad}
    assert requiring == {id(p) for p in handle.trainable_parameters()}

    x_np, y_np = token_data(32, seed=3)
    opt = train_steps(model, handle, torch.from_numpy(x_np), torch.from_numpy(y_np))
    assert {id(p) for p in opt.state} == {id(p) for p in handle.trainable_parameters()}

    after = snapshot(model)
    assert list(after) == list(before)       # state_dict names (and order) intact while attached
    for name, old in before.items():
        new = after[name]
        if name in masks:
            changed = (new != old).numpy()
            assert not changed[~masks[name]].any(), f"{name}: an unselected entry changed"
            assert changed[masks[name]].all(), f"{name}: a selected entry did not train"
        elif name in handle.full:
            assert not torch.equal(new, old), name
        else:
            assert torch.equal(new, old), f"{name} is frozen but changed"

    selected = sum(int(m.sum()) for m in masks.values())
    full = sum(p.numel() for p in handle.full.values())
    counts = handle.counts()
    assert counts["selected"] == selected == 2 * (16 + 32 + 16)
    assert counts["trainable"] == selected + full == sum(p.numel() for p in handle.trainable_parameters())
    assert counts["full_finetune"] == sum(p.numel() for p in token_net().parameters())


def test_merge_unmerge_roundtrip_and_detach():
    model = token_net()
    handle = attach(model, random_masks(model, ["embed.weight", "fc1.weight"], seed=1))
    x_np, y_np = token_data(16, seed=4)
    x = torch.from_numpy(x_np)
    train_steps(model, handle, x, torch.from_numpy(y_np), steps=3)
    with torch.no_grad():
        y_attached = model(x)
        raw = {k: handle._originals[k].detach().clone() for k in handle.deltas}
        handle.merge()
        assert all(not torch.equal(handle._originals[k], raw[k]) for k in raw)
        assert torch.equal(model(x), y_attached)         # merged weight == W + scatter(delta), bit for bit
        merged_sd = snapshot(model)
        handle.unmerge()
        assert all(torch.equal(handle._originals[k], raw[k]) for k in raw)
        assert torch.equal(model(x), y_attached)
        handle.merge()
        handle.unmerge()
        assert all(torch.equal(handle._originals[k], raw[k]) for k in raw)
    with pytest.raises(FpsGraphError, match="embed.weight carries a sparse delta already"):
        attach(model, {"embed.weight": np.array([0])})
    plain = handle.detach(merge=True)
    assert not any("parametrizations" in k for k in plain.state_dict())
    assert all(p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        assert torch.equal(plain(x), y_attached)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in merged_sd.items())


def test_detach_without_merge_restores_the_base_model():
    model = token_net()
    base = snapshot(model)
    handle = attach(model, random_masks(model, ["fc2.weight"]), head=None, train_bias=False)
    with torch.no_grad():
        handle.deltas["fc2.weight"].delta.add_(1.0)
    handle.detach(merge=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def test_delta_file_loads_into_fresh_model(tmp_path):
    model = token_net()
    handle = attach(model, random_masks(model, ["embed.weight", "fc1.weight", "fc2.weight"], seed=2),
                    train_embeddings=True, train_norms=True)
    assert {"pos_embed", "cls_token", "norm.weight", "norm1.bias"} <= set(handle.full)
    x_np, y_np = token_data(16, seed=5)
    x = torch.from_numpy(x_np)
    train_steps(model, handle, x, torch.from_numpy(y_np), steps=3)
    handle.save(tmp_path / "delta.safetensors", {"note": "test"})
    with torch.no_grad():
        want = model(x)
        fresh = token_net()
        h2 = load_delta(fresh, tmp_path / "delta.safetensors")
        assert torch.equal(fresh(x), want)
        assert sorted(h2.full) == sorted(handle.full) and sorted(h2.deltas) == sorted(handle.deltas)
        # the effective state dict (original names) loads into a plain model, and back into an attached one
        plain = token_net()
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain(x), want)
        other = token_net()
        h3 = attach(other, random_masks(other, ["fc1.weight"], seed=9))
        other.load_state_dict(model.state_dict())
        assert torch.equal(other(x), want)
        assert float(h3.deltas["fc1.weight"].delta.abs().sum()) == 0.0
    # a delta checks the base model it lands on
    wrong = token_net()
    with torch.no_grad():
        wrong.fc1.weight.add_(1.0)
    with pytest.raises(FpsGraphError, match="fc1.weight .*values training started from"):
        load_delta(wrong, tmp_path / "delta.safetensors")


def test_mask_errors_name_key_and_shapes(tmp_path):
    model = token_net()
    with pytest.raises(FpsGraphError, match=r"'fc9.weight' .*names no parameter.*did you mean .*fc1.weight"):
        attach(model, {"fc9.weight": np.array([0, 1])})
    bad = np.zeros((4, 16), dtype=bool)
    bad[0, 0] = True
    with pytest.raises(FpsGraphError, match=r"'fc1.weight'.*expected shape \[32, 16\].*found \[4, 16\]"):
        attach(token_net(), {"fc1.weight": bad})
    with pytest.raises(FpsGraphError, match="ONNX initializer name"):
        attach(token_net(), {"onnx::MatMul_12": np.array([0])})
    with pytest.raises(FpsGraphError, match="index 512 is outside"):
        attach(token_net(), {"fc1.weight": np.array([1, 512])})
    # a masks file whose recorded shape does not fit
    from fps_graph.formats.io import atomic_output
    from fps_graph.formats.masks import write_masks

    path = tmp_path / "m.safetensors"
    with atomic_output(path) as tmp:
        write_masks(tmp, {"fc2.weight": np.array([0, 5])}, {"fc2.weight": {"shape": [16, 8]}}, {})
    with pytest.raises(FpsGraphError, match=r"'fc2.weight' \(.*m.safetensors\).*expected shape \[16, 32\].*found "
                                            r"\[16, 8\]"):
        attach(token_net(), path)
    # dense (bool) masks files work like index files
    dense = tmp_path / "dense.safetensors"
    keep = np.zeros((32, 16), dtype=bool)
    keep[:, 3] = True
    with atomic_output(dense) as tmp:
        write_masks(tmp, {"fc1.weight": np.flatnonzero(keep)}, {"fc1.weight": {"shape": [32, 16]}}, {}, dense=True)
    h = attach(token_net(), dense)
    assert torch.equal(h.deltas["fc1.weight"].index, torch.from_numpy(np.flatnonzero(keep)))
    # nothing was left half-attached by a failed call
    fresh = token_net()
    with pytest.raises(FpsGraphError):
        attach(fresh, {"fc1.weight": bad})
    assert not any("parametrizations" in k for k, _ in fresh.named_parameters())


def test_head_detection_and_replacement():
    model = token_net()
    x = torch.from_numpy(token_data(2)[0])
    assert find_head(model, x) == "head"
    masks = random_masks(model, ["fc1.weight", "head.weight"], seed=3)
    h1 = attach(model, masks, num_classes=7, example_input=x, seed=5)
    assert h1.head.replaced and h1.head.old_classes == 4 and h1.head.num_classes == 7
    assert model.head.weight.shape == (7, 16) and model(x).shape == (2, 7)
    assert h1.superseded == ["head.weight"] and "head.weight" in h1.full and "head.weight" not in h1.deltas
    other = token_net()
    attach(other, masks, num_classes=7, example_input=x, seed=5)
    assert torch.equal(other.head.weight, model.head.weight)       # seeded
    third = token_net()
    attach(third, masks, num_classes=7, example_input=x, seed=6)
    assert not torch.equal(third.head.weight, model.head.weight)
    with pytest.raises(FpsGraphError, match="new head .* must be trained"):
        attach(token_net(), {"fc1.weight": masks["fc1.weight"]}, num_classes=7, train_head=False)
    with pytest.raises(FpsGraphError, match="head 'classifier' is no module"):
        attach(token_net(), {"fc1.weight": masks["fc1.weight"]}, head="classifier")
    # without training the head in full, its mask trains sparsely (and its bias, as a masked layer's, in full)
    h4 = attach(token_net(), masks, train_head=False)
    assert "head.weight" in h4.deltas and h4.full_reason["head.bias"] == "bias"


def test_frozen_batchnorm_keeps_running_stats_and_conv_masks():
    model = conv_net()
    masks = random_masks(model, ["conv1.weight", "conv2.weight"], k=3, seed=4)
    before = snapshot(model)
    handle = attach(model, masks)
    assert "bn.weight" not in handle.full and "conv1.bias" in handle.full
    x_np, y_np = conv_data(16)
    train_steps(model, handle, torch.from_numpy(x_np), torch.from_numpy(y_np), steps=3)
    after = snapshot(model)
    for k in ("bn.running_mean", "bn.running_var", "bn.weight", "bn.bias"):
        assert torch.equal(after[k], before[k]), k
    for k, m in masks.items():
        changed = (after[k] != before[k]).numpy()
        assert not changed[~m].any() and changed[m].all()


class Tied(nn.Module):
    """Embedding and output projection sharing one weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


def test_tied_weights_share_one_delta():
    torch.manual_seed(0)
    model = Tied()
    ids = torch.randint(0, 12, (4, 5))
    m = np.zeros((12, 8), dtype=bool)
    m[:, 0] = True
    handle = attach(model, {"emb.weight": m}, head=None)
    assert len(handle.deltas) == 1 and len(handle._owners["emb.weight"]) == 2
    with torch.no_grad():
        handle.deltas["emb.weight"].delta.fill_(0.5)
        y = model(ids)
        assert torch.equal(model.emb.weight, model.out.weight)
        handle.merge()
        assert torch.equal(model(ids), y)
        handle.unmerge()
    plain = handle.detach(merge=True)
    assert plain.out.weight is plain.emb.weight
    with torch.no_grad():
        assert torch.equal(plain(ids), y)
