"""BN: prediction-time batch statistics (Schneider et al. 2020; "norm" in Tent's code).

Every BatchNorm layer normalizes with the mean and variance of the current test
batch instead of the source running statistics; nothing is learned. The running
buffers are removed (see `use_batch_statistics`), so the statistics never carry
over between batches, and the model stays in eval mode (dropout off).

Batch size 1: a BatchNorm2d layer then normalizes over the H x W positions of
the one image, which works for conv features; a BatchNorm1d layer (one value
per channel) cannot, and PyTorch raises a ValueError naming the input size.
"""
from __future__ import annotations

import dataclasses

from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.common import use_batch_statistics


@dataclasses.dataclass
class BNConfig(MethodConfig):
    """BN learns nothing: only the shared fields (episodic, channels_last, ...) apply."""


@register("bn")
class BatchNormAdapt(TTAMethod):
    Config = BNConfig

    def configure_model(self) -> None:
        self.model.eval()
        use_batch_statistics(self.model)
