"""TTAug: test-time augmentation as a baseline (the broadest public TTA codebase:
mariodoebler/test-time-adaptation, classification/methods/ttaug.py; AugMix views as
MEMO draws them, `metatta.methods.augmix`).

Nothing is learned. Each test image is predicted by the mean of the model's logits
over the image itself and `num_augmentations` (32) AugMix views of it, all in one
forward; BN layers normalize with (1 - bn_alpha) * source + bn_alpha * the
statistics of those views (their AlphaBatchNorm, BN.ALPHA 0.1; `bn_alpha: null`:
the source statistics alone). A network without BN layers is used as it is.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from metatta.methods.augmix import PREAUGMENTATIONS, augmix_views
from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.bn import mix_source_statistics
from metatta.methods.common import BN_TYPES, freeze_all


@dataclasses.dataclass
class TTAugConfig(MethodConfig):
    num_augmentations: int = 32  # their TEST.N_AUGMENTATIONS
    bn_alpha: float | None = 0.1  # their BN.ALPHA; None: the source BN statistics
    severity: float = 1.0  # AugMix operation severity (MEMO's augmix: 1)
    preaugmentation: str = "crop_flip"  # crop_flip (their CIFAR) | resized_crop_flip (ImageNet) | none

    def validate(self) -> None:
        super().validate()
        validate_views(self, "ttaug")


def validate_views(cfg: Any, where: str) -> None:
    """The view fields TTAug and MEMO share."""
    if cfg.num_augmentations < 1:
        raise ValueError(f"{where}: config.num_augmentations must be >= 1, got {cfg.num_augmentations}")
    if cfg.bn_alpha is not None and not 0.0 <= cfg.bn_alpha <= 1.0:
        raise ValueError(f"{where}: config.bn_alpha must be in [0, 1] or null, got {cfg.bn_alpha}")
    if not 0.0 < cfg.severity <= 10.0:
        raise ValueError(f"{where}: config.severity must be in (0, 10], got {cfg.severity}")
    if cfg.preaugmentation not in PREAUGMENTATIONS:
        raise ValueError(f"{where}: config.preaugmentation must be one of {PREAUGMENTATIONS}, "
                         f"got {cfg.preaugmentation!r}")


def mix_bn_statistics(model: nn.Module, alpha: float | None, where: str) -> None:
    """Alpha-BN (source and batch statistics mixed) on every BN layer, when there are any."""
    if alpha is not None and any(isinstance(m, BN_TYPES) for m in model.modules()):
        mix_source_statistics(model, "alpha", alpha, where=where)


@register("ttaug")
class TTAug(TTAMethod):
    Config = TTAugConfig

    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)
        mix_bn_statistics(self.model, self.config.bn_alpha, "ttaug")

    def views(self, image: torch.Tensor) -> torch.Tensor:
        """The image and its AugMix views, (1 + num_augmentations, C, H, W)."""
        cfg = self.config
        augmented = augmix_views(image, cfg.num_augmentations, cfg.severity, preaugmentation=cfg.preaugmentation)
        return self.in_layout(torch.cat([image.unsqueeze(0), augmented]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_layout(x)
        if not bool(torch.isfinite(x).all()):
            return self._nonfinite_input(x)
        return self.predict(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(self.views(image)).mean(0) for image in x])
