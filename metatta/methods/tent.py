"""Tent: test entropy minimization (Wang et al., ICLR 2021; code: DequanWang/tent).

Loss: mean softmax entropy of the batch predictions. Adapted: the affine weight
and bias of the normalization layers (BN for BN networks; LayerNorm/GroupNorm
where a network has them, as SAR's Tent does for ViTs), everything else frozen;
BN normalizes with the batch statistics. The authors' code runs the model in
train mode; here it is in eval mode with the BN running buffers removed, which
is the same computation without dropout.

Defaults are the authors' CIFAR-10-C settings (cfgs/tent.yaml, conf.py): Adam,
lr 1e-3, betas (0.9, 0.999), no weight decay, 1 step per batch, not episodic
(batch size 200 there). Their ImageNet setting is SGD lr 2.5e-4, momentum 0.9,
batch 64.
"""
from __future__ import annotations

import dataclasses

import torch

from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.common import adaptable_norm_params, configure_norm_adaptation, softmax_entropy


@dataclasses.dataclass
class TentConfig(MethodConfig):
    """The authors' CIFAR-10-C settings (DequanWang/tent cfgs/tent.yaml + conf.py). ImageNet-C
    (paper; EATA's and SAR's code for Tent): sgd, lr 0.00025, momentum 0.9, batch 64."""

    optimizer: str = "adam"  # OPTIM.METHOD
    lr: float = 1e-3  # OPTIM.LR
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch (TEST.BATCH_SIZE)
    betas: tuple[float, float] = (0.9, 0.999)  # OPTIM.BETA 0.9; Adam's beta2 default
    weight_decay: float = 0.0  # OPTIM.WD


@register("tent")
class Tent(TTAMethod):
    Config = TentConfig

    def configure_model(self) -> None:
        configure_norm_adaptation(self.model)

    def collect_params(self) -> list:
        return adaptable_norm_params(self.model, self.name)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return softmax_entropy(logits).mean(0)
