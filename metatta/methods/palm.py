"""PALM: pushing adaptive learning rate mechanisms for continual test-time
adaptation (Maharana et al., AAAI 2025; code: sarthaxxxxx/PALM,
classification/methods/ours.py, cfgs/*/ours.yaml).

Candidate tensors: the weight and bias of every normalization layer and of every
Conv2d; everything else is frozen and BN normalizes with the batch statistics.
Per test batch:

1. uncertainty loss on the clean logits z (temperature T),
   `uncertainty_loss: uniform_ce` (default, the authors' code):
   mean_b sum_c -log_softmax(z / T)_c, i.e. C times the cross-entropy of the
   uniform distribution to the prediction (their "KL ~ cross-entropy", target all
   ones); `kl`: the paper's KL(softmax(z / T) || uniform). The published
   thresholds eta are on the code's scale, hence the default. Its gradients with
   respect to all candidates come from one `torch.autograd.grad` call;
2. selection: a tensor is selected when the L1 norm of that gradient is <= eta;
3. for a selected tensor, elementwise: sensitivity S = |theta * g|, its moving
   average S_hat <- alpha S + (1 - alpha) S_hat (S_hat starts at zero, as in
   their code, so the first S_hat is alpha S), uncertainty D = |S - S_hat|,
   importance i = (D + eps) / (S_hat + eps) (eps 1e-8, their value), learning
   rate base_lr * i. Their config's BETA3 is 1 - alpha;
4. main loss on the clean logits and on the logits of one CoTTA augmentation of
   the batch (`metatta.methods.augment`, as their `get_tta_transforms`):
   mean entropy of the samples with entropy < H0 (none: 0) + lambda *
   consistency, consistency = mean_b -sum_c softmax(z)_c log_softmax(z_aug)_c
   (gradients through both branches, as theirs). H0: `entropy_margin` * ln C
   (`entropy_margin_scale: log_classes`, the paper) or `entropy_margin` itself
   (`absolute`, their code: 0.4). Their code multiplies the consistency by C
   (`lambd * logits.shape[1] * consistency`); lambda 0.01 was tuned on that
   scale, so `consistency_scale: classes` is the default (`none`: lambda alone);
5. one Adam step with those learning rates.

Two variants (`variant`):

- `paper` (default): per-element learning rates; tensors not selected on this
  batch are frozen for it. The optimizer is Adam with persistent moments,
  advanced only for the tensors it updates (per-tensor step counts for the bias
  correction). The paper states Adam with adaptive learning rates; the authors'
  re-creation of Adam on every batch is how their code changes the per-group
  learning rates, and it turns every update into Adam's first step,
  lr * g / (|g| + eps), a sign step that discards the moments. Keeping the
  moments is the reading that is Adam.
- `code`: their code as written: one scalar rate per tensor (the mean of i), a
  tensor selected on an earlier batch keeps updating with its last (stale)
  rate, never-selected tensors do not move, and a fresh Adam every step (each
  update is lr * g / (|g| + eps), g including weight decay). This variant keeps
  no optimizer state.

State: the moving averages S_hat and the current (paper) or stale (code) rates
are extra state; the Adam moments are optimizer state; `reset()` restores both
with the model. A step changes state only through the optimizer step and by
replacing (never mutating in place) the entries of the extra state, so rolling
back parameters, optimizer state and extra state undoes a step; a non-finite
uncertainty or main loss calls `refuse_update()`, so the base class's
non-finite guard rolls the step back.

Cost per batch: two forward passes (clean, augmented), one backward of the
uncertainty loss to every candidate, one backward of the main loss restricted to
the tensors that are updated (autograd then skips the weight gradients of the
others, and stops early when no early layer is updated), all in `torch._foreach`
ops with one host synchronisation for the selection; no augmented pass and no
second backward on a batch where nothing is updated.

`adapted_parameter_count()` is the number of scalar parameters updated on the
latest batch and `last_adapted_fraction` their share of all candidates
(the paper reports 4.3% / 6.7% / 17.2% on CIFAR-10-C / CIFAR-100-C / ImageNet-C).

Defaults: their CIFAR-10-C config: Adam lr 5e-4, betas (0.9, 0.999), no weight
decay, T 50, eta 1.0, alpha 0.5 (BETA3 0.5), lambda 0.01, batch 200.
CIFAR-100-C: T 100, eta 0.5, alpha 0.9, weight decay 5e-4; ImageNet-C: lr 5e-5,
T 1000, eta 0.3, alpha 0.5, batch 64 (configs/methods/palm_*.yaml).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn

from metatta.methods.augment import CoTTAAugment
from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import NORM_TYPES, softmax_entropy, use_batch_statistics

VARIANTS = ("paper", "code")
UNCERTAINTY_LOSSES = ("uniform_ce", "kl")
MARGIN_SCALES = ("log_classes", "absolute")
CONSISTENCY_SCALES = ("classes", "none")


@dataclasses.dataclass
class PALMConfig(MethodConfig):
    optimizer: str = "adam"  # the only choice: PALM's rates scale Adam's update
    lr: float = 5e-4  # base learning rate
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    variant: str = "paper"  # paper | code (see the module docstring)
    temperature: float = 50.0  # T of the uncertainty loss
    eta: float = 1.0  # a tensor is selected when ||grad of the uncertainty loss||_1 <= eta
    alpha: float = 0.5  # S_hat <- alpha S + (1 - alpha) S_hat (their BETA3 = 1 - alpha)
    lambda_consistency: float = 0.01
    entropy_margin: float = 0.4
    entropy_margin_scale: str = "log_classes"  # log_classes: H0 = 0.4 ln C (paper) | absolute: 0.4 (code)
    consistency_scale: str = "classes"  # classes: lambda * C * CE (their code) | none: lambda * CE
    uncertainty_loss: str = "uniform_ce"  # uniform_ce: their code's scale | kl: KL(p || uniform)
    eps: float = 1e-8  # importance ratio and Adam
    soft_augmentation: bool = False
    aug_noise_std: float = 0.005

    def validate(self) -> None:
        super().validate()  # steps, lr, weight_decay, betas, ...
        if self.optimizer != "adam":
            self.refuse("optimizer", "'adam'")
        if self.variant not in VARIANTS:
            self.refuse("variant", _one_of(VARIANTS))
        for field in ("eta", "lambda_consistency", "entropy_margin"):
            if not getattr(self, field) >= 0:
                self.refuse(field, ">= 0")
        if not 0.0 <= self.alpha <= 1.0:
            self.refuse("alpha", "in [0, 1]")
        for field in ("temperature", "eps"):
            if not getattr(self, field) > 0:
                self.refuse(field, "> 0")
        if self.entropy_margin_scale not in MARGIN_SCALES:
            self.refuse("entropy_margin_scale", _one_of(MARGIN_SCALES))
        if self.consistency_scale not in CONSISTENCY_SCALES:
            self.refuse("consistency_scale", _one_of(CONSISTENCY_SCALES))
        if self.uncertainty_loss not in UNCERTAINTY_LOSSES:
            self.refuse("uncertainty_loss", _one_of(UNCERTAINTY_LOSSES))


def _one_of(values: Sequence[str]) -> str:
    return " or ".join(map(repr, values))


def palm_candidates(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the weight and bias of every norm layer and Conv2d, in module order."""
    out, seen = [], set()
    for mname, m in model.named_modules():
        if isinstance(m, NORM_TYPES + (nn.Conv2d,)):
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter) and id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def uncertainty_loss(logits: torch.Tensor, temperature: float, kind: str = "uniform_ce") -> torch.Tensor:
    """PALM's loss of the prediction against the uniform distribution (batch mean)."""
    log_p = (logits / temperature).log_softmax(1)
    if kind == "uniform_ce":
        return -log_p.sum(1).mean(0)
    return ((log_p.exp() * log_p).sum(1) + math.log(logits.shape[1])).mean(0)


def palm_importance(
    thetas: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], s_hat_prev: Sequence[torch.Tensor],
    alpha: float, eps: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Elementwise (new S_hat, importance i) per tensor; returns new tensors, inputs untouched."""
    if not thetas:
        return [], []
    sens = torch._foreach_mul(list(thetas), list(grads))
    torch._foreach_abs_(sens)
    s_hat = torch._foreach_mul(list(s_hat_prev), 1.0 - alpha)
    torch._foreach_add_(s_hat, sens, alpha=alpha)
    importance = torch._foreach_sub(sens, s_hat)
    torch._foreach_abs_(importance)
    torch._foreach_add_(importance, eps)
    denom = torch._foreach_add(s_hat, eps)
    torch._foreach_div_(importance, denom)
    return s_hat, importance


class PALMAdam(torch.optim.Optimizer):
    """Adam whose update is multiplied by a given learning rate per tensor (a tensor of
    the parameter's shape, or a scalar); the group's lr is not used by `step`.

    `step(lrs)`: lrs[k] belongs to the k-th parameter of the (single) group; a
    parameter with lr None or grad None is left as is. `fresh=True` forgets the
    moments every step (each update is Adam's first: lr * g / (|g| + eps)) and
    keeps no state.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 fresh: bool = False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fresh=fresh))
        if len(self.param_groups) != 1:
            raise ValueError("PALMAdam: takes one parameter group")

    @torch.no_grad()
    def step(self, lrs: Sequence[torch.Tensor | float | None] | None = None) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        if lrs is None:
            lrs = [group["lr"]] * len(group["params"])
        if len(lrs) != len(group["params"]):
            raise ValueError(f"PALMAdam.step: {len(lrs)} learning rates for {len(group['params'])} parameters")
        pairs = [(p, lr) for p, lr in zip(group["params"], lrs) if lr is not None and p.grad is not None]
        if not pairs:
            return
        params = [p for p, _ in pairs]
        grads = [p.grad for p in params]
        (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if group["fresh"]:
            self._fresh_step(params, grads, [lr for _, lr in pairs], eps)
            return
        exp_avgs, exp_avg_sqs, bc1, bc2_sqrt = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            bc1.append(1.0 - beta1 ** state["step"])
            bc2_sqrt.append(math.sqrt(1.0 - beta2 ** state["step"]))
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        steps = [torch.as_tensor(lr, dtype=p.dtype, device=p.device) / -b for (p, lr), b in zip(pairs, bc1)]
        update = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(update, steps)  # elementwise (or 0-dim) -lr / bias correction
        torch._foreach_add_(params, update)

    @staticmethod
    def _fresh_step(params: list, grads: list, lrs: list, eps: float) -> None:
        denom = torch._foreach_abs(grads)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(grads, denom)
        steps = [-torch.as_tensor(lr, dtype=p.dtype, device=p.device) for p, lr in zip(params, lrs)]
        torch._foreach_mul_(update, steps)
        torch._foreach_add_(params, update)


@register("palm")
class PALM(TTAMethod):
    Config = PALMConfig

    def __init__(
        self,
        model: nn.Module,
        config: PALMConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        if optimizer_factory is not None:
            raise ValueError("palm: builds its own optimizer (per-parameter learning rates); "
                             "an optimizer_factory is not supported")
        self.last_adapted_fraction = 0.0
        self.last_selected: list[bool] = []
        self._last_updated = 0
        super().__init__(model, config, **context)
        self.augment = CoTTAAugment(soft=config.soft_augmentation, noise_std=config.aug_noise_std)

    # ---- what PALM specifies ---------------------------------------------------------
    def configure_model(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        use_batch_statistics(self.model)
        candidates = palm_candidates(self.model)
        if not candidates:
            raise ValueError(f"{self.name}: the model has no normalization or Conv2d layer with parameters to adapt")
        for _, p in candidates:
            p.requires_grad_(True)
        self.candidate_names = [n for n, _ in candidates]
        self.candidates = [p for _, p in candidates]
        self._total = sum(p.numel() for p in self.candidates)

    def init_extra_state(self) -> None:
        self.s_hat: list[torch.Tensor] = [torch.zeros_like(p, requires_grad=False) for p in self.candidates]
        self.rates: list[torch.Tensor | None] = [None] * len(self.candidates)

    def collect_params(self) -> list:
        return list(self.candidates)

    def build_optimizer(self, params: list) -> torch.optim.Optimizer:
        cfg = self.config
        return PALMAdam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                        fresh=cfg.variant == "code")

    def entropy_threshold(self, num_classes: int) -> float:
        cfg = self.config
        return cfg.entropy_margin * (math.log(num_classes) if cfg.entropy_margin_scale == "log_classes" else 1.0)

    def main_loss(self, logits: torch.Tensor, logits_aug: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        num_classes = logits.shape[1]
        entropy = softmax_entropy(logits)
        reliable = (entropy < self.entropy_threshold(num_classes)).to(entropy.dtype)
        loss = (entropy * reliable).sum() / reliable.sum().clamp_min(1.0)
        if cfg.lambda_consistency > 0:
            consistency = -(logits.softmax(1) * logits_aug.log_softmax(1)).sum(1).mean(0)
            scale = num_classes if cfg.consistency_scale == "classes" else 1.0
            loss = loss + cfg.lambda_consistency * scale * consistency
        return loss

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        params = self.candidates
        with torch.enable_grad():
            logits = self.model(x)
            loss_u = uncertainty_loss(logits, cfg.temperature, cfg.uncertainty_loss)
            if not bool(torch.isfinite(loss_u)):
                self.refuse_update()  # the guard rolls back; nothing has changed yet
                return logits.detach()
            grads = torch.autograd.grad(loss_u, params, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            norms = torch.stack(torch._foreach_norm(grads, 1))
            selected = (norms <= cfg.eta).tolist()
            self.last_selected = selected
            sel = [k for k, s in enumerate(selected) if s]

            s_hat, importance = palm_importance([params[k].detach() for k in sel], [grads[k] for k in sel],
                                                [self.s_hat[k] for k in sel], cfg.alpha, cfg.eps)
            new_s_hat, new_rates = list(self.s_hat), list(self.rates)
            if cfg.variant == "paper":
                new_rates = [None] * len(params)
                for k, s, i in zip(sel, s_hat, importance):
                    new_s_hat[k], new_rates[k] = s, i.mul_(cfg.lr)
            else:
                means = torch.stack([i.mean() for i in importance]) * cfg.lr if sel else None
                for j, (k, s) in enumerate(zip(sel, s_hat)):
                    new_s_hat[k], new_rates[k] = s, means[j]
            del grads
            self.s_hat, self.rates = new_s_hat, new_rates

            update = [k for k, r in enumerate(new_rates) if r is not None]
            self._last_updated = sum(params[k].numel() for k in update)
            self.last_adapted_fraction = self._last_updated / self._total
            if update:
                logits_aug = self.model(self.augment.single_view(x))
                loss = self.main_loss(logits, logits_aug)
                if not bool(torch.isfinite(loss)):
                    self.refuse_update()  # the guard restores the moving averages and rates
                    return logits.detach()
                main_grads = torch.autograd.grad(loss, [params[k] for k in update], allow_unused=True)
                for p in params:
                    p.grad = None
                for k, g in zip(update, main_grads):
                    params[k].grad = g
                self.optimizer.step(new_rates)
                for p in params:
                    p.grad = None
        return logits.detach()

    def adapted_parameter_count(self) -> int:
        """Scalar parameters updated on the latest batch (0 before the first)."""
        return self._last_updated

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"s_hat": list(self.s_hat), "rates": list(self.rates)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.s_hat = [s.to(p.device) for s, p in zip(state["s_hat"], self.candidates)]
        self.rates = [None if r is None else r.to(p.device) for r, p in zip(state["rates"], self.candidates)]
