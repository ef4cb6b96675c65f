"""Dealing labelled domains out to parallel workers, with a validation set held back."""
from __future__ import annotations

import numpy as np
import torch

from metatta.data.types import DomainData


def split_shares(domains: list[DomainData], train_images: int, num_parts: int,
                 val_images: int) -> tuple[list[list[DomainData]], list[DomainData]]:
    """Training shares (one list of domains per worker) and the validation domains.

    Per domain the first `train_images / #domains` images train (dealt round-robin
    to the `num_parts` workers) and the next `val_images` validate."""
    per_domain = train_images // len(domains)
    shares: list[list[DomainData]] = [[] for _ in range(num_parts)]
    val = []
    for d in domains:
        if len(d) < per_domain + val_images:
            raise ValueError(f"{d.name}: {len(d)} images, need {per_domain} to train + {val_images} to validate")
        for a in range(num_parts):
            idx = np.arange(a, per_domain, num_parts)
            shares[a].append(DomainData(d.corruption, d.severity, np.asarray(d.images[idx]), np.asarray(d.labels[idx])))
        rows = slice(per_domain, per_domain + val_images)
        val.append(DomainData(d.corruption, d.severity, np.asarray(d.images[rows]), np.asarray(d.labels[rows])))
    return shares, val


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) images as a float (N, C, H, W) tensor in [0, 1] (a copy: memmaps are read-only)."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255)
