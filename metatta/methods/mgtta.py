"""MGTTA: test-time adaptation with a learned optimizer (Deng, Niu et al., AAAI 2025).

Adapts the affine weight and bias of the normalization layers (BN on batch
statistics for BN networks, LayerNorm for ViTs), everything else frozen, with
the update theta <- theta - lr * MGG(gradient features), lr (adapt_lr) 1e-3.
An MGG meta-trained with a learned step scale s (trainers/mgg.py,
`learned_step_size`) steps by lr * s instead: s is part of its weights, so
the adapter carries it, and `MGGOptimizer` applies it; lr still scales the step.
The MGG is trained beforehand (trainers/mgg.py, on the held-out corruptions)
and fixed at test time; its moments and memory reset when the method resets.

Inputs (context): `mgg=` an `MGG` module, or `mgg_path=` an MGG adapter
directory / weights file (also settable as config `mgg_path`); `source_stats=`
the source feature statistics (`metatta.models.feature_stats.compute_feature_stats`),
needed only for loss "entropy+stats".

Loss: "auto" (default): the authors' ViT loss, "entropy+stats" (entropy + 0.4 *
the mean/std alignment of the CLS token after every block with the clean
statistics stored in the source checkpoint), when the model is a vision
transformer, and "entropy" (the paper's framing) for any other model; or either
by name. See `metatta.learned.losses` (`loss_kind_for`). `reliable_entropy_factor` (beyond the paper) swaps the
mean entropy for EATA's entropy term on its reliable samples. The authors' code runs the model in train mode; here
the model is in eval mode with BN on batch statistics, which is the same for BN
and LayerNorm networks without dropout.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from metatta.learned.losses import LOSS_CHOICES, STATS_REDUCTIONS, TTALoss, loss_kind_for, record_features
from metatta.learned.mgg import MGG, load_mgg
from metatta.learned.optimizer import frozen_mgg, mgg_optimizer_factory
from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import configure_norm_adaptation, norm_affine_params


@dataclasses.dataclass
class MGTTAConfig(MethodConfig):
    lr: float = 1e-3  # adapt_lr: theta <- theta - lr * tanh(MGG output)
    loss: str = "auto"  # auto (ViT: entropy+stats, else entropy) | entropy | entropy+stats
    stats_lambda: float = 0.4  # weight of the feature-statistics term (authors: 0.4 on ImageNet-C)
    stats_reduction: str = "per_layer_mse"  # per_layer_mse | authors (sum of squared errors / 64)
    mgg_path: str | None = None  # used when no `mgg` / `mgg_path` context is given
    # EATA's entropy term (reliable samples, H < factor * ln C, reweighted) instead of the mean entropy;
    # None: the paper's. Set it as the MGG was meta-trained (metatta/learned/meta_training.py, same field).
    reliable_entropy_factor: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.loss not in LOSS_CHOICES:
            self.refuse("loss", f"one of {LOSS_CHOICES}")
        if self.stats_reduction not in STATS_REDUCTIONS:
            self.refuse("stats_reduction", f"one of {STATS_REDUCTIONS}")


@register("mgtta")
class MGTTA(TTAMethod):
    """The MGG steps the norm affines; `optimizer`/`momentum` config fields are unused
    (an explicit `optimizer_factory` still replaces the MGG, e.g. for ablations)."""

    Config = MGTTAConfig
    context_inputs = ("mgg", "source_stats")

    def __init__(
        self,
        model: nn.Module,
        config: MGTTAConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        mgg: MGG | None = None,
        mgg_path: str | None = None,
        source_stats: Mapping[str, torch.Tensor] | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        device = next(model.parameters()).device
        stats = {k: v.to(device) for k, v in source_stats.items()} if source_stats else None
        kind = loss_kind_for(config.loss, model)
        if kind == "entropy+stats" and not stats:
            raise ValueError(f"mgtta: loss {config.loss!r} on {type(model).__name__} is entropy+stats, which needs "
                             "source_stats (the clean feature statistics stored in the source checkpoint, "
                             "metatta.models.checkpoint.load_feature_stats); pass them or set loss: entropy")
        loss_fn = TTALoss(kind, stats, config.stats_lambda, config.stats_reduction,
                          reliable_factor=config.reliable_entropy_factor)
        mgg = _resolve_mgg(mgg, mgg_path or config.mgg_path, device)
        factory = optimizer_factory or mgg_optimizer_factory(mgg, config.lr)
        super().__init__(model, config, optimizer_factory=factory, **context)
        self.mgg = mgg
        self.loss_fn = loss_fn
        self._recorder = None  # the FeatureRecorder of the forward pass being adapted on

    def configure_model(self) -> None:
        configure_norm_adaptation(self.model)

    def collect_params(self) -> list:
        return norm_affine_params(self.model)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        # The stats term needs the features of this forward pass: record them around it.
        with record_features(self.model, self.loss_fn.needs_features) as recorder:
            self._recorder = recorder
            try:
                return super().forward_and_adapt(x)
            finally:
                self._recorder = None

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        if not self.loss_fn.any_reliable(logits):
            return None  # as EATA: no reliable sample, no update
        return self.loss_fn(logits, self._recorder.features if self.loss_fn.needs_features else None)


def _resolve_mgg(mgg: MGG | None, path: str | None, device: torch.device) -> MGG:
    """A private, frozen copy of the trained MGG on the model's device."""
    if mgg is None:
        if path is None:
            raise ValueError("mgtta needs a trained MGG: pass mgg=<MGG> or mgg_path=<adapter dir or weights file>")
        mgg = load_mgg(path)
    return frozen_mgg(mgg, device)
