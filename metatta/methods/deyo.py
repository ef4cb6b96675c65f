"""DeYO: destroy your object (Lee et al., "Entropy is not Enough for Test-Time
Adaptation: From the Perspective of Disentangled Factors", ICLR 2024; code:
Jhyun17/DeYO, methods/deyo.py and main.py).

Entropy minimization on the samples whose prediction rests on the object's shape.
Per test batch, as in the authors' `forward_and_adapt_deyo`:

1. entropy filter: keep the samples with H(x) < entropy_factor * ln C (0.5 ln C);
2. destroy the shape of each kept sample x: x' = its image cut into a
   patch_grid x patch_grid grid of patches (4 x 4) shuffled at random, one
   permutation per image (`shuffle_patches`; the image is first resized to a
   multiple of the grid and back, as in their code);
3. PLPD (pseudo-label probability difference): with c = argmax p(x),
   PLPD = p(x)_c - p(x')_c, x' predicted without gradients; keep the samples with
   PLPD > plpd_threshold (0.2);
4. loss = mean over the kept samples of w(x) * H(x), the weight detached:
   w = exp(-(H(x) - E0)) + exp(PLPD), E0 = reweight_factor * ln C (0.4 ln C)
   (`reweight_entropy` / `reweight_plpd` switch either term off, both off: w = 1);
5. no sample left after a filter: no update.

The logits returned are those of the first forward (before the update). `pixel`
(every pixel shuffled, one permutation per batch) and `occlusion` (a square of
the image's channel means) are the paper's alternative augmentations; the
occlusion square is given as a fraction of the image side (their 112 / 224 at
56 / 224 from the top-left corner is 0.5 at 0.25).

Adapted: the affine weight and bias of the normalization layers (BN, LayerNorm,
GroupNorm) except the top layers, the rule of SAR's code that theirs copies
(ResNet-50 layer4; ViT-B/16 blocks 9-11 and the final norm); `excluded_modules:
null` carries it to any network (`metatta.methods.sar.top_layers`). BN normalizes
with the batch statistics, in the forward of x' too (of the kept samples only,
as theirs). Their code runs the model in train mode; here eval mode without the
BN running buffers (the same, without dropout or stochastic depth).

Defaults: the authors' ResNet settings (main.py, exp_deyo.sh): SGD, momentum 0.9,
lr 0.00025 at batch >= 32 and 0.00025 * B / 32 below (`lr_batch_size: 32`),
entropy_factor 0.5, reweight_factor 0.4, plpd_threshold 0.2 (their argparse
default and wild-setting value; their mild ResNet-50-BN run uses 0.3), patch
grid 4. Their ViT-B/16 lr is 0.001 * B / 64 (configs/methods/deyo_vit.yaml);
the broadest public TTA codebase (mariodoebler/test-time-adaptation) runs
CIFAR-10/100-C with Adam lr 1e-3 at batch 200 (configs/methods/deyo_cifar.yaml).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import freeze_all, softmax_entropy, use_batch_statistics
from metatta.methods.sar import norm_affine_params_outside, top_layers

log = logging.getLogger(__name__)

AUGMENTATIONS = ("patch", "pixel", "occlusion")


@dataclasses.dataclass
class DeYOConfig(MethodConfig):
    optimizer: str = "sgd"
    lr: float = 0.00025  # their ResNet setting at batch >= 32
    lr_batch_size: int | None = 32  # their code: 2 * 0.00025 * B / 64 below batch 32
    momentum: float = 0.9
    entropy_factor: float = 0.5  # filter: H(x) < entropy_factor * ln C (--deyo_margin)
    reweight_factor: float = 0.4  # E0 = reweight_factor * ln C in the weight (--deyo_margin_e0)
    plpd_threshold: float = 0.2  # filter: PLPD > plpd_threshold (--plpd_threshold)
    filter_entropy: bool = True  # false: every sample passes step 1 (--filter_ent 0)
    filter_plpd: bool = True  # false: every sample passes step 3 (--filter_plpd 0)
    reweight_entropy: bool = True  # the exp(-(H - E0)) term of the weight (--reweight_ent)
    reweight_plpd: bool = True  # the exp(PLPD) term of the weight (--reweight_plpd)
    augmentation: str = "patch"  # patch | pixel | occlusion (--aug_type)
    patch_grid: int = 4  # patches per row and per column (--patch_len)
    occlusion_size: float = 0.5  # side of the occluded square / image side (their 112 of 224)
    occlusion_start: float = 0.25  # its top-left row and column / image side (their 56 of 224)
    excluded_modules: tuple[str, ...] | None = None  # None: SAR's top layers of the network

    def validate(self) -> None:
        super().validate()
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"deyo: config.augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")
        if self.patch_grid < 1:
            raise ValueError(f"deyo: config.patch_grid must be >= 1, got {self.patch_grid}")
        for name in ("occlusion_size", "occlusion_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"deyo: config.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("entropy_factor", "reweight_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"deyo: config.{name} must be >= 0, got {getattr(self, name)}")


# ---- the shape-destroying augmentations ---------------------------------------------------------
def shuffle_patches(x: torch.Tensor, grid: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of `x` (B, C, H, W) cut into grid x grid patches, shuffled with a
    permutation of its own. Sides that are not multiples of `grid` are resized to the
    multiple below and back (bilinear, antialiased), as the authors' code does."""
    b, c, h, w = x.shape
    th, tw = (h // grid) * grid, (w // grid) * grid
    if th == 0 or tw == 0:
        raise ValueError(f"deyo: images of {h}x{w} pixels cannot be cut into a {grid}x{grid} grid of patches")
    resized = (th, tw) != (h, w)
    if resized:
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    ph, pw = th // grid, tw // grid
    # (B, C, gh, ph, gw, pw) -> (B, gh*gw, C, ph, pw): patch k is row k // grid, column k % grid
    patches = x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    draw_on = generator.device if generator is not None else x.device
    order = torch.argsort(torch.rand(b, grid * grid, generator=generator, device=draw_on), dim=1).to(x.device)
    patches = patches[torch.arange(b, device=x.device).unsqueeze(1), order]
    out = patches.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, th, tw)
    if resized:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out


def shuffle_pixels(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every pixel position shuffled, one permutation for the whole batch (their 'pixel')."""
    b, c, h, w = x.shape
    draw_on = generator.device if generator is not None else x.device
    order = torch.randperm(h * w, generator=generator, device=draw_on).to(x.device)
    return x.reshape(b, c, h * w)[:, :, order].reshape(b, c, h, w)


def occlude(x: torch.Tensor, size: float, start: float) -> torch.Tensor:
    """A square of side `size` * H at (`start` * H, `start` * W) set to each image's channel means."""
    h, w = x.shape[-2:]
    rows = slice(int(round(start * h)), int(round(start * h)) + int(round(size * h)))
    cols = slice(int(round(start * w)), int(round(start * w)) + int(round(size * w)))
    out = x.clone()
    out[:, :, rows, cols] = x.mean((2, 3), keepdim=True).expand_as(out[:, :, rows, cols])
    return out


# ---- PLPD and the weights -------------------------------------------------------------------------
def plpd(probs: torch.Tensor, probs_destroyed: torch.Tensor) -> torch.Tensor:
    """p(x)_c - p(x')_c per sample, c the pseudo-label argmax p(x)."""
    label = probs.argmax(1, keepdim=True)
    return (probs.gather(1, label) - probs_destroyed.gather(1, label)).squeeze(1)


def deyo_weights(entropy: torch.Tensor, plpd_values: torch.Tensor, margin: float,
                 reweight_entropy: bool = True, reweight_plpd: bool = True) -> torch.Tensor:
    """exp(-(H - margin)) + exp(PLPD) (detached); either term off: left out, both off: 1."""
    entropy, plpd_values = entropy.detach(), plpd_values.detach()
    if not (reweight_entropy or reweight_plpd):
        return torch.ones_like(entropy)
    weight = torch.zeros_like(entropy)
    if reweight_entropy:
        weight = weight + torch.exp(margin - entropy)
    if reweight_plpd:
        weight = weight + torch.exp(plpd_values)
    return weight


@register("deyo")
class DeYO(TTAMethod):
    Config = DeYOConfig

    def __init__(
        self,
        model: nn.Module,
        config: DeYOConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        # Diagnostics of the latest batch (not state: nothing reads them back).
        self.last_entropy_selection: torch.Tensor | None = None  # bool mask over the batch
        self.last_selection: torch.Tensor | None = None  # bool mask over the batch, both filters
        self.last_plpd: torch.Tensor | None = None  # PLPD of the entropy-selected samples
        self.last_weights: torch.Tensor | None = None  # weights of the finally selected samples

    # ---- what DeYO specifies ---------------------------------------------------------
    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)
        use_batch_statistics(self.model)

    def excluded_modules(self) -> list[str]:
        if self.config.excluded_modules is not None:
            return list(self.config.excluded_modules)
        return top_layers(self.model)

    def collect_params(self) -> list:
        params, _ = norm_affine_params_outside(self.model, self.excluded_modules(), "deyo")
        return params

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        """x' of step 2: the configured shape-destroying augmentation."""
        cfg = self.config
        if cfg.augmentation == "patch":
            return self.in_layout(shuffle_patches(x, cfg.patch_grid))
        if cfg.augmentation == "pixel":
            return self.in_layout(shuffle_pixels(x))
        return self.in_layout(occlude(x, cfg.occlusion_size, cfg.occlusion_start))

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        cfg = self.config
        log_classes = math.log(logits.shape[1])
        entropy = softmax_entropy(logits)
        kept = entropy < cfg.entropy_factor * log_classes if cfg.filter_entropy else torch.ones_like(entropy, dtype=torch.bool)
        self.last_entropy_selection, self.last_selection = kept, kept.clone()
        self.last_plpd = self.last_weights = None
        if not bool(kept.any()):
            return None
        with torch.no_grad():
            logits_destroyed = self.model(self.destroy(x[kept].detach()))
        differences = plpd(logits[kept].detach().softmax(1), logits_destroyed.softmax(1))
        self.last_plpd = differences
        final = differences > cfg.plpd_threshold if cfg.filter_plpd else torch.ones_like(differences, dtype=torch.bool)
        self.last_selection[kept] = final
        if not bool(final.any()):
            return None
        chosen = entropy[kept][final]
        weights = deyo_weights(chosen, differences[final], cfg.reweight_factor * log_classes,
                               cfg.reweight_entropy, cfg.reweight_plpd)
        self.last_weights = weights
        return (chosen * weights).mean(0)
