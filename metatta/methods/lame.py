"""LAME: Laplacian adjusted maximum-likelihood estimation (Boudiaf et al., "Parameter-free
Online Test-time Adaptation", CVPR 2022; code: fiveai/LAME, src/adaptation/lame.py).

Output-only: the source model is not changed (eval mode, its BN running
statistics, no gradients). Per test batch, as in the authors' `run_step`:

1. p = softmax(model(x)), unary a = -log(p + 1e-10); z = the classifier's input
   features, L2-normalized; W = affinity(z) (N x N);
2. the assignments Y (N x K) minimize the Laplacian-regularized energy
   sum_i a_i.y_i - lambda sum_ij W_ij y_i.y_j + sum_i y_i.log y_i by the bound
   optimization of their `laplacian_optimization`: Y <- softmax(-a), then up to
   `max_steps` (100) times Y <- softmax(-a + lambda W Y), stopping (after the
   third step) when the energy changes by at most 1e-8 of itself;
3. the prediction is Y; the method returns log Y as its logits (softmax gives Y
   back, argmax is that of Y).

Affinities (`affinity`): "rbf" (default): W_ij = exp(-||z_i - z_j||^2 / (2 s^2)),
s the mean over i of the distance to its knn-th nearest point counting itself
(their code; their LAME_SIGMA is unused by it: `sigma` given here replaces s);
"knn": W_ij = 1 if z_j is among the knn nearest other points of z_i; "linear":
W = z z^T. `force_symmetry` averages W with its transpose.

Defaults: the authors' (src/config/defaults.py, configs/method/best/LAME): rbf,
knn 5, lambda 1, 100 steps, no forced symmetry; the broadest TTA codebase
(mariodoebler/test-time-adaptation) uses the same on CIFAR and ImageNet.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import classifier_layer, features_and_logits, freeze_all

AFFINITIES = ("rbf", "knn", "linear")


@dataclasses.dataclass
class LAMEConfig(MethodConfig):
    affinity: str = "rbf"  # rbf | knn | linear (LAME_AFFINITY)
    knn: int = 5  # neighbours of the knn affinity and of the rbf's scale (LAME_KNN)
    sigma: float | None = None  # rbf scale; None: the mean knn-th neighbour distance (their code)
    force_symmetry: bool = False  # W <- (W + W^T) / 2 (LAME_FORCE_SYMMETRY)
    bound_lambda: float = 1.0  # weight of the Laplacian term
    max_steps: int = 100  # bound-optimization iterations at most
    classifier: str | None = None  # the linear classifier's module name; None: the last nn.Linear

    def validate(self) -> None:
        super().validate()
        if self.affinity not in AFFINITIES:
            raise ValueError(f"lame: config.affinity must be one of {AFFINITIES}, got {self.affinity!r}")
        if self.knn < 1:
            raise ValueError(f"lame: config.knn must be >= 1, got {self.knn}")
        if self.sigma is not None and self.sigma <= 0:
            raise ValueError(f"lame: config.sigma must be > 0 or null, got {self.sigma}")
        if self.max_steps < 1:
            raise ValueError(f"lame: config.max_steps must be >= 1, got {self.max_steps}")


def pairwise_distances(z: torch.Tensor) -> torch.Tensor:
    """||z_i - z_j|| (N x N), as their code computes it (not cdist's matrix-product shortcut)."""
    return (z.unsqueeze(0) - z.unsqueeze(1)).norm(dim=-1)


def rbf_affinity(z: torch.Tensor, knn: int, sigma: float | None = None) -> torch.Tensor:
    dist = pairwise_distances(z)
    if sigma is None:
        # k smallest distances per row, the point itself (0) included: the (k-1)-th other neighbour
        sigma = dist.topk(min(knn, len(z)), dim=-1, largest=False).values[:, -1].mean()
    return torch.exp(-dist ** 2 / (2 * sigma ** 2))


def knn_affinity(z: torch.Tensor, knn: int) -> torch.Tensor:
    dist = pairwise_distances(z)
    nearest = dist.topk(min(knn + 1, len(z)), dim=-1, largest=False).indices[:, 1:]  # the first is the point itself
    return torch.zeros_like(dist).scatter_(1, nearest, 1.0)


def linear_affinity(z: torch.Tensor) -> torch.Tensor:
    return z @ z.t()


def laplacian_energy(y: torch.Tensor, unary: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
    """sum a.Y - (lambda W Y).Y + Y log Y, `pairwise` = lambda W Y."""
    return (unary * y - pairwise * y + y * torch.log(y.clamp_min(1e-20))).sum()


def laplacian_assignment(unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = 1.0,
                         max_steps: int = 100) -> tuple[torch.Tensor, int]:
    """LAME's bound optimization; returns Y and the number of updates made."""
    y = (-unary).softmax(-1)
    previous = float("inf")
    for step in range(max_steps):
        pairwise = bound_lambda * kernel @ y
        y = (pairwise - unary).softmax(-1)
        energy = float(laplacian_energy(y, unary, pairwise))
        if step > 1 and abs(energy - previous) <= 1e-8 * abs(previous):
            return y, step + 1
        previous = energy
    return y, max_steps


@register("lame")
class LAME(TTAMethod):
    Config = LAMEConfig

    def __init__(
        self,
        model: nn.Module,
        config: LAMEConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        _, self.classifier = classifier_layer(self.model, self.config.classifier)
        self.last_steps = 0  # bound-optimization updates on the latest batch (diagnostic)

    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)

    def affinity(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.affinity == "rbf":
            kernel = rbf_affinity(z, cfg.knn, cfg.sigma)
        elif cfg.affinity == "knn":
            kernel = knn_affinity(z, cfg.knn)
        else:
            kernel = linear_affinity(z)
        return 0.5 * (kernel + kernel.t()) if cfg.force_symmetry else kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_layout(x)
        if not bool(torch.isfinite(x).all()):
            return self._nonfinite_input(x)  # counted (or refused), then `predict`
        return self.predict(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = features_and_logits(self.model, self.classifier, x)
        if not bool(torch.isfinite(features).all()):
            return logits  # the model's own prediction: a NaN affinity would spoil the whole batch
        unary = -torch.log(logits.softmax(1) + 1e-10)
        kernel = self.affinity(F.normalize(features, p=2, dim=-1))
        y, self.last_steps = laplacian_assignment(unary, kernel, self.config.bound_lambda, self.config.max_steps)
        return y.clamp_min(torch.finfo(y.dtype).tiny).log()
