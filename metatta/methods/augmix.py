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

`augmix_views` makes V views at once: it draws every view's random choices first, in the
order V `augmix` calls draw them, then applies each chain step to all views together (the
geometric operations as one batched warp), so it returns exactly the views of V `augmix`
calls, bit for bit (tested), about 4x faster (32 views of a 28x28 image, CPU).
"""
from __future__ import annotations

import dataclasses
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
    """`num_views` independent AugMix views (V, C, H, W) of one (C, H, W) image.

    The same views as `num_views` calls of `augmix` (same random draws, in the same order, from
    torch's global generator), made batched: every random number is drawn first
    (`draw_view_plans`), then each step of the chains is applied to all the views it concerns at
    once (`apply_view_plans`), 10-20x faster than view by view on CPU."""
    if img.dim() != 3:
        raise ValueError(f"augmix: expected one (C, H, W) image, got shape {tuple(img.shape)}")
    plans = draw_view_plans(img, num_views, severity, width, preaugmentation)
    return apply_view_plans(img, plans, preaugmentation)


# ---- batched views ------------------------------------------------------------------------------
@dataclasses.dataclass
class ViewPlan:
    """Every random choice of one AugMix view: the pre-augmentation (crop offsets or a resized
    crop box, the flip), the chain weights, the mixing weight m, and per chain its operations as
    (operation index, level, sign)."""

    crop: tuple[int, ...] | None
    flip: bool
    weights: list[float]
    m: float
    chains: list[list[tuple[int, float, float]]]


def _draw_operation(op: str, severity: float) -> tuple[float, float]:
    """The level and sign `operate` draws for `op`, in its order (sign 1.0 where unsigned)."""
    level = _uniform(0.1, severity)
    sign = _sign() if op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y") else 1.0
    return level, sign


def _draw_preaugmentation(img: torch.Tensor, kind: str) -> tuple[tuple[int, ...] | None, bool]:
    """`preaugment`'s draws: ((top, left) or a resized-crop box (top, left, h, w) or None, flip)."""
    h, w = img.shape[-2:]
    if kind == "none":
        return None, False
    if kind == "crop_flip":
        crop = (int(torch.randint(0, 9, ())), int(torch.randint(0, 9, ())))
    elif kind == "resized_crop_flip":
        crop = _draw_resized_crop(h, w)
    else:
        raise ValueError(f"augmix: unknown pre-augmentation {kind!r}; known: {PREAUGMENTATIONS}")
    return crop, float(torch.rand(())) < 0.5


def _draw_resized_crop(h: int, w: int) -> tuple[int, ...] | None:
    """`_random_resized_crop`'s draws: the box, or None for its central-crop fallback."""
    for _ in range(10):
        area = h * w * _uniform(0.08, 1.0)
        ratio = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ())), ch, cw
    return None


def draw_view_plans(img: torch.Tensor, num_views: int, severity: float = 1.0, width: int = 3,
                    preaugmentation: str = "crop_flip") -> list[ViewPlan]:
    """The random choices of `num_views` `augmix` calls, drawn in the order those calls draw them."""
    plans = []
    dirichlet, beta = Dirichlet(torch.ones(width)), Beta(torch.tensor(1.0), torch.tensor(1.0))
    for _ in range(num_views):
        crop, flip = _draw_preaugmentation(img, preaugmentation)
        weights = dirichlet.sample().tolist()
        m = float(beta.sample())
        chains = []
        for _ in range(width):
            chain = []
            for _ in range(int(torch.randint(1, 4, ()))):
                op = int(torch.randint(len(OPERATIONS), ()))
                chain.append((op, *_draw_operation(OPERATIONS[op], severity)))
            chains.append(chain)
        plans.append(ViewPlan(crop, flip, weights, m, chains))
    return plans


def _preaugmented(img: torch.Tensor, plans: list[ViewPlan], kind: str) -> torch.Tensor:
    """x0 of every view, (V, C, H, W)."""
    h, w = img.shape[-2:]
    if kind == "none":
        return img.unsqueeze(0).expand(len(plans), *img.shape).clone()
    if kind == "crop_flip":
        padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
        views = torch.stack([padded[..., p.crop[0]:p.crop[0] + h, p.crop[1]:p.crop[1] + w] for p in plans])
    else:
        views = torch.stack([
            TF.resize(TF.center_crop(img, [min(h, w)] * 2), [h, w], interpolation=_BILINEAR, antialias=True)
            if p.crop is None else
            TF.resized_crop(img, p.crop[0], p.crop[1], p.crop[2], p.crop[3], [h, w], interpolation=_BILINEAR,
                            antialias=True)
            for p in plans])
    flips = torch.tensor([p.flip for p in plans], device=img.device).view(-1, 1, 1, 1)
    return torch.where(flips, views.flip(-1), views)


def _inverse_affine(angle: float, translate: tuple[float, float], shear: tuple[float, float]) -> list[float]:
    """torchvision's inverse affine matrix (scale 1, centre 0) for `TF.affine` / `TF.rotate`."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += -matrix[0] * tx - matrix[1] * ty
    matrix[5] += -matrix[3] * tx - matrix[4] * ty
    return matrix


def _warp(images: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """Bilinear warp of each image by its inverse affine matrix, zero fill: torchvision's tensor
    affine grid (pixel-centred, normalized after the matrix), one grid per image."""
    n, _, h, w = images.shape
    theta = torch.tensor(matrices, dtype=images.dtype, device=images.device).view(n, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=images.dtype, device=images.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=images.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=images.device).unsqueeze(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h], dtype=images.dtype, device=images.device))
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometric_matrix(op: str, level: float, sign: float, h: int, w: int) -> list[float] | None:
    """The inverse matrix `operate` uses for a geometric `op`; None where it leaves the image as
    it is (a rotation by 0 degrees: torchvision's copy fast path)."""
    if op == "rotate":
        angle = (sign * int(level * 30 / 10)) % 360
        if angle == 0:
            return None
        if angle in (90, 180, 270):
            raise ValueError("augmix: batched rotation by a multiple of 90 degrees is not implemented")
        return _inverse_affine(-angle, (0.0, 0.0), (0.0, 0.0))
    if op in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(sign * level * 0.3 / 10))
        return _inverse_affine(0.0, (0.0, 0.0), (degrees, 0.0) if op == "shear_x" else (0.0, degrees))
    pixels = float(sign * int(level * (w if op == "translate_x" else h) / 3 / 10))
    return _inverse_affine(0.0, (pixels, 0.0) if op == "translate_x" else (0.0, pixels), (0.0, 0.0))


GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _apply_step(images: torch.Tensor, steps: list[tuple[int, int, float, float]]) -> torch.Tensor:
    """One chain step: `operate` with (image row, operation index, level, sign) for each row named
    in `steps` (each row once); the geometric operations share one warp."""
    h, w = images.shape[-2:]
    out = images.clone()
    warps: list[tuple[int, list[float]]] = []
    by_op: dict[str, list[tuple[int, float]]] = {}
    for row, op_index, level, sign in steps:
        op = OPERATIONS[op_index]
        if op in GEOMETRIC:
            matrix = _geometric_matrix(op, level, sign, h, w)
            if matrix is not None:
                warps.append((row, matrix))
        else:
            by_op.setdefault(op, []).append((row, level))
    if warps:
        rows = [r for r, _ in warps]
        out[rows] = _warp(images[rows], [m for _, m in warps])
    for op, items in by_op.items():
        rows = [r for r, _ in items]
        if op == "autocontrast":
            out[rows] = TF.autocontrast(images[rows])
        elif op == "equalize":
            out[rows] = TF.equalize(images[rows])
        elif op == "solarize":
            thresholds = torch.tensor([(256 - int(level * 256 / 10)) / 256 for _, level in items],
                                      dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)
            selected = images[rows]
            out[rows] = torch.where(selected >= thresholds, 1.0 - selected, selected)
        elif op == "posterize":
            for bits in sorted({4 - int(level * 4 / 10) for _, level in items}):
                same = [r for r, level in items if 4 - int(level * 4 / 10) == bits]
                out[same] = TF.posterize(images[same], bits)
        else:
            raise ValueError(f"augmix: unknown operation {op!r}; known: {OPERATIONS}")
    return out


def apply_view_plans(img: torch.Tensor, plans: list[ViewPlan], preaugmentation: str = "crop_flip") -> torch.Tensor:
    """The views `plans` describe, (V, C, H, W). The chains of all views are one (width * V)
    batch (chain c of view v at row c * V + v); step k applies every row's k-th operation, rows
    grouped by operation."""
    x0 = _preaugmented(img, plans, preaugmentation)
    views, width = len(plans), len(plans[0].weights)
    operations = [p.chains[c] for c in range(width) for p in plans]
    chains = x0.repeat(width, 1, 1, 1)
    for k in range(max(len(ops) for ops in operations)):
        chains = _apply_step(chains, [(row, *ops[k]) for row, ops in enumerate(operations) if len(ops) > k])
    weights = torch.tensor([p.weights for p in plans], dtype=img.dtype, device=img.device)
    mix = torch.zeros_like(x0)
    for c in range(width):
        mix = mix + weights[:, c].view(-1, 1, 1, 1) * chains[c * views:(c + 1) * views]
    m = torch.tensor([p.m for p in plans], dtype=img.dtype, device=img.device).view(-1, 1, 1, 1)
    one_minus_m = torch.tensor([1 - p.m for p in plans], dtype=img.dtype, device=img.device).view(-1, 1, 1, 1)
    return m * x0 + one_minus_m * mix
