"""ResNets with BatchNorm for small images (28x28 Fashion-MNIST, 32x32 CIFAR).

The CIFAR variant of He et al. (2016): a 3x3 stride-1 stem without max-pool,
stages of post-activation BasicBlocks (conv-BN-ReLU-conv-BN, add, ReLU), the
first block of every later stage halving the resolution, a 1x1 conv + BN
projection shortcut where the shape changes, global average pooling and one
linear layer. Depth and width are free:

- `blocks=(1, 1, 1), widths=(16, 32, 64)` is a ResNet-8 (the Fashion-MNIST
  source model, sized to train in minutes on two CPU cores);
- `blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512)` is the usual CIFAR ResNet-18.

Every residual block's output is a feature tap (see `feature_stats`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metatta.models.normalize import Normalize, default_stats


def _to_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def keep_channels_last_in_backward(features: torch.Tensor) -> torch.Tensor:
    """`features` (NHWC) as is, with its gradient made NHWC too before it reaches the layer that
    produced it. The global average pool's backward hands back a contiguous (NCHW) gradient; the
    last ReLU's backward then mixes NCHW and NHWC operands and takes 17 ms instead of 0.5 ms
    (ResNet-8, batch 200, one thread), once per backward pass. The values are untouched (a copy
    into another layout), so gradients are bit-identical."""
    if features.requires_grad and features.dim() == 4 and not features.is_contiguous() \
            and features.is_contiguous(memory_format=torch.channels_last):
        features.register_hook(_to_channels_last)
    return features


class ShortcutConv(nn.Conv2d):
    """The 1x1 projection of a residual shortcut (bias-free, no padding).

    With 2-7 input channels, stride > 1 and NHWC inputs, oneDNN's strided 1x1 backward-data kernel
    on AVX2-only CPUs (torch 2.14.1) writes outside its buffers: "double free", a bus error or a
    hang inside `loss.backward()`. Such a projection runs as the stride-1 convolution of every
    stride-th pixel: the same outputs bit for bit, gradients equal to float rounding (summed in
    another order). Wider ones keep the strided kernel: the slice's backward took 1.4-4.7x as long
    at 16-32 input channels (batch 64, one thread) and about as long at 64."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels < 8 and self.stride != (1, 1):
            return F.conv2d(x[:, :, :: self.stride[0], :: self.stride[1]], self.weight)
        return super().forward(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(ShortcutConv(in_planes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 28/32-pixel inputs in [0, 1] (normalization inside)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        blocks: Sequence[int] = (1, 1, 1),
        widths: Sequence[int] = (16, 32, 64),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        blocks, widths = list(blocks), list(widths)
        if not blocks or len(blocks) != len(widths) or min(blocks) < 1 or min(widths) < 1:
            raise ValueError(f"ResNet: blocks {blocks} and widths {widths} must be equally long lists of positive integers")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"ResNet: num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        if mean is None or std is None:
            mean, std = default_stats(in_channels)
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, in_planes = [], widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(in_planes, width, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # every block starts as the identity (Goyal et al. 2017)
            for block in self.blocks():
                nn.init.zeros_(block.bn2.weight)

    def blocks(self) -> list[BasicBlock]:
        return [m for m in self.stages.modules() if isinstance(m, BasicBlock)]

    def feature_tap_modules(self) -> list[nn.Module]:
        """The output of every residual block."""
        return list(self.blocks())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(keep_channels_last_in_backward(self.forward_features(x))).flatten(1))
