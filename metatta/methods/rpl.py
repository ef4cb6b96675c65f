"""RPL: robust pseudo-labeling (Rusak, Schneider et al., "If your data distribution shifts,
use self-learning", TMLR 2022, arXiv 2104.12928; code: bethgelab/robustness, and the
implementation of the broadest public TTA codebase, mariodoebler/test-time-adaptation
classification/methods/rpl.py, which follows oripress/CCC models/rpl.py).

Self-learning with hard pseudo-labels and a loss robust to their noise: per test
batch the model's own argmax is the label y and the loss is the generalized
cross-entropy (Zhang & Sabuncu, 2018) mean_i (1 - p_i,y^q) / q, q = 0.8, one
optimizer step; the teacher is the model itself at every batch (the paper's short
update time). Adapted: the affine weight and bias of every normalization layer,
everything else frozen; BN normalizes with the batch statistics (eval mode without
running buffers, as Tent here).

Defaults: q 0.8 (paper and their RPL.Q) and the broadest codebase's CIFAR-10-C /
CIFAR-100-C setting (cfgs/cifar10_c/rpl.yaml): Adam lr 1e-3, batch 200; its
ImageNet-C setting (SGD lr 5e-4, momentum 0.9, batch 64) is
configs/methods/rpl_imagenet.yaml.
"""
from __future__ import annotations

import dataclasses

import torch

from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.common import adaptable_norm_params, configure_norm_adaptation


@dataclasses.dataclass
class RPLConfig(MethodConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    q: float = 0.8  # GCE exponent: q -> 0 is cross-entropy, q = 1 the MAE

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"rpl: config.q must be in (0, 1], got {self.q}")


def generalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, q: float) -> torch.Tensor:
    """Per-sample (1 - p_target^q) / q."""
    p = logits.softmax(1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return (1.0 - p ** q) / q


@register("rpl")
class RPL(TTAMethod):
    Config = RPLConfig

    def configure_model(self) -> None:
        configure_norm_adaptation(self.model)

    def collect_params(self) -> list:
        return adaptable_norm_params(self.model, self.name)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return generalized_cross_entropy(logits, logits.detach().argmax(1), self.config.q).mean(0)
