"""DELTA's test-time batch renormalization (TBR; Zhao, Chen, Xia, ICLR 2023), the prior
small-batch method NanoAdapt compares with, as a plug-in for any BN-based method
(`metatta.methods.plugin`: BN, Tent, EATA, SAR, ...).

Every BN layer keeps moving averages mu_ema, sigma_ema of its input's mean and
standard deviation and normalizes as batch renormalization does at test time:

    x_hat = (x - mu_b) / sigma_b * r + d,  r = sg(sigma_b / sigma_ema),
    d = sg((mu_b - mu_ema) / sigma_ema),

whose value is (x - mu_ema) / sigma_ema while the gradient is that of plain batch
normalization (through mu_b, sigma_b; sg = stop-gradient). The moving averages
use the statistics before the batch (as batch renormalization) and then take it
in: mu_ema <- mu_ema + alpha (mu_b - mu_ema), likewise sigma_ema, alpha =
`tbr_momentum`, the share of the new batch.

As in the authors' code (bwbwzhao/DELTA, `TBR`): the averages start from the
first test batch's statistics (`tbr_init: first_batch`; its commented-out
alternative, the source statistics, is `tbr_init: source`), the average is of the
standard deviation, not the variance, and alpha is 1 - their `old_prior` 0.95.

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
    tbr_init: str = "first_batch"  # where the averages start: first_batch (authors' code) | source

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.tbr_momentum <= 1.0:
            self.refuse("tbr_momentum", "in [0, 1]")
        if self.tbr_init not in TBR_INITS:
            self.refuse("tbr_init", f"one of {', '.join(TBR_INITS)}")


TBR_INITS = ("first_batch", "source")


class TBRNorm(PluginNorm):
    # tbr_started: 0 until the averages hold statistics (first_batch), a buffer so that
    # reset and rollback restore it with the averages.
    stat_buffers = ("tbr_mean", "tbr_std", "tbr_started")

    def setup_statistics(self, momentum: float = 0.05, init: str = "first_batch") -> None:
        mean, var = self.source_statistics()
        device = self.weight.device if self.weight is not None else mean.device
        self.register_buffer("tbr_mean", mean.to(device))
        self.register_buffer("tbr_std", torch.sqrt(var + self.eps).to(device))
        self.register_buffer("tbr_started", torch.tensor(float(init == "source"), device=device))
        self.tbr_momentum = momentum

    def plugin_forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_b, sq_b = channel_moments(self.real_rows(x))
        var_b = (sq_b - mean_b * mean_b).clamp_min(0.0)
        std_b = torch.sqrt(var_b + self.eps)
        mean_ema, std_ema, started = self.prior()
        # Before the first batch the averages are that batch's own statistics (first_batch);
        # torch.where keeps the choice on the device (no host sync per layer and batch).
        mean_ema = torch.where(started > 0, mean_ema, mean_b.detach())
        std_ema = torch.where(started > 0, std_ema, std_b.detach())
        r = (std_b / std_ema).detach()
        d = ((mean_b - mean_ema) / std_ema).detach()
        alpha = self.tbr_momentum
        self.store(mean_ema + alpha * (mean_b.detach() - mean_ema), std_ema + alpha * (std_b.detach() - std_ema),
                   torch.ones_like(started))
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

    def layer_options(self, config: DELTAConfig) -> dict[str, Any]:
        return {"momentum": config.tbr_momentum, "init": config.tbr_init}
