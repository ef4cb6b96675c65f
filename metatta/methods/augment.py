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
import math

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

    def views(self, x: torch.Tensor, num_views: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`num_views` augmentations at once, (num_views, B, C, H, W): `cotta_augment_views`."""
        return cotta_augment_views(x, num_views, soft=self.soft, noise_std=self.noise_std, generator=generator)

    def single_view(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmentation through the batched path: the distribution of `forward`, about 6x
        faster (measured 5.9 vs 35 ms at 200 x 1 x 28 x 28: the affine and blur are only computed
        on the centre crop), with a different random-number stream."""
        return self.views(x, 1, generator)[0]

    def extra_repr(self) -> str:
        return f"soft={self.soft}, noise_std={self.noise_std}"


# ---- batched views ----------------------------------------------------------------------------
# `cotta_augment_views(x, n)` returns n CoTTA augmentations of a batch at once, as an (n, B, C, H, W)
# tensor, with the pipeline of `cotta_augment` applied in batched tensor ops. What is equivalent:
#
# - per view, the random parameters have the same joint distribution as one `cotta_augment` call:
#   a uniform random order of the five colour ops (argsort of 5 uniforms instead of `randperm`),
#   each factor uniform in its range and independent of the order (`cotta_augment` draws the
#   factors in the order the ops run, which is the same joint distribution), the angle, the
#   rounded translation (round half to even, as Python's `round`), the scale, the blur sigma and
#   the flip coin; views are independent of each other, and one set is shared by all B images
#   of a view, as in `cotta_augment` (and the authors' code, which transforms the batch tensor);
# - the noise is drawn per pixel, per view, N(0, noise_std^2), as there;
# - given the same parameters and noise, the output equals `cotta_augment` up to float
#   rounding (tests/test_cotta_speed.py draws the parameters exactly as `cotta_augment` does
#   from a seeded generator and compares): the colour ops are the torchvision formulas, the
#   affine uses torchvision's inverse matrix, grid (`_affine_grid`) and fill-0 mask blending,
#   the 5x5 Gaussian blur is applied as its two separable 1-D passes, and the affine and the
#   blur are only computed on the centre crop plus the blur's margin (the rest is cropped away).
#
# What is not equivalent: the random-number stream. The same seed gives different views than n
# calls of `cotta_augment` (the draws are made in a different order, all at once).

_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")


@dataclasses.dataclass
class ViewParams:
    """Random parameters of n augmented views (one row per view), on the CPU."""

    order: torch.Tensor  # (n, 5) long: the colour ops (indices into _OPS) in the order they run
    factors: torch.Tensor  # (n, 5): brightness, contrast, saturation, hue, gamma factors
    angle: torch.Tensor  # (n,) degrees
    translate: torch.Tensor  # (n, 2) pixels (x, y), integer-valued
    scale: torch.Tensor  # (n,)
    sigma: torch.Tensor  # (n,) blur sigma
    flip: torch.Tensor  # (n,) bool

    def __len__(self) -> int:
        return len(self.angle)

    def view(self, i: int) -> "ViewParams":
        return ViewParams(*(getattr(self, f.name)[i : i + 1] for f in dataclasses.fields(self)))


def _padded_size(height: int, width: int) -> tuple[int, int]:
    return height + 2 * (height // 2), width + 2 * (width // 2)


def draw_view_params(
    num_views: int,
    image_size: tuple[int, int],
    ranges: AugmentRanges = STRONG,
    generator: torch.Generator | None = None,
) -> ViewParams:
    """Independent parameters for `num_views` views of (H, W) images (see the notes above)."""
    device = _gen_device(generator)

    def uniform(low, high, *shape):
        low = torch.as_tensor(low, dtype=torch.float64)
        high = torch.as_tensor(high, dtype=torch.float64)
        return low + (high - low) * torch.rand(num_views, *shape, generator=generator, device=device).double().cpu()

    padded_h, padded_w = _padded_size(*image_size)
    order = torch.rand(num_views, 5, generator=generator, device=device).cpu().argsort(1)
    lows = torch.tensor([getattr(ranges, op)[0] for op in _OPS], dtype=torch.float64)
    highs = torch.tensor([getattr(ranges, op)[1] for op in _OPS], dtype=torch.float64)
    factors = uniform(lows, highs, 5)
    angle = uniform(-ranges.degrees, ranges.degrees)
    max_shift = torch.tensor([ranges.translate * padded_w, ranges.translate * padded_h], dtype=torch.float64)
    translate = uniform(-max_shift, max_shift, 2).round()
    scale = uniform(*ranges.scale)
    sigma = uniform(*ranges.blur_sigma)
    flip = torch.rand(num_views, generator=generator, device=device).cpu() < ranges.hflip_prob
    return ViewParams(order, factors, angle, translate, scale, sigma, flip)


def _per_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _color_op(op: int, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One colour op on (n, B, C, H, W) views, one factor per view; the torchvision formulas."""
    f = _per_view(factor, y)
    if op == 0:  # adjust_brightness
        return (y * f).clamp(0.0, 1.0)
    if op == 1:  # adjust_contrast: blend with the mean grey level of each image
        grey = TF.rgb_to_grayscale(y) if y.shape[-3] == 3 else y
        return (y * f + grey.mean((-3, -2, -1), keepdim=True) * (1.0 - f)).clamp(0.0, 1.0)
    if op == 2:  # adjust_saturation: blend with the grey image
        return (y * f + TF.rgb_to_grayscale(y) * (1.0 - f)).clamp(0.0, 1.0)
    if op == 3:  # adjust_hue: rotate the hue in HSV
        from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

        h, s, v = _rgb_to_hsv(y).unbind(dim=-3)
        h = (h + f.squeeze(-3)).remainder(1.0)
        return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return y.clamp(1e-8, 1.0).pow(f)  # adjust_gamma after their clamp


def color_jitter_views(y: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Colour ops on (n, B, C, H, W) views, in place where only some views run an op: view i runs
    the ops order[i, 0], order[i, 1], ... (indices into brightness, contrast, saturation, hue,
    gamma; fewer than five columns run fewer ops) with its factors[i, op] (n, 5), the torchvision
    formulas. Saturation and hue leave 1-channel images unchanged. AdaContrast's per-image colour
    jitter uses it with one image per view."""
    skip = (2, 3) if y.shape[-3] == 1 else ()  # saturation and hue: identity for 1 channel
    for position in range(order.shape[1]):
        ops = order[:, position]
        for op in range(5):
            if op in skip:
                continue
            idx = (ops == op).nonzero().flatten()
            if len(idx) == 0:
                continue
            if len(idx) == len(ops):
                y = _color_op(op, y, factors[:, op])
            else:
                y[idx.to(y.device)] = _color_op(op, y[idx.to(y.device)], factors[idx, op])
    return y


def _affine_blur_views(y: torch.Tensor, params: ViewParams, ranges: AugmentRanges) -> torch.Tensor:
    """`random_affine_blur` per view: edge padding, affine (torchvision's inverse matrix, grid and
    fill-0 mask blending), 5x5 Gaussian blur, centre crop; only the crop (plus the blur margin) is
    computed when the padding leaves room for the margin, else the whole padded image is."""
    n, b, c, height, width = y.shape
    dtype, device = y.dtype, y.device
    pad_h, pad_w = height // 2, width // 2
    padded = nnf.pad(y.reshape(n * b, c, height, width), (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    padded_h, padded_w = padded.shape[-2:]
    k = ranges.blur_kernel
    m = k // 2
    top = int(round((padded_h - height) / 2.0))
    left = int(round((padded_w - width) / 2.0))
    restricted = top >= m and left >= m and top + height + m <= padded_h and left + width + m <= padded_w
    if restricted:  # output rows/cols of the affine that the blur and the crop need
        rows = torch.arange(top - m, top + height + m, device=device, dtype=dtype)
        cols = torch.arange(left - m, left + width + m, device=device, dtype=dtype)
    else:
        rows = torch.arange(padded_h, device=device, dtype=dtype)
        cols = torch.arange(padded_w, device=device, dtype=dtype)
    # torchvision's _affine_grid: pixel coordinates relative to the centre, theta applied, then
    # normalized by half the (input = output) size.
    gx = (cols - (padded_w - 1) * 0.5).view(1, 1, -1)
    gy = (rows - (padded_h - 1) * 0.5).view(1, -1, 1)
    rot = torch.deg2rad(params.angle)
    cos, sin = torch.cos(rot) / params.scale, torch.sin(rot) / params.scale
    tx, ty = params.translate[:, 0], params.translate[:, 1]
    m0, m1, m3, m4 = cos, sin, -sin, cos  # _get_inverse_affine_matrix, centre 0, no shear
    m2 = -m0 * tx - m1 * ty
    m5 = -m3 * tx - m4 * ty
    theta = torch.stack([m0, m1, m2, m3, m4, m5], 1).to(device=device, dtype=dtype).view(n, 6, 1, 1)
    grid_x = (theta[:, 0] * gx + theta[:, 1] * gy + theta[:, 2]) / (0.5 * padded_w)
    grid_y = (theta[:, 3] * gx + theta[:, 4] * gy + theta[:, 5]) / (0.5 * padded_h)
    grid = torch.stack([grid_x, grid_y], -1)  # (n, rows, cols, 2)
    # torchvision samples a ones channel with the image and blends the fill with it; the mask
    # is the same for every image of a view, so it is sampled once per view here.
    ones = torch.ones((n, 1, padded_h, padded_w), dtype=dtype, device=device)
    mask = nnf.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    grid = grid.unsqueeze(1).expand(n, b, *grid.shape[1:]).reshape(n * b, *grid.shape[1:])
    out = nnf.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.view(n, b, c, *out.shape[-2:]) * mask.unsqueeze(1)  # fill 0: mask * (img - 0) + 0
    if not restricted:
        out = nnf.pad(out.flatten(0, 1), (m, m, m, m), mode="reflect").view(n, b, c, padded_h + 2 * m, -1)
    # Separable Gaussian blur (torchvision's kernel: softmax(-(x / sigma)^2) on linspace(-lim, lim)).
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    xs = torch.linspace(-lim, lim, steps=k, dtype=torch.float64)
    kernel = torch.softmax(-(xs.view(1, -1) / params.sigma.view(-1, 1)).pow(2), dim=1).to(device=device, dtype=dtype)
    kernel = kernel.view(n, 1, 1, 1, 1, k)  # kernel[..., i]: one weight per view
    out_h, out_w = out.shape[-2] - 2 * m, out.shape[-1] - 2 * m
    out = sum(kernel[..., i] * out[..., i : i + out_w] for i in range(k))
    out = sum(kernel[..., i] * out[..., i : i + out_h, :] for i in range(k))
    if not restricted:
        out = out[..., top : top + height, left : left + width]
    return out


def apply_view_params(
    x: torch.Tensor,
    params: ViewParams,
    *,
    soft: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The n views of `params` of a (B, C, H, W) batch in [0, 1] -> (n, B, C, H, W) in [0, 1];
    `noise` (n, B, C, H, W), already scaled, is added before the final clip."""
    _check_batch(x)
    ranges = SOFT if soft else STRONG
    y = x.clamp(0.0, 1.0).unsqueeze(0).expand(len(params), *x.shape).contiguous()
    y = color_jitter_views(y, params.order, params.factors)
    y = _affine_blur_views(y, params, ranges)
    flip = params.flip.to(y.device).view(-1, 1, 1, 1, 1)
    y = torch.where(flip, y.flip(-1), y)
    if noise is not None:
        y = y + noise.to(device=y.device, dtype=y.dtype)
    return y.clamp(0.0, 1.0)


def cotta_augment_views(
    x: torch.Tensor,
    num_views: int,
    *,
    soft: bool = False,
    noise_std: float = 0.005,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`num_views` independent CoTTA augmentations of a (B, C, H, W) batch in [0, 1], in batched
    tensor ops: an (num_views, B, C, H, W) tensor in [0, 1]. Each view has the distribution of one
    `cotta_augment(x)` (see the notes above this function); the random stream differs."""
    _check_batch(x)
    if num_views < 1:
        raise ValueError(f"cotta_augment_views: num_views must be >= 1, got {num_views}")
    params = draw_view_params(num_views, tuple(x.shape[-2:]), SOFT if soft else STRONG, generator)
    noise = None
    if noise_std > 0:
        noise_device = generator.device if generator is not None else x.device
        noise = noise_std * torch.randn((num_views, *x.shape), generator=generator, device=noise_device, dtype=x.dtype)
    return apply_view_params(x, params, soft=soft, noise=noise)
