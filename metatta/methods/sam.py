"""Sharpness-aware minimization (SAM, Foret et al. 2021) around any base optimizer.

SAR (Niu et al. 2023) uses SAM through davda54/sam, which builds its own base
optimizer from a class. Here SAM wraps an optimizer that already exists, so
whatever `optimizer_factory` builds (SGD, Adam, the learned MGG optimizer) does
the actual update:

    first_step():  w <- w + e(w),  e(w) = rho * g / ||g||   (adaptive: |w|^2 * g * rho / |||w| g||)
    (caller recomputes the loss and gradients at w + e(w))
    second_step(): w <- w (restored), then base_optimizer.step() with the new gradients

The perturbation and the restore are exact (the pre-perturbation tensors are kept,
not subtracted back). `state_dict()` / `load_state_dict()` are the base
optimizer's, so `TTAMethod.reset()` restores momentum/moments as usual.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class SAM:
    """Duck-typed optimizer (param_groups, zero_grad, step, state_dict) wrapping `base_optimizer`."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if not hasattr(base_optimizer, "param_groups") or not callable(getattr(base_optimizer, "step", None)):
            raise TypeError(f"SAM: base_optimizer must be an optimizer, got {type(base_optimizer).__name__}")
        if not rho >= 0.0:
            raise ValueError(f"SAM: rho must be non-negative, got {rho!r}")
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self._unperturbed: dict[torch.Tensor, torch.Tensor] = {}

    # ---- the optimizer surface the base loop uses --------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @property
    def state(self):
        return self.base_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._unperturbed.clear()
        self.base_optimizer.load_state_dict(state_dict)

    # ---- SAM ----------------------------------------------------------------------------
    @property
    def perturbed(self) -> bool:
        return bool(self._unperturbed)

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """||g|| (or ||w * g|| for adaptive SAM) over all parameters that have a gradient."""
        params = self._params_with_grad()
        if not params:
            return torch.zeros(())
        device = params[0].device
        norms = [((p.abs() * p.grad) if self.adaptive else p.grad).norm(p=2).to(device) for p in params]
        return torch.linalg.vector_norm(torch.stack(norms), ord=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to w + e(w) along the current gradients."""
        if self.perturbed:
            raise RuntimeError("SAM.first_step called twice without second_step/unperturb")
        params = self._params_with_grad()
        if params:
            scale = self.rho / (self.grad_norm() + 1e-12)
            for p in params:
                self._unperturbed[p] = p.detach().clone()
                e_w = p.grad * scale.to(p)
                if self.adaptive:
                    e_w = e_w * p.pow(2)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self) -> None:
        """Return to w exactly (without an update)."""
        for p, original in self._unperturbed.items():
            p.copy_(original)
        self._unperturbed.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w and update it with the gradients taken at w + e(w)."""
        self.unperturb()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Full SAM step; gradients at w must already be there, and `closure` must
        recompute the loss and call backward (it runs at w + e(w)). Returns its loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and its gradients")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho}, adaptive={self.adaptive}, base={self.base_optimizer!r})"
