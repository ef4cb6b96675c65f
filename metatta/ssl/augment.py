"""SimCLR's augmentations, batched: every image of a (B, C, H, W) batch in [0, 1]
gets its own random parameters, in a few tensor ops on the batch's device.

Per image, in SimCLR's order (Chen et al. 2020, appendix A; CIFAR variant, no blur):
1. random resized crop: area fraction uniform in `crop_scale` (default 0.2..1,
   the usual choice for 28-32 pixel images; SimCLR's ImageNet default is
   0.08..1), log aspect ratio uniform in log(3/4)..log(4/3), position uniform,
   resized back to (H, W) by bilinear sampling (one `grid_sample` for the
   batch). Where torchvision would retry a crop that does not fit, the crop's
   sides are clipped to the image instead;
2. horizontal flip with probability 0.5 (folded into the same sampling grid);
3. with probability 0.8 colour jitter (brightness, contrast, saturation, hue
   with strength s = 0.5: 0.4, 0.4, 0.4, 0.1) in a random order, one order per
   call, factors per image; saturation and hue leave 1-channel images alone;
4. with probability 0.2 grayscale (3-channel images only).

Works for 1- and 3-channel images of any size, on CPU or CUDA. Random numbers
come from `generator` (on its device, CPU by default) and are then moved, so a
seeded CPU generator gives the same views on any device.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


@dataclasses.dataclass(frozen=True)
class SimCLRAugment:
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2

    def __post_init__(self):
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"SimCLRAugment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"SimCLRAugment.crop_ratio must be 0 < low <= high, got {self.crop_ratio}")
        for name in ("hflip_prob", "jitter_prob", "grayscale_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SimCLRAugment.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5 or min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("SimCLRAugment: jitter strengths must be >= 0 and hue <= 0.5")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return simclr_augment(x, self, generator)

    def views(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent augmentations of the batch: SimCLR's positive pairs."""
        return self(x, generator), self(x, generator)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    g_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=g_device).to(device)


def _uniform(low: float, high: float, n: int, generator, device) -> torch.Tensor:
    return low + (high - low) * _rand(n, generator, device)


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"simclr_augment: x must be a float (B, C, H, W) tensor in [0, 1], got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"simclr_augment: x must have 1 or 3 channels, got {x.shape[1]}")


def resized_crop_flip(x: torch.Tensor, aug: SimCLRAugment, generator=None) -> torch.Tensor:
    """Random resized crop and horizontal flip per image, as one affine sampling grid."""
    b, device = len(x), x.device
    area = _uniform(*aug.crop_scale, b, generator, device)
    log_ratio = _uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), b, generator, device)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image's width and height
    height = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - width) * (2 * _rand(b, generator, device) - 1)  # centre in [-1, 1] coordinates
    cy = (1 - height) * (2 * _rand(b, generator, device) - 1)
    flip = torch.where(_rand(b, generator, device) < aug.hflip_prob, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(x) if x.shape[1] == 3 else x


def color_jitter(x: torch.Tensor, aug: SimCLRAugment, generator=None) -> torch.Tensor:
    """SimCLR's colour jitter with probability `jitter_prob` per image (factors per image, one op order per call)."""
    b, device = len(x), x.device
    on = (_rand(b, generator, device) < aug.jitter_prob).to(x.dtype).view(b, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:  # 1 (identity) for images not jittered
        f = _uniform(max(0.0, 1 - strength), 1 + strength, b, generator, device).view(b, 1, 1, 1).to(x.dtype)
        return on * f + (1 - on)

    ops = ["brightness", "contrast"] + (["saturation", "hue"] if x.shape[1] == 3 else [])
    g_device = generator.device if generator is not None else torch.device("cpu")
    for k in torch.randperm(len(ops), generator=generator, device=g_device).tolist():
        op = ops[k]
        if op == "brightness":
            x = (x * factor(aug.brightness)).clamp(0, 1)
        elif op == "contrast":
            f = factor(aug.contrast)
            x = (x * f + _grey(x).mean((1, 2, 3), keepdim=True) * (1 - f)).clamp(0, 1)
        elif op == "saturation":
            f = factor(aug.saturation)
            x = (x * f + _grey(x) * (1 - f)).clamp(0, 1)
        else:
            shift = on.view(b, 1, 1) * _uniform(-aug.hue, aug.hue, b, generator, device).view(b, 1, 1).to(x.dtype)
            x = _shift_hue(x, shift)
    return x


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    h, s, v = _rgb_to_hsv(x).unbind(dim=1)
    return _hsv_to_rgb(torch.stack(((h + shift).remainder(1.0), s, v), dim=1))


def random_grayscale(x: torch.Tensor, aug: SimCLRAugment, generator=None) -> torch.Tensor:
    if x.shape[1] != 3 or aug.grayscale_prob == 0:
        return x
    grey = (_rand(len(x), generator, x.device) < aug.grayscale_prob).view(-1, 1, 1, 1)
    return torch.where(grey, TF.rgb_to_grayscale(x, num_output_channels=3), x)


def simclr_augment(x: torch.Tensor, aug: SimCLRAugment | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One SimCLR augmentation of every image of a (B, C, H, W) batch in [0, 1] (see the module docstring)."""
    _check(x)
    aug = aug or SimCLRAugment()
    x = resized_crop_flip(x.clamp(0, 1), aug, generator)
    x = color_jitter(x, aug, generator)
    return random_grayscale(x, aug, generator).contiguous()
