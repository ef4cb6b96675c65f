"""Input normalization as the first layer of every source model.

Models in metatta take images in [0, 1]; the per-channel mean/std the network
was trained with live in the model as buffers, so a checkpoint carries them and
no caller has to know them. The buffers are persistent (saved in the state
dict) and are never trainable, so TTA methods that adapt "all parameters" leave
them alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Fashion-MNIST training split, pixel values in [0, 1].
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_stats(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std to use when a model is built without explicit ones."""
    if in_channels == 1:
        return FMNIST_MEAN, FMNIST_STD
    if in_channels == 3:
        return CIFAR10_MEAN, CIFAR10_STD
    return (0.5,) * in_channels, (0.5,) * in_channels


class Normalize(nn.Module):
    """(x - mean) / std per channel, for x of shape (B, C, H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or len(mean_t) == 0:
            raise ValueError(f"Normalize: mean and std must be equally long non-empty lists, got {list(mean)} and {list(std)}")
        if not torch.all(std_t > 0):
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"Normalize: expected images (B, {self.num_channels}, H, W), got shape {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """`net(Normalize(x))` for networks built elsewhere (timm, torchvision).

    The wrapped network is `self.net`, so its own state dict (e.g. a downloaded
    weights file) loads into `model.net`.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
