"""ROID (Marsden, Döbler & Yang, "Universal Test-time Adaptation through Weight
Ensembling, Diversity Weighting, and Prior Correction", WACV 2024; code:
mariodoebler/test-time-adaptation, classification/methods/roid.py).

Per test batch, as in the authors' `loss_calculation` and `forward_and_adapt`:

1. weights (no gradient), from the model's softmax p on the batch:
   diversity d = 1 - cos(m, p) with m the moving average of the batch-mean
   predictions (m starts uniform; m <- 0.9 m + 0.1 mean p after the weights), and
   certainty c = -H(p), each min-max normalized over the batch; samples with d
   below the batch mean of d are dropped (weight 0); the others get
   w = exp(d c / T), T = 1/3 (`roid_weights`);
2. loss = sum over the kept samples of w SLR(p) / B, with the soft likelihood ratio
   SLR(p) = -sum_k p_k log(p_k / (1 - p_k) + 1e-5), p clipped to at most 0.99;
   plus the consistency term sum over the kept samples of
   w SCE(model(aug(x)), model(x)) / B (symmetric cross-entropy, both directions
   differentiable, as in their code); one optimizer step;
3. weight ensembling: every adapted parameter returns towards its source value,
   theta <- 0.99 theta + 0.01 theta_source;
4. prior correction of the returned prediction: with the batch prior
   pi = mean p and s = max(1/B, 1/K) / max pi, the logits are multiplied by
   (pi + s) / (1 + s K) (their code scales the logits, not the probabilities).

B is the test batch's size (their code divides by the configured batch size, the
same except for a last, smaller batch). Deviation: a batch whose d or c is the same
for every sample (always at batch size 1) has its min-max normalization set to 0
instead of their 0/0 = NaN, so every sample keeps weight 1.

Augmentation: their `get_tta_transforms(cotta_augs=False, padding_mode="reflect")`:
CoTTA's colour jitter (strong ranges), reflect padding by half the size, random
affine (+-15 deg, translation 1/16, scale 0.9..1.1), centre crop, horizontal flip,
clip; no blur, no noise (`roid_augment`). Adapted: the affine weight and bias of the
normalization layers, BN on batch statistics (eval mode without running buffers).

Defaults: their CIFAR-10-C setting (cfgs/cifar10_c/roid.yaml, conf.py): Adam
lr 1e-3, batch 200, weighting, prior correction and consistency on, source momentum
0.99, probability momentum 0.9, temperature 1/3.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from metatta.methods.augment import STRONG, color_jitter_pro
from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import (
    adaptable_norm_params,
    configure_norm_adaptation,
    ema_update,
    softmax_entropy,
    step_or_refuse,
)
from metatta.methods.rmt import symmetric_cross_entropy


@dataclasses.dataclass
class ROIDConfig(MethodConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    use_weighting: bool = True  # ROID.USE_WEIGHTING
    use_prior_correction: bool = True  # ROID.USE_PRIOR_CORRECTION
    use_consistency: bool = True  # ROID.USE_CONSISTENCY
    momentum_src: float = 0.99  # ROID.MOMENTUM_SRC: theta <- m theta + (1 - m) theta_source
    momentum_probs: float = 0.9  # ROID.MOMENTUM_PROBS
    temperature: float = 1 / 3  # ROID.TEMPERATURE

    def validate(self) -> None:
        super().validate()
        for name in ("momentum_src", "momentum_probs"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"roid: config.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"roid: config.temperature must be > 0, got {self.temperature}")


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample -sum_k p_k log(p_k / (1 - p_k) + eps), p clipped to [0, clip]."""
    p = logits.softmax(1).clamp(0.0, clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(1)


def min_max(v: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min); zeros when v is constant (their 0/0)."""
    span = v.max() - v.min()
    return torch.zeros_like(v) if float(span) == 0.0 else (v - v.min()) / span


def roid_weights(logits: torch.Tensor, class_probs: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, kept): diversity and certainty weights of step 1; weights are 0 where not kept."""
    probs = logits.softmax(1)
    diversity = min_max(1 - F.cosine_similarity(class_probs.unsqueeze(0), probs, dim=1))
    kept = ~(diversity < diversity.mean())
    certainty = min_max(-softmax_entropy(logits))
    weights = torch.exp(diversity * certainty / temperature)
    return torch.where(kept, weights, torch.zeros_like(weights)), kept


def prior_corrected(logits: torch.Tensor) -> torch.Tensor:
    """Their prior correction: logits * (pi + s) / (1 + s K), pi the batch-mean softmax."""
    b, k = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1 / b, 1 / k) / prior.max()
    return logits * ((prior + smooth) / (1 + smooth * k))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def roid_augment(x: torch.Tensor) -> torch.Tensor:
    """Their `get_tta_transforms(cotta_augs=False, padding_mode="reflect")` on a (B, C, H, W)
    batch in [0, 1], one parameter draw for the batch."""
    h, w = x.shape[-2:]
    x = color_jitter_pro(x.clamp(0.0, 1.0), STRONG)
    x = F.pad(x, (w // 2, w // 2, h // 2, h // 2), mode="reflect")
    ph, pw = x.shape[-2:]
    angle = _uniform(-STRONG.degrees, STRONG.degrees)
    shift = [float(round(_uniform(-STRONG.translate * pw, STRONG.translate * pw))),
             float(round(_uniform(-STRONG.translate * ph, STRONG.translate * ph)))]
    x = TF.affine(x, angle=angle, translate=shift, scale=_uniform(*STRONG.scale), shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    x = TF.center_crop(x, [h, w])
    if float(torch.rand(())) < STRONG.hflip_prob:
        x = x.flip(-1)
    return x.clamp(0.0, 1.0)


@register("roid")
class ROID(TTAMethod):
    Config = ROIDConfig

    def __init__(
        self,
        model: nn.Module,
        config: ROIDConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        source = self._source_state["model"]
        self._ensemble_pairs = [(p, source[n]) for n, p in self.model.named_parameters() if p.requires_grad]
        self.last_weights: torch.Tensor | None = None  # diagnostic: the latest batch's weights

    def configure_model(self) -> None:
        configure_norm_adaptation(self.model)

    def collect_params(self) -> list:
        return adaptable_norm_params(self.model, self.name)

    def init_extra_state(self) -> None:
        self.class_probs: torch.Tensor | None = None  # uniform on the first batch, when K is known

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with torch.enable_grad():
            logits = self.model(x)
            batch = logits.shape[0]
            kept = torch.ones(batch, dtype=torch.bool, device=logits.device)
            weights = torch.ones(batch, device=logits.device)
            if cfg.use_weighting:
                if self.class_probs is None:
                    self.class_probs = torch.full((logits.shape[1],), 1 / logits.shape[1], device=logits.device)
                with torch.no_grad():
                    weights, kept = roid_weights(logits, self.class_probs, cfg.temperature)
                    m = cfg.momentum_probs
                    self.class_probs = m * self.class_probs + (1 - m) * logits.softmax(1).mean(0)
            self.last_weights = weights
            loss = (soft_likelihood_ratio(logits) * weights)[kept].sum() / batch
            if cfg.use_consistency and bool(kept.any()):
                logits_aug = self.model(self.in_layout(roid_augment(x[kept])))
                loss = loss + (symmetric_cross_entropy(logits_aug, logits[kept]) * weights[kept]).sum() / batch
            if step_or_refuse(self, loss):
                self.after_update()
        logits = logits.detach()
        return prior_corrected(logits) if cfg.use_prior_correction else logits

    def after_update(self) -> None:
        """Step 3: weight ensembling with the source (CMF replaces it by its filter)."""
        self.ensemble_with_source()

    def ensemble_with_source(self) -> None:
        ema_update(self._ensemble_pairs, self.config.momentum_src)

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"class_probs": self.class_probs}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.class_probs = state["class_probs"]
