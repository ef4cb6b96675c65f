"""Pieces many methods share: normalization-layer handling and entropy."""
from __future__ import annotations

import torch
from torch import nn

from metatta.losses import max_entropy, softmax_entropy  # noqa: F401  (re-exported: methods import them from here)

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORM_TYPES = BN_TYPES + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def use_batch_statistics(model: nn.Module) -> None:
    """Make every BN layer normalize with the statistics of the current batch,
    in train and eval mode alike.

    Dropping the running buffers matters: with `track_running_stats=False` but
    the buffers still present, eval-mode BN silently uses the source statistics.
    """
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


def freeze_all(model: nn.Module) -> None:
    model.requires_grad_(False)


def norm_affine_params(model: nn.Module) -> list[nn.Parameter]:
    """Enable and return the affine weight/bias of every normalization layer."""
    params = []
    for _, m in norm_layers(model):
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    return params


def configure_norm_adaptation(model: nn.Module) -> list[nn.Parameter]:
    """Tent's recipe: freeze everything, BN on batch statistics, adapt norm affines."""
    model.eval()
    freeze_all(model)
    use_batch_statistics(model)
    return norm_affine_params(model)
