"""DELTA's test-time batch renormalization (TBR; Zhao, Chen, Xia, ICLR 2023), the prior
small-batch method NanoAdapt compares with, as a plug-in for any BN-based method
(`metatta.methods.plugin`: BN, Tent, EATA, SAR, ...).

Every BN layer keeps moving averages mu_ema, var_ema of its input's statistics,
starting from the source statistics, and normalizes as batch renormalization
does at test time:

    x_hat = (x - mu_b) / sigma_b * r + d,  r = sg(sigma_b / sigma_ema),
    d = sg((mu_b - mu_ema) / sigma_ema),

whose value is (x - mu_ema) / sigma_ema while the gradient is that of plain batch
normalization (through mu_b, sigma_b; sg = stop-gradient). The moving averages
use the statistics before the batch (as batch renormalization) and then take it
in: mu_ema <- mu_ema + alpha (mu_b - mu_ema), likewise var_ema, alpha =
`tbr_momentum`, the share of the new batch (0.05 here: batch renormalization's
usual rate; we had no copy of the DELTA authors' code to read theirs from).

Not implemented: DELTA's second component, dynamic online re-weighting (DOT),
which weights each sample's loss by its predicted class's inverse frequency; it
needs per-sample losses, i.e. code in each base method.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from metatta.methods.base import register
from metatta.methods.plugin import BNPlugin, PluginConfig, PluginNorm, per_channel, channel_moments


@dataclasses.dataclass
class DELTAConfig(PluginConfig):
    tbr_momentum: float = 0.05  # alpha: ema <- ema + alpha * (batch - ema)


class TBRNorm(PluginNorm):
    stat_buffers = ("tbr_mean", "tbr_var")

    def setup_statistics(self, momentum: float = 0.05) -> None:
        mean, var = self.source_statistics()
        device = self.weight.device if self.weight is not None else mean.device
        self.register_buffer("tbr_mean", mean.to(device))
        self.register_buffer("tbr_var", var.to(device))
        self.tbr_momentum = momentum

    def plugin_forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_b, sq_b = channel_moments(self.real_rows(x))
        var_b = (sq_b - mean_b * mean_b).clamp_min(0.0)
        mean_ema, var_ema = self.prior()
        std_b = torch.sqrt(var_b + self.eps)
        std_ema = torch.sqrt(var_ema + self.eps)
        r = (std_b / std_ema).detach()
        d = ((mean_b - mean_ema) / std_ema).detach()
        alpha = self.tbr_momentum
        self.store(mean_ema + alpha * (mean_b - mean_ema), var_ema + alpha * (var_b - var_ema))
        scale = r / std_b
        if self.weight is not None:
            scale = scale * self.weight
        shift = d - mean_b * r / std_b
        if self.weight is not None:
            shift = shift * self.weight
        if self.bias is not None:
            shift = shift + self.bias
        return x * per_channel(scale, x) + per_channel(shift, x)


class TBRBatchNorm1d(TBRNorm, nn.BatchNorm1d):
    pass


class TBRBatchNorm2d(TBRNorm, nn.BatchNorm2d):
    pass


class TBRBatchNorm3d(TBRNorm, nn.BatchNorm3d):
    pass


TBR_CLASSES = {nn.BatchNorm1d: TBRBatchNorm1d, nn.BatchNorm2d: TBRBatchNorm2d, nn.BatchNorm3d: TBRBatchNorm3d}


@register("delta")
class DELTA(BNPlugin):
    Config = DELTAConfig
    layer_classes = TBR_CLASSES

    @classmethod
    def validate(cls, config: DELTAConfig) -> None:
        if not 0.0 <= config.tbr_momentum <= 1.0:
            raise ValueError(f"{cls.name}: config.tbr_momentum must be in [0, 1], got {config.tbr_momentum!r}")
        super().validate(config)

    def layer_options(self, config: DELTAConfig) -> dict[str, Any]:
        return {"momentum": config.tbr_momentum}
