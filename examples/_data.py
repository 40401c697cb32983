"""Real data shipped inside scikit-learn (no download): the 8x8 digits, standardised, as tensors."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset

FAST = os.environ.get("LANDSCAPE_FAST") == "1"


def digits_tensors(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/validation split (1500/297) of scikit-learn's digits, pixels standardised with training statistics."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype)
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    x_train, x_val = x[:1500], x[1500:]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    return (x_train - mean) / std, y[:1500], (x_val - mean) / std, y[1500:]


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)
