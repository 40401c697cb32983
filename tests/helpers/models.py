"""Tiny models and data shared by the tests (float64 where exactness is checked)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def tiny_mlp(dropout: float = 0.0, batchnorm: bool = True, dtype: torch.dtype = torch.float64) -> nn.Module:
    """4 -> 6 -> 3 MLP with BatchNorm and dropout: 71 parameters, small enough for a dense Hessian."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3)]
    return nn.Sequential(*layers).to(dtype)


class TinyCNN(nn.Module):
    """Conv(1->3, 3x3) + BatchNorm2d + Tanh + pooling + Linear(3*2*2 -> 3): 1*3*9+3+6+12*3+3 = 75 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn(self.conv(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def tiny_cnn(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().to(dtype)


def classification_batches(
    num_batches: int,
    batch_size: int,
    shape: tuple[int, ...] = (4,),
    classes: int = 3,
    ragged: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 1,
) -> list[tuple[Tensor, Tensor]]:
    """Random inputs and labels; the last batch is smaller when ``ragged`` (to exercise the size weights)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(num_batches):
        n = batch_size - 3 if ragged and i == num_batches - 1 and batch_size > 4 else batch_size
        batches.append((torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)))
    return batches


def cross_entropy_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def make_batchnorm_statistics_nontrivial(module: nn.Module) -> None:
    """Give BatchNorm layers non-default running statistics and affine weights so eval mode differs from train."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
