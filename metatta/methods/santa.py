"""SANTA: source anchoring network and target alignment (Chakrabarty, Sreenivas & Biswas,
"SANTA: Source Anchoring Network and Target Alignment for Continual Test Time
Adaptation", TMLR 2023; code: the broadest public TTA codebase,
mariodoebler/test-time-adaptation classification/methods/santa.py).

RMT's contrastive alignment to the source prototypes (`metatta.methods.rmt`) with the
frozen source model as the anchor of the self-training term instead of a mean
teacher, and no source replay or warm-up. Per test batch, as in their
`loss_calculation`:

1. student on x and on a CoTTA augmentation of x: logits s, s_aug and features f,
   f_aug; anchor (the configured source model, frozen) logits a on x;
2. self-training: mean over the batch of
   -(1/2) softmax(s).log_softmax(a) - (1/2) softmax(s_aug).log_softmax(a)
   (their AugCrossEntropy; the gradient flows through the student's softmax);
3. contrastive: as RMT's (nearest source prototype, f, f_aug through the
   projector, SupCon, temperature 0.1);
4. loss = lambda_ce_trg * (2) + lambda_cont * (3), one optimizer step over the
   normalization affines and the projector.

The prediction is s (before the update). Source prototypes: class means of the
features of the labelled `source_batches` on the configured model. Adapted: the
affine weight and bias of the normalization layers (BN on batch statistics) and
the projector.

Defaults: their CIFAR-10-C setting (cfgs/cifar10_c/santa.yaml, conf.py): Adam
lr 1e-3, batch 200, both lambdas 1, temperature 0.1, projection 128.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from metatta.methods.augment import CoTTAAugment
from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import (
    adaptable_norm_params,
    classifier_layer,
    configure_norm_adaptation,
    features_and_logits,
    step_or_refuse,
)
from metatta.methods.rmt import labelled_batches, projection_head, prototype_contrastive_loss, source_prototypes


@dataclasses.dataclass
class SANTAConfig(MethodConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lambda_ce_trg: float = 1.0  # SANTA.LAMBDA_CE_TRG
    lambda_cont: float = 1.0  # SANTA.LAMBDA_CONT
    temperature: float = 0.1  # CONTRAST.TEMPERATURE
    projection_dim: int = 128  # CONTRAST.PROJECTION_DIM
    soft_augmentation: bool = False
    aug_noise_std: float = 0.005
    classifier: str | None = None  # the linear classifier's module name; None: the last nn.Linear

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0:
            raise ValueError(f"santa: config.temperature must be > 0, got {self.temperature}")
        if self.projection_dim < 1:
            raise ValueError(f"santa: config.projection_dim must be >= 1, got {self.projection_dim}")
        for name in ("lambda_ce_trg", "lambda_cont"):
            if getattr(self, name) < 0:
                raise ValueError(f"santa: config.{name} must be >= 0, got {getattr(self, name)}")


def anchored_cross_entropy(logits: torch.Tensor, logits_aug: torch.Tensor, anchor_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample -(1/2) softmax(s).log_softmax(a) - (1/2) softmax(s_aug).log_softmax(a)."""
    log_anchor = anchor_logits.log_softmax(1)
    return -0.5 * ((logits.softmax(1) * log_anchor).sum(1) + (logits_aug.softmax(1) * log_anchor).sum(1))


@register("santa")
class SANTA(TTAMethod):
    Config = SANTAConfig
    context_inputs = ("source_batches",)

    def __init__(
        self,
        model: nn.Module,
        config: SANTAConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        source_batches: Iterable[Any] | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        source = labelled_batches(source_batches, "santa")
        self._projector_dim = config.projection_dim
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        self.augment = CoTTAAugment(soft=config.soft_augmentation, noise_std=config.aug_noise_std)
        self.prototypes = source_prototypes(self.model, self.classifier, source, self.in_layout, where="santa")

    def configure_model(self) -> None:
        configure_norm_adaptation(self.model)
        _, self.classifier = classifier_layer(self.model, self.config.classifier)

    def init_extra_state(self) -> None:
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)  # constant: not part of the state
        self.projector = projection_head(self.classifier.in_features, self._projector_dim, self.classifier.weight.device)

    def collect_params(self) -> list:
        return adaptable_norm_params(self.model, "santa") + list(self.projector.parameters())

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with torch.enable_grad():
            features, logits = features_and_logits(self.model, self.classifier, x)
            features_aug, logits_aug = features_and_logits(self.model, self.classifier, self.in_layout(self.augment(x)))
            with torch.no_grad():
                anchor_logits = self.anchor(x)
            contrastive = prototype_contrastive_loss(self.projector, features, features_aug, self.prototypes,
                                                     cfg.temperature)
            loss = (cfg.lambda_ce_trg * anchored_cross_entropy(logits, logits_aug, anchor_logits).mean(0)
                    + cfg.lambda_cont * contrastive)
            step_or_refuse(self, loss)
        return logits.detach()

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"projector": self.projector.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.projector.load_state_dict(state["projector"])
