"""Cross-encoder alignment (CTA's stage 2): a CLIP-style symmetric InfoNCE.

Row i of `f_ssl` and row i of `f_sup` are one image through the SSL encoder and
through the frozen supervised encoder: the positive pair. Every other row of
the other encoder's batch is a negative. Features are L2-normalised; the
logits are their cosine similarities over a fixed temperature; the loss is the
mean of the two cross-entropies (SSL -> supervised and supervised -> SSL), as
in CLIP.

Choices the paper leaves open: the loss acts on the encoders' pooled features
directly (no projection heads), because at test time the frozen supervised
classifier reads the SSL encoder's features, so those features themselves must
land where the supervised ones are; the temperature is fixed (config, default
0.03; docs/results/cta-training.md says why it is low), not learned as in CLIP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(f_ssl: torch.Tensor, f_sup: torch.Tensor, where: str) -> None:
    if f_ssl.shape != f_sup.shape or f_ssl.ndim != 2:
        raise ValueError(f"{where}: f_ssl and f_sup must be (N, D) tensors of one shape, got "
                         f"{tuple(f_ssl.shape)} and {tuple(f_sup.shape)}")


def alignment_loss(f_ssl: torch.Tensor, f_sup: torch.Tensor, temperature: float = 0.03) -> torch.Tensor:
    """Symmetric InfoNCE between (N, D) SSL-encoder and supervised-encoder features of the same N images."""
    _check_pair(f_ssl, f_sup, "alignment_loss")
    if temperature <= 0:
        raise ValueError(f"alignment_loss: temperature must be > 0, got {temperature}")
    logits = F.normalize(f_ssl, dim=1) @ F.normalize(f_sup, dim=1).T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def feature_matching_loss(f_ssl: torch.Tensor, f_sup: torch.Tensor) -> torch.Tensor:
    """Relative squared error of the raw (unnormalised) features: mean_i ||f_ssl_i - f_sup_i||^2 over
    mean_i ||f_sup_i||^2. InfoNCE sees only directions, so the SSL features' norm is free; the frozen
    classifier reads norms too (its bias does not scale with them). Scale-free, so a weight of 1 puts
    it next to InfoNCE whatever the feature sizes."""
    _check_pair(f_ssl, f_sup, "feature_matching_loss")
    return (f_ssl - f_sup).pow(2).sum(1).mean() / f_sup.pow(2).sum(1).mean().clamp_min(1e-12)


@torch.no_grad()
def feature_agreement(f_ssl: torch.Tensor, f_sup: torch.Tensor) -> dict[str, float]:
    """How well two encoders agree: mean cosine of the positive pairs, the share of images
    whose nearest supervised feature (by cosine) is their own, and the ratio of mean feature
    norms (SSL over supervised; 1 when the scales match)."""
    _check_pair(f_ssl, f_sup, "feature_agreement")
    f_ssl, f_sup = f_ssl.float(), f_sup.float()
    sim = F.normalize(f_ssl, dim=1) @ F.normalize(f_sup, dim=1).T
    target = torch.arange(len(sim), device=sim.device)
    norm_ratio = f_ssl.norm(dim=1).mean() / f_sup.norm(dim=1).mean().clamp_min(1e-12)
    return {"cosine": float(sim.diagonal().mean()), "retrieval": float((sim.argmax(1) == target).float().mean()),
            "norm_ratio": float(norm_ratio)}
