"""Wide ResNet (Zagoruyko & Komodakis 2016), the architecture of RobustBench's
CIFAR-10 "Standard" WRN-28-10 that most TTA papers start from.

Pre-activation BasicBlocks (BN-ReLU-conv, BN-ReLU-conv, add); where the shape
changes the block pre-activates its input once and feeds it to both the
branch and a 1x1 conv shortcut. Three groups of (depth - 4) / 6 blocks with
widths 16k, 32k, 64k (k = widen_factor), then BN-ReLU, global average pooling
and a linear classifier. Parameter names follow RobustBench's implementation
(conv1, block1.layer.0.bn1, ..., convShortcut, bn1, fc), so its checkpoints
load with `metatta.models.load_external_weights`; the one difference is
adaptive average pooling instead of a fixed 8x8 pool, so 28x28 inputs work too.

RobustBench's Standard model takes raw [0, 1] inputs, hence the default
normalization here is the identity (mean 0, std 1); pass mean/std to change it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from metatta.models.normalize import Normalize
from metatta.models.resnet import ShortcutConv, keep_channels_last_in_backward


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else ShortcutConv(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv2(self.drop(out))
        # Identity shortcut carries the raw input; the projection sees the pre-activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor` for 28/32-pixel inputs in [0, 1]."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 10,
        drop_rate: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet: widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean if mean is not None else (0.0,) * in_channels,
                                   std if std is not None else (1.0,) * in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def feature_tap_modules(self) -> list[nn.Module]:
        """The output of every residual block."""
        return [m for m in self.modules() if isinstance(m, WideBasicBlock)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.relu(self.bn1(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(keep_channels_last_in_backward(self.forward_features(x))).flatten(1))
