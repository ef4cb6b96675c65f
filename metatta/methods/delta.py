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

As in the authors' code (bwbwzhao/DELTA, `TBR`): the average is of the standard
deviation, not the variance, and alpha is 1 - their `old_prior` 0.95. Where the
averages start (`tbr_init`):

- `cumulative` (default): from the test batches, each image weighing the same
  until the moving average takes over: a batch of n images enters with the share
  max(alpha, n / (images so far + n)), and while that share exceeds alpha the
  batch is normalized by the averages including it. The first batch is thus
  normalized by its own statistics, as in the authors' code, but it does not stay
  the reference: a one-image first batch in a stream of 64-image batches weighs
  1/65 at the second batch, not 0.95.
- `first_batch`: the authors' code: the averages are the first batch's statistics,
  then the moving average (a first batch of one image, or of zeros, stays in them
  for the rest of a short stream: +9 and +56 points in a probe, issue #24).
- `source`: the source model's statistics, then the moving average (the authors'
  commented-out alternative).

Whatever `tbr_init`, a batch of constant images (all zeros, a blank frame: every
image and channel a single value) carries no statistics: it is normalized by the
averages (or, before any, by its own statistics) and never taken into them
(`DELTA.degenerate_batches` counts them).

Not implemented: DELTA's second component, dynamic online re-weighting (DOT),
which weights each sample's loss by its predicted class's inverse frequency; it
needs per-sample losses, i.e. code in each base method.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from metatta.methods.base import register
from metatta.methods.plugin import BNPlugin, PluginConfig, PluginNorm, per_channel, channel_moments

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DELTAConfig(PluginConfig):
    tbr_momentum: float = 0.05  # alpha: ema <- ema + alpha * (batch - ema)
    tbr_init: str = "cumulative"  # where the averages start: cumulative | first_batch (authors' code) | source

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.tbr_momentum <= 1.0:
            self.refuse("tbr_momentum", "in [0, 1]")
        if self.tbr_init not in TBR_INITS:
            self.refuse("tbr_init", f"one of {', '.join(TBR_INITS)}")


TBR_INITS = ("cumulative", "first_batch", "source")


def constant_images(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: every image of the batch is one value per channel (zeros, a blank frame)."""
    flat = x.detach().flatten(2) if x.dim() > 2 else x.detach().unsqueeze(-1)
    return (flat.amax(-1) == flat.amin(-1)).all()


class TBRNorm(PluginNorm):
    # tbr_count: images taken into the averages (inf with tbr_init=source: the moving average from
    # the start); a buffer so that reset and rollback restore it with the averages.
    stat_buffers = ("tbr_mean", "tbr_std", "tbr_count")

    def setup_statistics(self, momentum: float = 0.05, init: str = "cumulative") -> None:
        mean, var = self.source_statistics()
        device = self.weight.device if self.weight is not None else mean.device
        self.register_buffer("tbr_mean", mean.to(device))
        self.register_buffer("tbr_std", torch.sqrt(var + self.eps).to(device))
        self.register_buffer("tbr_count", torch.tensor(math.inf if init == "source" else 0.0, device=device))
        self.tbr_momentum = momentum
        self.tbr_cumulative = init == "cumulative"

    def plugin_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.real_rows(x)
        mean_b, sq_b = channel_moments(rows)
        var_b = (sq_b - mean_b * mean_b).clamp_min(0.0)
        std_b = torch.sqrt(var_b + self.eps)
        mean_p, std_p, count = self.prior()
        n = float(rows.shape[0])
        alpha = self.tbr_momentum
        # The batch's share of the averages; torch ops keep it on the device (no host sync per layer).
        share = n / (count + n) if self.tbr_cumulative else (count == 0).to(count.dtype)
        share = share.clamp_min(alpha)
        mean_new = mean_p + share * (mean_b.detach() - mean_p)
        std_new = std_p + share * (std_b.detach() - std_p)
        # Warm-up (the batch weighs more than alpha): normalize by the averages including it;
        # after it, by the averages before it (batch renormalization, the authors' code).
        warm = share > alpha
        mean_ema = torch.where(warm, mean_new, mean_p)
        std_ema = torch.where(warm, std_new, std_p)
        r = (std_b / std_ema).detach()
        d = ((mean_b - mean_ema) / std_ema).detach()
        self.store(mean_new, std_new, count + n)
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

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.degenerate_batches = 0  # batches of constant images, kept out of the averages

    def layer_options(self, config: DELTAConfig) -> dict[str, Any]:
        return {"momentum": config.tbr_momentum, "init": config.tbr_init}

    @contextlib.contextmanager
    def _session(self, x: torch.Tensor):
        """A batch of constant images is never taken into the averages (see the module docstring)."""
        if self._new_batch and bool(constant_images(x)):
            self._new_batch = False  # the layers then store nothing from this batch
            self.degenerate_batches += 1
            log.debug("delta: batch of constant images not taken into the averages (%d so far)",
                      self.degenerate_batches)
        with super()._session(x):
            yield
