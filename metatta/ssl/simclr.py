"""SimCLR's NT-Xent loss (Chen et al., ICML 2020) and its projection head.

`nt_xent(z1, z2, t)`: the 2N projections of N images under two augmentations;
each one's positive is the other view of its image, its negatives the other
2N - 2 projections of the batch. Cosine similarity divided by the temperature,
cross-entropy per anchor, mean over all 2N anchors (their `NT-Xent` exactly).

Choices the CTA paper leaves open (written here, used by metatta/ssl/objectives.py and
methods/cta.py):
- projection head: SimCLR v1's MLP, Linear -> ReLU -> Linear, on the encoder's
  pooled features (hidden width and output size in the training config);
- negatives are the images of the local batch only. Across Ray Train workers
  the batch is not all-gathered (SimCLR gathers across TPU cores), so with N
  workers each worker contrasts its own `batch_size` images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of two (N, D) batches of projections of the same N images (N >= 2)."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent: z1 and z2 must be (N, D) tensors of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if len(z1) < 2:
        raise ValueError("nt_xent: needs at least 2 images (the other images are the negatives)")
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # no self-pairs
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positives)


class MLPHead(nn.Module):
    """Linear -> ReLU -> Linear: SimCLR's projection head, and TTT's rotation head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPHead: {name} must be a positive integer, got {value!r}")
        self.dims = [in_dim, hidden_dim, out_dim]
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
