"""A small Vision Transformer with LayerNorm for 28x28 inputs, built from scratch with timm.

MGTTA adapts the LayerNorm affines of a ViT and aligns the CLS token after
every block with its clean statistics; this is the small-image stand-in for
their ViT-B/16. timm's `VisionTransformer` is instantiated directly (no hub,
no pretrained weights): pre-norm blocks, a class token, learned position
embeddings, classification from the final-normed CLS token.

The tokens come from one of two stems (`stem`):

- `patch` (default): timm's patch embedding, one Conv2d with kernel = stride = `patch_size`.
- `conv`: a small convolutional stem (Xiao et al., "Early convolutions help transformers see
  better", NeurIPS 2021): 3x3 stride-2 convolutions with `stem_channels` output channels, each
  followed by GELU, then a 1x1 convolution to `embed_dim`; one token per position of the last
  map (28x28 with three convolutions: 4x4 = 16 tokens). Their stem has BatchNorm; this one has
  no normalization at all, so the model keeps no batch statistics (the regime's point) and the
  norm-affine methods adapt the same LayerNorms as with the patch stem. `patch_size` is unused.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from metatta.models.normalize import Normalize, default_stats


STEMS = ("patch", "conv")


class ConvStemEmbed(nn.Module):
    """Tokens from 3x3 stride-2 convolutions + GELU and a 1x1 projection; timm's embed_layer interface
    (`num_patches`, `grid_size`, output (B, tokens, embed_dim))."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 channels: Sequence[int] = (32, 64, 128), bias: bool = True, **_timm_args):
        super().__init__()
        layers: list[nn.Module] = []
        size, previous = img_size, in_chans
        for width in channels:
            layers += [nn.Conv2d(previous, width, kernel_size=3, stride=2, padding=1), nn.GELU()]
            size, previous = (size + 1) // 2, width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(previous, embed_dim, kernel_size=1, bias=bias)
        self.img_size = (img_size, img_size)
        self.grid_size = (size, size)
        self.num_patches = size * size

    def init_weights(self) -> None:
        # timm resets every Conv2d (PyTorch's default, scaled for no activation); He init for GELU
        # keeps the activations' scale through the stack without a norm layer.
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x)).flatten(2).transpose(1, 2)


class ViTClassifier(nn.Module):
    """Normalize -> timm VisionTransformer. Inputs (B, C, img_size, img_size) in [0, 1]."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        img_size: int = 28,
        patch_size: int = 4,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.0,
        stem: str = "patch",
        stem_channels: Sequence[int] = (32, 64, 128),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"ViTClassifier: stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if stem == "conv" and (len(stem_channels) == 0 or any(int(c) < 1 for c in stem_channels)):
            raise ValueError(f"ViTClassifier: stem_channels must be a non-empty list of positive widths, "
                             f"got {list(stem_channels)}")
        if stem == "patch" and img_size % patch_size != 0:
            raise ValueError(f"ViTClassifier: img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"ViTClassifier: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if mean is None or std is None:
            mean, std = default_stats(in_channels)
        self.normalize = Normalize(mean, std)
        from timm.models.vision_transformer import VisionTransformer  # timm is slow to import: only for a ViT

        stem_args = {} if stem == "patch" else {
            "embed_layer": functools.partial(ConvStemEmbed, channels=tuple(int(c) for c in stem_channels))}
        self.vit = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate, global_pool="token", class_token=True, **stem_args,
        )

    def feature_tap_modules(self) -> list[nn.Module]:
        """Every transformer block; the recorder keeps the CLS token of each output."""
        return list(self.vit.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.normalize(x))
