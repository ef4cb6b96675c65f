"""Losses shared by the hand-written methods (`metatta.methods`) and the learned
optimizer (`metatta.learned`); it imports neither, so both can import it."""
from __future__ import annotations

import math

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits), in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def max_entropy(num_classes: int) -> float:
    """Entropy of the uniform distribution over `num_classes` classes, in nats."""
    return math.log(num_classes)


def weighted_entropy(entropy: torch.Tensor, selected: torch.Tensor, margin: float) -> torch.Tensor:
    """EATA's entropy term: mean over the selected samples of H(x) / exp(H(x) - E0), E0 = `margin`,
    the weight detached (confident samples count more)."""
    chosen = entropy[selected]
    return (chosen * torch.exp(margin - chosen.detach())).mean(0)


def reliable_entropy(logits: torch.Tensor, factor: float) -> torch.Tensor | None:
    """EATA's entropy term over the reliable samples, H(x) < factor * ln C; None when there are none."""
    entropy = softmax_entropy(logits)
    margin = factor * max_entropy(logits.shape[1])
    selected = entropy < margin
    return weighted_entropy(entropy, selected, margin) if bool(selected.any()) else None
