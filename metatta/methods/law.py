"""LAW: layer-wise auto-weighting for non-stationary test-time adaptation
(Park, Kim, Kim, WACV 2024; implementation followed: the LAW baseline in the PALM
authors' code, sarthaxxxxx/PALM classification/methods/law.py and cfgs/*/law.yaml).

Every step on a test batch x:

1. forward x (logits) and one CoTTA augmentation of x (logits_aug), BN on batch
   statistics of each batch separately;
2. the gradient g of the pseudo-label log-likelihood, CE(logits, argmax logits),
   with respect to every adapted tensor; the Fisher information is accumulated as
   F += g^2 and never decayed or reset (only `reset()` returns it to zero);
3. per tensor s = sqrt(mean(F)); min-max normalised across the tensors,
   w = (s - min s) / (max s - min s + eps); the tensor's learning rate is
   lr * w ** tau (the tensor with the smallest s gets 0, the largest lr);
4. the update: one optimizer step on the loss
   mean entropy(logits) + consistency_weight * C * CE(softmax(logits), log_softmax(logits_aug)),
   C the number of classes, gradients through both branches (as in their code).

Adapted: weight and bias of every Conv2d and normalization layer (BN, LayerNorm,
GroupNorm, InstanceNorm), each tensor in a param group of its own; linear layers
stay frozen, as in their `collect_params`/`configure_model`. The model is in eval
mode with the BN running buffers removed (batch statistics; same computation as
their train-mode BN without dropout).

Per-tensor learning rates: the optimizer has one param group per adapted tensor,
in `named_parameters` order, and `forward_and_adapt` writes each group's "lr"
before the step (the lrs are thus part of the optimizer state that `reset()`
restores). The accumulated Fisher is the method's own state (`extra_state`).

Where this differs from / pins down their code:
- their code builds a new Adam every step, so Adam's moments never carry over
  (each update is Adam's first step, lr * g / (|g| + eps), per element). With
  `fresh_optimizer_state: true` (default) the optimizer state is cleared before
  each step, which is the same update with one persistent optimizer object; it
  is only cleared for the optimizer this class builds, never for one from an
  `optimizer_factory` (a learned optimizer keeps its state). `false` gives a
  persistent Adam (or SGD) instead.
- their FIM gradient is taken with `loss.backward(retain_graph=True)` into
  `.grad`; here it is one `torch.autograd.grad` call (same values), then F is
  updated with `torch._foreach_addcmul_` and the per-tensor means come from one
  `_foreach_norm` (F >= 0) with one host sync, instead of two `.item()` per tensor.
- tensors that receive no gradient (unused) count as g = 0.
- non-finite values: a NaN/inf pseudo-label or update loss, or a Fisher that
  overflows, makes the step call `refuse_update()` before anything is written;
  the base class's guard then restores parameters, optimizer and Fisher.
- the paper's text describes steps 2-3; the update
  loss of step 4 (entropy + class-count-scaled consistency with CoTTA's strong
  augmentation) is taken from the code.

Defaults are their CIFAR-10-C settings (cfgs/cifar10_c/law.yaml, conf.py): Adam,
lr 1e-3, betas (0.9, 0.999), no weight decay, 1 step, not episodic, tau 1.0,
lambda 0.1, eps 1e-8, batch 200. CIFAR-100-C: lr 5e-5, tau 0.6, lambda 1.0
(batch 200). ImageNet-C: lr 2e-4, tau 1.0, lambda 10.0 (batch 64).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metatta.methods.augment import CoTTAAugment
from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.common import NORM_TYPES, freeze_all, softmax_entropy, use_batch_statistics

ADAPTED_TYPES = NORM_TYPES + (nn.Conv2d,)


@dataclasses.dataclass
class LAWConfig(MethodConfig):
    optimizer: str = "adam"
    lr: float = 1e-3  # base learning rate (the tensor with the largest Fisher gets it)
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    tau: float = 1.0  # exponent of the min-max normalised sqrt-Fisher
    consistency_weight: float = 0.1  # LAW.LAMBDA; the term is also scaled by the class count
    eps: float = 1e-8  # in the min-max denominator
    fresh_optimizer_state: bool = True  # their code builds a new Adam every step
    soft_augmentation: bool = False  # their get_tta_transforms(dataset) uses the strong ranges
    aug_noise_std: float = 0.005

    def validate(self) -> None:
        super().validate()  # steps, lr, weight_decay, betas, ...
        for field in ("tau", "consistency_weight", "aug_noise_std"):
            value = getattr(self, field)
            if not math.isfinite(value) or value < 0:
                self.refuse(field, "a finite number >= 0")
        if not math.isfinite(self.eps) or self.eps <= 0:
            self.refuse("eps", "a finite number > 0")
        if self.optimizer == "sgd" and not 0 <= self.momentum < 1:
            self.refuse("momentum", "in [0, 1)")


def consistency(logits: torch.Tensor, logits_aug: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(logits_aug) against softmax(logits) (both differentiable)."""
    return -(logits.softmax(1) * logits_aug.log_softmax(1)).sum(1).mean()


@register("law")
class LAW(TTAMethod):
    Config = LAWConfig

    def __init__(self, model: nn.Module, config: LAWConfig | None = None, optimizer_factory=None, **context):
        config = self.checked_config(config)
        self._built_own_optimizer = False
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        if self.optimizer is None:
            raise ValueError(f"{self.name}: the model has no Conv2d or normalization parameters to adapt")
        groups = self.optimizer.param_groups
        if len(groups) != len(self.adapted) or any(
            len(g["params"]) != 1 or g["params"][0] is not p for g, p in zip(groups, self.adapted)
        ):
            raise ValueError(f"{self.name}: the optimizer must keep one param group per adapted tensor, in order")
        self.augment = CoTTAAugment(soft=self.config.soft_augmentation, noise_std=self.config.aug_noise_std)

    # ---- what the method specifies -------------------------------------------------------
    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)
        use_batch_statistics(self.model)
        for m in self.model.modules():
            if isinstance(m, ADAPTED_TYPES):
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, nn.Parameter):
                        p.requires_grad_(True)
        self.adapted_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.adapted = [p for p in self.model.parameters() if p.requires_grad]

    def init_extra_state(self) -> None:
        self.fim = [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in self.adapted]
        self._numel = None

    def collect_params(self) -> list:
        return [{"params": [p]} for p in self.adapted]

    def build_optimizer(self, params: list) -> torch.optim.Optimizer:
        self._built_own_optimizer = True
        return super().build_optimizer(params)

    # ---- the LAW step ------------------------------------------------------------------------
    def accumulate_fisher(self, grads: list[torch.Tensor]) -> None:
        """F += g^2 for every adapted tensor (one fused call)."""
        torch._foreach_addcmul_(self.fim, grads, grads)

    def layer_scores(self) -> torch.Tensor:
        """s = sqrt(mean F) per tensor, as a float64 vector."""
        if self._numel is None or self._numel.device != self.fim[0].device:
            self._numel = torch.tensor([f.numel() for f in self.fim], dtype=torch.float64, device=self.fim[0].device)
        sums = torch.stack(torch._foreach_norm(self.fim, 1)).to(torch.float64)  # F >= 0: L1 norm = sum
        return (sums / self._numel).sqrt()

    def layer_learning_rates(self) -> list[float]:
        """lr * ((s - min s) / (max s - min s + eps)) ** tau, per tensor."""
        s = self.layer_scores()
        w = (s - s.min()) / (s.max() - s.min() + self.config.eps)
        return (self.config.lr * w.pow(self.config.tau)).tolist()

    def loss(self, x: torch.Tensor, logits: torch.Tensor, logits_aug: torch.Tensor | None = None) -> torch.Tensor:
        loss = softmax_entropy(logits).mean(0)
        if logits_aug is not None and self.config.consistency_weight > 0:
            loss = loss + self.config.consistency_weight * logits.shape[1] * consistency(logits, logits_aug)
        return loss

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = self.model(x)
            logits_aug = self.model(self.augment.single_view(x)) if self.config.consistency_weight > 0 else None
            nll = F.cross_entropy(logits, logits.detach().argmax(1))
            loss = self.loss(x, logits, logits_aug)
            if not bool(torch.isfinite(torch.stack([nll.detach(), loss.detach()])).all()):
                self.refuse_update()  # the base class's guard rolls the step back
                return logits.detach()
            grads = torch.autograd.grad(nll, self.adapted, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.adapted)]
            with torch.no_grad():
                self.accumulate_fisher(grads)
                lrs = self.layer_learning_rates()
            if not all(math.isfinite(lr) for lr in lrs):  # an overflowing gradient made the Fisher inf/NaN
                self.refuse_update()  # the guard restores the Fisher (extra state) with the rest
                return logits.detach()
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.fresh_optimizer_state and self._built_own_optimizer:
                self.optimizer.state.clear()
            self.optimizer.step()
        return logits.detach()

    # ---- state -------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"fim": [f.detach().clone() for f in self.fim]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        fim = state["fim"]
        if len(fim) != len(self.fim) or any(a.shape != b.shape for a, b in zip(fim, self.fim)):
            raise ValueError(f"{self.name}: the saved Fisher does not match the adapted tensors")
        with torch.no_grad():
            torch._foreach_copy_(self.fim, fim)
