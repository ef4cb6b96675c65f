"""A small Vision Transformer with LayerNorm for 28x28 inputs, built from scratch with timm.

MGTTA adapts the LayerNorm affines of a ViT and aligns the CLS token after
every block with its clean statistics; this is the small-image stand-in for
their ViT-B/16. timm's `VisionTransformer` is instantiated directly (no hub,
no pretrained weights): pre-norm blocks, a class token, learned position
embeddings, classification from the final-normed CLS token.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from metatta.models.normalize import Normalize, default_stats


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
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"ViTClassifier: img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"ViTClassifier: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if mean is None or std is None:
            mean, std = default_stats(in_channels)
        self.normalize = Normalize(mean, std)
        from timm.models.vision_transformer import VisionTransformer  # timm is slow to import: only for a ViT

        self.vit = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate, global_pool="token", class_token=True,
        )

    def feature_tap_modules(self) -> list[nn.Module]:
        """Every transformer block; the recorder keeps the CLS token of each output."""
        return list(self.vit.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.normalize(x))
