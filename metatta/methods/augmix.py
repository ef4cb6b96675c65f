"""AugMix views (Hendrycks et al., ICLR 2020) as MEMO and TTAug draw them (MEMO's code:
zhangmarvin/memo; the broadest public TTA codebase: mariodoebler/test-time-adaptation,
classification/augmentations/transforms_augmix.py and augmix_ops.py), on [0, 1] images.

One view of an image x:

1. pre-augmentation: "crop_flip" (their CIFAR one: zero-pad 4 pixels, random crop
   back to the size, horizontal flip with probability 0.5), "resized_crop_flip"
   (their ImageNet one: random resized crop, scale 0.08..1, ratio 3/4..4/3, and the
   flip) or "none"; call the result x0;
2. `width` (3) chains, each 1 to 3 operations drawn uniformly from autocontrast,
   equalize, posterize, rotate, solarize, shear x/y, translate x/y (AugMix's list
   without the ImageNet-C corruptions' relatives), at `severity` (1);
3. view = m x0 + (1 - m) sum_i w_i chain_i(x0), w ~ Dirichlet(1, 1, 1), m ~ Beta(1, 1).

Operation magnitudes follow augmix_ops at level l = U(0.1, severity): rotate int(3 l)
degrees, posterize 4 - int(0.4 l) bits, solarize above (256 - int(25.6 l)) / 256,
shear 0.03 l, translate int(l size / 30) pixels, each with a random sign where
signed. Shears here are about the image centre (PIL's are about the corner: the same
shear, moved by at most 0.03 H / 2 pixels). Random numbers come from torch's global
generator, drawn per view.
"""
from __future__ import annotations

import math

import torch
from torch.distributions import Beta, Dirichlet
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

OPERATIONS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")
PREAUGMENTATIONS = ("crop_flip", "resized_crop_flip", "none")
_BILINEAR = InterpolationMode.BILINEAR


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _sign() -> float:
    return -1.0 if float(torch.rand(())) > 0.5 else 1.0


def operate(img: torch.Tensor, op: str, severity: float) -> torch.Tensor:
    """One AugMix operation on a (C, H, W) image in [0, 1]."""
    level = _uniform(0.1, severity)
    h, w = img.shape[-2:]
    if op == "autocontrast":
        return TF.autocontrast(img)
    if op == "equalize":
        return TF.equalize(img)
    if op == "posterize":
        return TF.posterize(img, 4 - int(level * 4 / 10))
    if op == "solarize":
        return TF.solarize(img, (256 - int(level * 256 / 10)) / 256)
    if op == "rotate":
        return TF.rotate(img, _sign() * int(level * 30 / 10), interpolation=_BILINEAR)
    if op in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(_sign() * level * 0.3 / 10))
        shear = [degrees, 0.0] if op == "shear_x" else [0.0, degrees]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=_BILINEAR)
    if op in ("translate_x", "translate_y"):
        pixels = _sign() * int(level * (w if op == "translate_x" else h) / 3 / 10)
        shift = [pixels, 0] if op == "translate_x" else [0, pixels]
        return TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=_BILINEAR)
    raise ValueError(f"augmix: unknown operation {op!r}; known: {OPERATIONS}")


def preaugment(img: torch.Tensor, kind: str) -> torch.Tensor:
    h, w = img.shape[-2:]
    if kind == "none":
        return img
    if kind == "crop_flip":
        padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
        top, left = int(torch.randint(0, 9, ())), int(torch.randint(0, 9, ()))
        img = padded[..., top:top + h, left:left + w]
    elif kind == "resized_crop_flip":
        img = _random_resized_crop(img)
    else:
        raise ValueError(f"augmix: unknown pre-augmentation {kind!r}; known: {PREAUGMENTATIONS}")
    return TF.horizontal_flip(img) if float(torch.rand(())) < 0.5 else img


def _random_resized_crop(img: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomResizedCrop(size), scale (0.08, 1), ratio (3/4, 4/3), on torch's RNG."""
    h, w = img.shape[-2:]
    for _ in range(10):
        area = h * w * _uniform(0.08, 1.0)
        ratio = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
            return TF.resized_crop(img, top, left, ch, cw, [h, w], interpolation=_BILINEAR, antialias=True)
    side = min(h, w)  # torchvision's fallback: the central crop
    return TF.resize(TF.center_crop(img, [side, side]), [h, w], interpolation=_BILINEAR, antialias=True)


def augmix(img: torch.Tensor, severity: float = 1.0, width: int = 3, preaugmentation: str = "crop_flip") -> torch.Tensor:
    """One AugMix view of a (C, H, W) image in [0, 1]."""
    x0 = preaugment(img, preaugmentation)
    weights = Dirichlet(torch.ones(width)).sample().tolist()
    m = float(Beta(torch.tensor(1.0), torch.tensor(1.0)).sample())
    mix = torch.zeros_like(x0)
    for w in weights:
        chain = x0
        for _ in range(int(torch.randint(1, 4, ()))):
            chain = operate(chain, OPERATIONS[int(torch.randint(len(OPERATIONS), ()))], severity)
        mix = mix + w * chain
    return m * x0 + (1 - m) * mix


def augmix_views(img: torch.Tensor, num_views: int, severity: float = 1.0, width: int = 3,
                 preaugmentation: str = "crop_flip") -> torch.Tensor:
    """`num_views` independent AugMix views (V, C, H, W) of one (C, H, W) image."""
    if img.dim() != 3:
        raise ValueError(f"augmix: expected one (C, H, W) image, got shape {tuple(img.shape)}")
    return torch.stack([augmix(img, severity, width, preaugmentation) for _ in range(num_views)])
