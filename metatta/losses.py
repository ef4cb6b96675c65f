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
