"""Plain containers passed between data, methods and evaluation."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    """One test batch: images float32 (B, C, H, W) in [0, 1], labels int64 (B,),
    and the name of the domain it was drawn from (e.g. "fog-5")."""

    x: torch.Tensor
    y: torch.Tensor
    domain: str


@dataclasses.dataclass
class DomainData:
    """All images of one corruption at one severity, as stored on disk."""

    corruption: str
    severity: int
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)

    @property
    def name(self) -> str:
        return f"{self.corruption}-{self.severity}"

    def __len__(self) -> int:
        return len(self.labels)
