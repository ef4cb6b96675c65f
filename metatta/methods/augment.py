"""CoTTA's test-time augmentation (Wang et al., CVPR 2022), on [0, 1] image batches.

Follows `get_tta_transforms` and `ColorJitterPro` of the authors' code
(qinenergy/cotta, cifar/cotta.py and cifar/my_transforms.py), in order:

1. clip to [0, 1];
2. colour jitter in a random order of brightness, contrast, saturation, hue and
   gamma (the gamma input is clamped to [1e-8, 1] first, as in their code);
   saturation and hue leave 1-channel images unchanged;
3. edge padding by half the image size, random affine (rotation +-15 deg,
   translation up to 1/16 of the padded size, scale 0.9..1.1, bilinear, fill 0),
   Gaussian blur (kernel 5, sigma 0.001..0.5), centre crop back to the input size;
4. horizontal flip with probability 0.5;
5. additive Gaussian noise (std 0.005) and a final clip.

`soft=True` gives the narrower ranges of their `soft` option. As in their code,
which applies the torchvision transforms to the whole batch tensor, one set of
random parameters is drawn per call and shared by every image of the batch (the
noise is drawn per pixel). Works for 1- or 3-channel images of any size
(28, 32, 224, ...); PALM reuses it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as nnf
from torch import nn
from torchvision.transforms.v2 import functional as TF


@dataclasses.dataclass(frozen=True)
class AugmentRanges:
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    saturation: tuple[float, float]
    hue: tuple[float, float]
    gamma: tuple[float, float]
    degrees: float
    scale: tuple[float, float]
    blur_sigma: tuple[float, float]
    translate: float = 1.0 / 16.0  # fraction of the padded image size
    blur_kernel: int = 5
    hflip_prob: float = 0.5


STRONG = AugmentRanges(
    brightness=(0.6, 1.4), contrast=(0.7, 1.3), saturation=(0.5, 1.5), hue=(-0.06, 0.06), gamma=(0.7, 1.3),
    degrees=15.0, scale=(0.9, 1.1), blur_sigma=(0.001, 0.5),
)
SOFT = AugmentRanges(
    brightness=(0.8, 1.2), contrast=(0.85, 1.15), saturation=(0.75, 1.25), hue=(-0.03, 0.03), gamma=(0.85, 1.15),
    degrees=8.0, scale=(0.95, 1.05), blur_sigma=(0.001, 0.25),
)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=_gen_device(generator)).item()


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"cotta_augment: x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"cotta_augment: x must be a float tensor in [0, 1], got dtype {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"cotta_augment: x must have 1 or 3 channels, got {x.shape[1]}")


def color_jitter_pro(x: torch.Tensor, ranges: AugmentRanges, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation, hue and gamma in a random order (one draw per call)."""
    for op in torch.randperm(5, generator=generator, device=_gen_device(generator)).tolist():
        if op == 0:
            x = TF.adjust_brightness(x, _uniform(*ranges.brightness, generator))
        elif op == 1:
            x = TF.adjust_contrast(x, _uniform(*ranges.contrast, generator))
        elif op == 2:
            x = TF.adjust_saturation(x, _uniform(*ranges.saturation, generator))  # identity for 1 channel
        elif op == 3:
            x = TF.adjust_hue(x, _uniform(*ranges.hue, generator))  # identity for 1 channel
        else:
            # Their code clamps before gamma: 0 ** gamma has NaN gradients after contrast.
            x = TF.adjust_gamma(x.clamp(1e-8, 1.0), _uniform(*ranges.gamma, generator))
    return x


def random_affine_blur(x: torch.Tensor, ranges: AugmentRanges, generator: torch.Generator | None = None) -> torch.Tensor:
    """Edge-pad by half the size, rotate/translate/scale, blur, centre-crop back."""
    height, width = x.shape[-2:]
    pad_h, pad_w = height // 2, width // 2
    x = nnf.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    padded_h, padded_w = x.shape[-2:]
    angle = _uniform(-ranges.degrees, ranges.degrees, generator)
    max_dx, max_dy = ranges.translate * padded_w, ranges.translate * padded_h
    translate = [float(round(_uniform(-max_dx, max_dx, generator))), float(round(_uniform(-max_dy, max_dy, generator)))]
    scale = _uniform(*ranges.scale, generator)
    x = TF.affine(x, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    sigma = _uniform(*ranges.blur_sigma, generator)
    x = TF.gaussian_blur(x, kernel_size=[ranges.blur_kernel, ranges.blur_kernel], sigma=[sigma, sigma])
    return TF.center_crop(x, [height, width])


def cotta_augment(
    x: torch.Tensor,
    *,
    soft: bool = False,
    noise_std: float = 0.005,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One CoTTA augmentation of a (B, C, H, W) batch in [0, 1]; returns a new tensor in [0, 1]."""
    _check_batch(x)
    ranges = SOFT if soft else STRONG
    x = x.clamp(0.0, 1.0)
    x = color_jitter_pro(x, ranges, generator)
    x = random_affine_blur(x, ranges, generator)
    if torch.rand((), generator=generator, device=_gen_device(generator)).item() < ranges.hflip_prob:
        x = x.flip(-1)
    if noise_std > 0:
        # Without a generator draw on the batch's device (no host-to-device copy per call).
        noise_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=noise_device, dtype=x.dtype)
        x = x + noise_std * noise.to(x.device)
    return x.clamp(0.0, 1.0)


class CoTTAAugment(nn.Module):
    """`cotta_augment` as a module (no parameters)."""

    def __init__(self, soft: bool = False, noise_std: float = 0.005):
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"CoTTAAugment: noise_std must be >= 0, got {noise_std}")
        self.soft = soft
        self.noise_std = noise_std

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return cotta_augment(x, soft=self.soft, noise_std=self.noise_std, generator=generator)

    def extra_repr(self) -> str:
        return f"soft={self.soft}, noise_std={self.noise_std}"
