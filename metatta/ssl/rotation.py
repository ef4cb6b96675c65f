"""Rotation prediction, the self-supervised task of joint-training TTT (Sun et al., ICML 2020).

Labels 0..3 are rotations by 0, 90, 180 and 270 degrees (counter-clockwise,
`torch.rot90` on the (H, W) axes). Following the authors' code
(yueatsprograms/ttt_cifar_release, `rotate_batch`): training rotates each
image by one random rotation ("rand"); at test time every image is rotated all
four ways ("expand", a 4x larger batch), which has no sampling noise.
90-degree rotations need square images; other sizes are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_ROTATIONS = 4
MODES = ("rand", "expand")


def rotate(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotate image i of a (B, C, H, W) batch by labels[i] * 90 degrees."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation: needs a (B, C, H, W) batch of square images, got {tuple(x.shape)}")
    if labels.shape != (len(x),):
        raise ValueError(f"rotation: {len(x)} images but labels of shape {tuple(labels.shape)}")
    out = x.clone()
    for k in range(1, NUM_ROTATIONS):
        idx = (labels == k).nonzero().flatten().to(x.device)
        if len(idx):
            out[idx] = torch.rot90(x[idx], k, dims=(-2, -1))
    return out


def rotate_batch(x: torch.Tensor, mode: str = "rand",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated images, rotation labels): one random rotation per image ("rand") or all four ("expand")."""
    if mode == "rand":
        device = generator.device if generator is not None else torch.device("cpu")
        labels = torch.randint(0, NUM_ROTATIONS, (len(x),), generator=generator, device=device).to(x.device)
    elif mode == "expand":
        labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(len(x))
        x = x.repeat(NUM_ROTATIONS, *([1] * (x.ndim - 1)))
    else:
        raise ValueError(f"rotate_batch: unknown mode {mode!r}; use one of {MODES}")
    return rotate(x, labels), labels


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the rotation head's (N, 4) logits."""
    if logits.ndim != 2 or logits.shape[1] != NUM_ROTATIONS:
        raise ValueError(f"rotation_loss: logits must be (N, {NUM_ROTATIONS}), got {tuple(logits.shape)}")
    return F.cross_entropy(logits, labels)
