"""MEMO: test-time robustness via adaptation and augmentation (Zhang, Levine & Finn,
NeurIPS 2022; code: zhangmarvin/memo; the broadest public TTA codebase's version:
mariodoebler/test-time-adaptation, classification/methods/memo.py).

One test image at a time (a batch is taken image by image): draw
`num_augmentations` AugMix views of it (`metatta.methods.augmix`), take the
marginal entropy of the model's mean prediction over them,
H(mean_v softmax(f(view_v))), one optimizer step on it (`steps`), then predict the
image itself with the updated model. Episodic by default: every image starts from
the source model (`reset()` before each one), as in the paper.

Adapted: every parameter of the network (the paper). BN layers normalize with
(1 - bn_alpha) * source + bn_alpha * the batch's statistics (the views' when
adapting, the image's when predicting): the broadest codebase's AlphaBatchNorm with
BN.ALPHA 0.1; the paper's ImageNet prior of strength N = 16 is bn_alpha = 1/17 at
one image. `bn_alpha: null` keeps the source statistics; a network without BN
layers is used as it is.

Defaults: the CIFAR-10-C setting (their cfgs/cifar10_c/memo.yaml, the paper's
CIFAR values): SGD lr 0.005, momentum 0.9, no weight decay, 1 step, 32 views,
AugMix severity 1 with the CIFAR pre-augmentation (pad-4 crop, flip). ImageNet-C
(64 views, lr 0.00025, resized crop): configs/methods/memo_imagenet.yaml.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from metatta.methods.augmix import augmix_views
from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.common import step_or_refuse
from metatta.methods.ttaug import mix_bn_statistics, validate_views


@dataclasses.dataclass
class MEMOConfig(MethodConfig):
    episodic: bool = True  # every test image from the source model
    optimizer: str = "sgd"
    lr: float = 0.005
    lr_batch_size: int | None = None  # one image per update: no batch scaling
    momentum: float = 0.9
    weight_decay: float = 0.0
    num_augmentations: int = 32  # views per image (TEST.N_AUGMENTATIONS)
    bn_alpha: float | None = 0.1  # BN.ALPHA; None: the source BN statistics
    severity: float = 1.0  # AugMix operation severity
    preaugmentation: str = "crop_flip"  # crop_flip (CIFAR) | resized_crop_flip (ImageNet) | none

    def validate(self) -> None:
        super().validate()
        validate_views(self, "memo")


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean over the rows (views) of softmax(logits), computed in log space."""
    log_probs = logits.log_softmax(1)
    mean_log_probs = log_probs.logsumexp(0) - math.log(logits.shape[0])
    mean_log_probs = mean_log_probs.clamp_min(torch.finfo(mean_log_probs.dtype).min)
    return -(mean_log_probs.exp() * mean_log_probs).sum()


@register("memo")
class MEMO(TTAMethod):
    Config = MEMOConfig

    def configure_model(self) -> None:
        self.model.eval()
        self.model.requires_grad_(True)
        mix_bn_statistics(self.model, self.config.bn_alpha, "memo")

    def collect_params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_layout(x)
        if not bool(torch.isfinite(x).all()):
            return self._nonfinite_input(x)
        return torch.cat([self.adapt_and_predict(x[i:i + 1]) for i in range(x.shape[0])])

    def adapt_and_predict(self, image: torch.Tensor) -> torch.Tensor:
        """MEMO on one (1, C, H, W) image: reset (episodic), adapt on its views, predict it."""
        if self.config.episodic:
            self.reset()
        for _ in range(max(1, self.config.steps)):
            self._guarded_step(image)
        return self.predict(image)

    def forward_and_adapt(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        views = self.in_layout(augmix_views(image[0], cfg.num_augmentations, cfg.severity,
                                            preaugmentation=cfg.preaugmentation))
        with torch.enable_grad():
            logits = self.model(views)
            loss = marginal_entropy(logits)
            step_or_refuse(self, loss)
        return logits.detach()
