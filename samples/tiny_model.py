"""The bundled sample network: a tiny hybrid ViT (conv patch embedding, two transformer blocks, linear head).

Small enough to export, select and train in seconds on a CPU, yet it has every layer kind fps-graph handles:
a strided Conv, Linear layers on 3-D input (exported as transposed MatMul weights), and a Gemm head.
"""
import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyHybrid(nn.Module):
    """Conv stem -> tokens -> 2 blocks -> mean pool -> head."""

    def __init__(self, num_classes: int = 4, dim: int = 32, image: int = 32, patch: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList([Block(dim, 4, 2 * dim) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def tiny_hybrid(num_classes: int = 4) -> TinyHybrid:
    """Factory used by `fps-graph export samples/tiny_model.py:tiny_hybrid`; seeded, norms perturbed."""
    torch.manual_seed(0)
    model = TinyHybrid(num_classes)
    with torch.no_grad():
        for p in model.parameters():   # no bit-identical tensors, so exporters cannot merge them
            p.add_(0.02 * torch.randn_like(p))
    return model
