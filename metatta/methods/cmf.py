"""CMF: continual momentum filtering (Lee & Chang, "Continual Momentum Filtering on
Parameter Space for Online Test-time Adaptation", ICLR 2024, openreview BllUWdpIOA;
code: the broadest public TTA codebase, mariodoebler/test-time-adaptation
classification/methods/cmf.py, "based on the code from" the paper's).

ROID's objective (`metatta.methods.roid`: diversity/certainty weights, soft likelihood
ratio + consistency, prior correction of the output), with ROID's weight ensembling
replaced by a Kalman filter over the adapted parameters. A hidden model h (the
adapted parameters, starting at the source ones theta_0) with variance v (0 at first)
is, after every optimizer step on the target model theta:

1. predicted: h <- alpha h + (1 - alpha) theta_0;  v <- alpha^2 v + q;
2. updated with theta as the observation: beta = (1 - q) / (v + 1 - q), clipped
   below at 0.89 and set to 1 from 0.9999 on; v <- beta v; h <- beta h + (1 - beta) theta;
3. fused into the target: theta <- gamma theta + (1 - gamma) h.

q = Q * (number of adapted parameters) / 38,400, Q = 0.005 (their param_size_ratio).
Their TYPE "op" fuses the predicted h instead of the updated one, but in their code
both names point to the same tensors after step 2, so "op" equals the default "lp";
only "lp" is implemented. Adapted: the normalization affines (BN on batch
statistics), as ROID.

Defaults: their CIFAR-10-C setting (cfgs/cifar10_c/cmf.yaml, conf.py): Adam lr 1e-3,
batch 200, alpha 0.99, gamma 0.99, Q 0.005, and ROID's weighting options.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from metatta.methods.base import register
from metatta.methods.common import ema_update
from metatta.methods.roid import ROID, ROIDConfig


@dataclasses.dataclass
class CMFConfig(ROIDConfig):
    alpha: float = 0.99  # CMF.ALPHA: the hidden model's pull towards the source (predict step)
    gamma: float = 0.99  # CMF.GAMMA: theta <- gamma theta + (1 - gamma) h
    q: float = 0.005  # CMF.Q: process noise per 38,400 adapted parameters

    def validate(self) -> None:
        super().validate()
        for name in ("alpha", "gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"cmf: config.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.q < 0:
            raise ValueError(f"cmf: config.q must be >= 0, got {self.q}")


def kalman_gain(variance: float, q: float) -> float:
    """beta = (1 - q) / (v + 1 - q), at least 0.89, 1 from 0.9999 on (their clipping)."""
    beta = (1 - q) / (variance + 1 - q)
    beta = max(beta, 0.89)
    return 1.0 if beta >= 0.9999 else beta


@register("cmf")
class CMF(ROID):
    Config = CMFConfig

    def init_extra_state(self) -> None:
        super().init_extra_state()
        adapted = [p for p in self.model.parameters() if p.requires_grad]
        self.hidden = [p.detach().clone() for p in adapted]
        self.hidden_var = 0.0
        self.process_noise = self.config.q * sum(p.numel() for p in adapted) / 38400

    def after_update(self) -> None:
        self.filter_parameters()

    @torch.no_grad()
    def filter_parameters(self) -> None:
        cfg = self.config
        self.hidden_var = cfg.alpha ** 2 * self.hidden_var + self.process_noise
        beta = kalman_gain(self.hidden_var, self.process_noise)
        self.hidden_var = beta * self.hidden_var
        adapted = [p for p, _ in self._ensemble_pairs]
        ema_update(zip(self.hidden, [source for _, source in self._ensemble_pairs]), cfg.alpha)  # predict
        ema_update(zip(self.hidden, adapted), beta)  # update
        ema_update(zip(adapted, self.hidden), cfg.gamma)  # fuse

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "hidden": self.hidden, "hidden_var": self.hidden_var}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.hidden, self.hidden_var = state["hidden"], state["hidden_var"]
