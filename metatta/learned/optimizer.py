"""`MGGOptimizer`: a trained MGG as a `torch.optim.Optimizer`.

theta <- theta - lr * s * MGG(features of theta.grad), s the MGG's learned step
scale (exp(log_step_scale); 1 for an MGG without one, the paper's), with the MGG's per-tensor
state (step, moments, GML memory) kept in `optimizer.state[p]`, so
`state_dict()` / `load_state_dict()` save and restore it like any optimizer
state: `TTAMethod.reset()` (which restores a deep copy of the optimizer state
taken at construction) thus resets the memory per domain. Any gradient method
can use it through `optimizer_factory=mgg_optimizer_factory(mgg, lr)`.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

from metatta.learned.gml import Memory
from metatta.learned.mgg import MGG, TensorState


class MGGOptimizer(torch.optim.Optimizer):
    """Learned-optimizer step; the MGG's weights are not touched (and not in the state dict).

    Per-parameter state keys: "step" (int), "exp_avg", "exp_avg_sq", and after
    the first step "memory_W" (numel, D, D) and "memory_b" (numel, D).
    """

    def __init__(self, params: Iterable, mgg: MGG, lr: float = 1e-3):
        if not isinstance(mgg, MGG):
            raise TypeError(f"MGGOptimizer: mgg must be an MGG, got {type(mgg).__name__}")
        if not lr >= 0.0:
            raise ValueError(f"MGGOptimizer: invalid lr {lr!r}")
        super().__init__(params, {"lr": lr})
        self.mgg = mgg

    def reset_state(self) -> None:
        """Forget moments and GML memory (a new domain), as the authors' reset does."""
        self.state.clear()

    reset_memory = reset_state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, states, lrs = [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MGGOptimizer does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                states.append(self._tensor_state(p))
                lrs.append(group["lr"])
        if not params:
            return loss
        mgg_device = self.mgg.head.weight.device
        if grads[0].device != mgg_device:
            raise ValueError(f"MGGOptimizer: parameters are on {grads[0].device} but the MGG is on {mgg_device}; move the MGG")
        directions, new_states = self.mgg.directions(grads, states)
        scale = self.mgg.step_scale_value()
        for p, d, s, lr in zip(params, directions, new_states, lrs):
            p.add_(d, alpha=-lr * scale)
            self.state[p] = {
                "step": s.step,
                "exp_avg": s.exp_avg,
                "exp_avg_sq": s.exp_avg_sq,
                "memory_W": s.memory.W,
                "memory_b": s.memory.b,
            }
        return loss

    def _tensor_state(self, p: torch.Tensor) -> TensorState:
        st = self.state.get(p)
        if not st:
            return TensorState.fresh(p)
        memory = None
        if "memory_W" in st:
            # load_state_dict casts state to the parameter's dtype; the MGG may use another.
            dtype = self.mgg.head.weight.dtype
            memory = Memory(st["memory_W"].to(dtype), st["memory_b"].to(dtype))
        return TensorState(int(st["step"]), st["exp_avg"], st["exp_avg_sq"], memory)


def mgg_optimizer_factory(mgg: MGG, lr: float = 1e-3) -> Callable[[list], MGGOptimizer]:
    """An `optimizer_factory` for `metatta.methods.base.build_method`: any gradient
    method (Tent, EATA, ...) then steps with the MGG instead of SGD/Adam."""
    if not isinstance(mgg, MGG):
        raise TypeError(f"mgg_optimizer_factory: mgg must be an MGG, got {type(mgg).__name__}")

    def factory(params: list) -> MGGOptimizer:
        return MGGOptimizer(params, mgg, lr=lr)

    return factory


def frozen_mgg(mgg: MGG, device: torch.device | str) -> MGG:
    """A private copy of a trained MGG on `device`, in eval mode and without gradients: what a
    method steps with, so adapting never touches (or trains) the caller's MGG."""
    if not isinstance(mgg, MGG):
        raise TypeError(f"mgg must be an MGG, got {type(mgg).__name__}")
    return copy.deepcopy(mgg).to(device).eval().requires_grad_(False)
