"""RoTTA: robust test-time adaptation (Yuan, Xie & Li, "Robust Test-Time Adaptation in
Dynamic Scenarios", CVPR 2023; code: BIT-DA/RoTTA, core/adapter/rotta.py, core/utils/
memory.py, bn_layers.py; also the broadest public TTA codebase's version,
mariodoebler/test-time-adaptation classification/methods/rotta.py).

Three parts, as in the authors' code:

1. robust BN (RBN): every BatchNorm layer keeps global statistics, starting from
   the source ones; on an adaptation pass it normalizes with
   (1 - alpha) * global + alpha * batch (biased variance; gradients flow through
   the batch part) and stores that as the new global statistics; on a prediction
   pass it normalizes with the global statistics (`RobustBatchNorm*d`);
2. category-balanced sampling with timeliness and uncertainty (CSTU): a memory
   bank of `memory_size` (64) test images, each with the teacher's pseudo-label,
   its entropy u and an age (the number of images added since). A new image of
   class c with score s = lambda_t / (1 + exp(-0)) + lambda_u u / ln C enters
   when the bank is not full and class c holds fewer than memory_size / C images;
   otherwise it must replace the image of highest score
   lambda_t sigmoid(age / memory_size) + lambda_u u / ln C (the last of equal
   ones) among class c (when c already holds its share) or among the majority
   classes (when it does not), and does so only if that score is higher than
   its own. Every added image ages all stored ones by one (`CSTUMemory`);
3. every `update_frequency` (64) images: the student learns on the whole bank,
   loss = mean over images of w(a) * CE(softmax(teacher(m)), student(strong_aug(m)))
   with the timeliness weight w(a) = exp(-a) / (1 + exp(-a)), a = age / memory_size,
   both models in adaptation mode (their RBN statistics move); one optimizer step;
   then the teacher's parameters follow, t <- (1 - nu) t + nu s, nu = 0.001.

The prediction is the teacher's on the test batch (its RBN on global statistics),
made before the images enter the bank. Strong augmentation: CoTTA's
(`metatta.methods.augment`, one parameter draw per bank, as their code applies it
to the stacked bank). Adapted: the RBN affines and any LayerNorm/GroupNorm
affines; everything else frozen. `reset()` restores student, optimizer, teacher,
bank and counter.

Defaults: the authors' (configs/adapter/rotta.yaml, configs/ defaults; CIFAR-10/100-C
and the broadest codebase alike): Adam lr 1e-3, betas (0.9, 0.999), no weight
decay, batch 64, memory 64, update every 64 images, nu 0.001, alpha 0.05,
lambda_t = lambda_u = 1. The lr is not scaled with the test batch: each update is on the
bank, whatever the batch size.

Fidelity: against the broadest codebase's RoTTA on the project's stream (same augmentation
draws), identical predictions (docs/results/fidelity.md).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from metatta.methods.augment import CoTTAAugment
from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import BN_TYPES, adaptable_norm_params, freeze_all, step_or_refuse


@dataclasses.dataclass
class RoTTAConfig(MethodConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    # None: not scaled with the test batch. Every update is on the 64-image bank, whatever the test
    # batch (their code likewise uses OPTIM.LR at any batch); scaling it at batch 16 would cut the lr 4x.
    lr_batch_size: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    memory_size: int = 64  # images in the bank (MEMORY_SIZE)
    update_frequency: int = 64  # one update every this many test images (UPDATE_FREQUENCY)
    nu: float = 0.001  # teacher EMA: t <- (1 - nu) t + nu s (NU)
    alpha: float = 0.05  # RBN: weight of the batch statistics (ALPHA)
    lambda_t: float = 1.0  # weight of timeliness in the bank's score (LAMBDA_T)
    lambda_u: float = 1.0  # weight of uncertainty in the bank's score (LAMBDA_U)
    soft_augmentation: bool = False  # CoTTA's strong ranges, as their get_tta_transforms
    aug_noise_std: float = 0.005

    def validate(self) -> None:
        super().validate()
        for name in ("memory_size", "update_frequency"):
            if getattr(self, name) < 1:
                raise ValueError(f"rotta: config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nu", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"rotta: config.{name} must be in [0, 1], got {getattr(self, name)}")


# ---- robust BN ------------------------------------------------------------------------------------
class _RobustNorm:
    """Mixin before `nn.BatchNorm*d`: RoTTA's RBN on the layer's own running buffers. `alpha`
    is set on conversion; `self.training` selects the adaptation pass."""

    alpha: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            mean = (1 - self.alpha) * self.running_mean + self.alpha * mean
            var = (1 - self.alpha) * self.running_var + self.alpha * var
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        else:
            mean, var = self.running_mean, self.running_var
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class RobustBatchNorm1d(_RobustNorm, nn.BatchNorm1d):
    pass


class RobustBatchNorm2d(_RobustNorm, nn.BatchNorm2d):
    pass


class RobustBatchNorm3d(_RobustNorm, nn.BatchNorm3d):
    pass


ROBUST_CLASSES = {nn.BatchNorm1d: RobustBatchNorm1d, nn.BatchNorm2d: RobustBatchNorm2d,
                  nn.BatchNorm3d: RobustBatchNorm3d}


def robust_batchnorms(model: nn.Module, alpha: float) -> list[nn.Module]:
    """Turn every BatchNorm layer into RBN in place (same parameters; the running buffers,
    source statistics at first, become the global statistics); returns them."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, BN_TYPES):
            continue
        if type(module) not in ROBUST_CLASSES:
            raise ValueError(f"rotta: robust BN needs plain BatchNorm layers; {name!r} is a {type(module).__name__}")
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"rotta: robust BN starts from the source statistics, but layer {name!r} keeps none")
        module.__class__ = ROBUST_CLASSES[type(module)]
        module.alpha = alpha
        module.eval()
        layers.append(module)
    return layers


def set_adaptation_pass(model: nn.Module, on: bool) -> None:
    """RBN layers in adaptation (statistics move) or prediction mode; other modules untouched."""
    for m in model.modules():
        if isinstance(m, _RobustNorm):
            m.train(on)


# ---- the memory bank ------------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryItem:
    image: torch.Tensor
    uncertainty: float
    age: int = 0


class CSTUMemory:
    """RoTTA's category-balanced bank with timeliness and uncertainty (see the module docstring)."""

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0):
        self.capacity, self.num_classes = capacity, num_classes
        self.per_class = capacity / num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.items: list[list[MemoryItem]] = [[] for _ in range(num_classes)]

    def __len__(self) -> int:
        return sum(len(c) for c in self.items)

    def score(self, age: int, uncertainty: float) -> float:
        return (self.lambda_t / (1 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    def add(self, image: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Offer one image; returns whether it entered. Ages every stored image by one either way."""
        entered = self._make_room(label, self.score(0, uncertainty))
        if entered:
            self.items[label].append(MemoryItem(image, uncertainty))
        for class_items in self.items:
            for item in class_items:
                item.age += 1
        return entered

    def _make_room(self, label: int, new_score: float) -> bool:
        if len(self.items[label]) < self.per_class:
            if len(self) < self.capacity:
                return True
            counts = [len(c) for c in self.items]
            return self._replace([k for k, n in enumerate(counts) if n == max(counts)], new_score)
        return self._replace([label], new_score)

    def _replace(self, classes: list[int], new_score: float) -> bool:
        """Drop the highest-scoring image of `classes` (the last of equal ones) if it scores above
        `new_score`; True when there is room then (also when the classes hold nothing)."""
        worst = None
        for k in classes:
            for i, item in enumerate(self.items[k]):
                s = self.score(item.age, item.uncertainty)
                if worst is None or s >= worst[0]:
                    worst = (s, k, i)
        if worst is None:
            return True
        if worst[0] > new_score:
            self.items[worst[1]].pop(worst[2])
            return True
        return False

    def state(self) -> list[list[tuple[torch.Tensor, float, int]]]:
        """The stored items per class as plain (image, uncertainty, age) tuples."""
        return [[(item.image, item.uncertainty, item.age) for item in c] for c in self.items]

    def load_state(self, state: list[list[tuple[torch.Tensor, float, int]]]) -> None:
        self.items = [[MemoryItem(*item) for item in c] for c in state]

    def contents(self) -> tuple[list[torch.Tensor], list[float]]:
        """The stored images (class order, then insertion order) and their ages / capacity."""
        images = [item.image for c in self.items for item in c]
        ages = [item.age / self.capacity for c in self.items for item in c]
        return images, ages


def timeliness_weights(ages: torch.Tensor) -> torch.Tensor:
    """exp(-a) / (1 + exp(-a)) per normalized age a."""
    return torch.exp(-ages) / (1 + torch.exp(-ages))


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


@register("rotta")
class RoTTA(TTAMethod):
    Config = RoTTAConfig

    def __init__(
        self,
        model: nn.Module,
        config: RoTTAConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        self.augment = CoTTAAugment(soft=config.soft_augmentation, noise_std=config.aug_noise_std)
        self.updates = 0  # diagnostic: optimizer steps taken (not reset by reset())

    # ---- what RoTTA specifies --------------------------------------------------------
    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)
        robust_batchnorms(self.model, self.config.alpha)

    def collect_params(self) -> list:
        # RBN (a BatchNorm subclass), LayerNorm, GroupNorm affines
        return adaptable_norm_params(self.model, "rotta")

    def init_extra_state(self) -> None:
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.memory: CSTUMemory | None = None  # created on the first batch, when the class count is known
        self.seen = 0  # test images added since the last reset

    def new_memory(self, num_classes: int) -> CSTUMemory:
        cfg = self.config
        return CSTUMemory(cfg.memory_size, num_classes, cfg.lambda_t, cfg.lambda_u)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            set_adaptation_pass(self.teacher, False)
            teacher_logits = self.teacher(x)
            probs = teacher_logits.softmax(1)
            labels = probs.argmax(1).tolist()
            uncertainty = (-(probs * torch.log(probs + 1e-6)).sum(1)).tolist()
        if self.memory is None:
            self.memory = self.new_memory(teacher_logits.shape[1])
        for image, label, u in zip(x, labels, uncertainty):
            self.memory.add(image.detach().clone(), label, u)
            self.seen += 1
            if self.seen % self.config.update_frequency == 0:
                self.update_on_memory()
        return teacher_logits

    def update_on_memory(self) -> None:
        images, ages = self.memory.contents()
        if not images:
            return
        bank = self.in_layout(torch.stack(images))
        set_adaptation_pass(self.model, True)
        set_adaptation_pass(self.teacher, True)
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(bank)
            with torch.enable_grad():
                student_logits = self.model(self.in_layout(self.augment(bank)))
                weights = timeliness_weights(torch.tensor(ages, dtype=student_logits.dtype,
                                                          device=student_logits.device))
                loss = (soft_cross_entropy(student_logits, teacher_logits) * weights).mean()
                if not step_or_refuse(self, loss):
                    return
        finally:
            set_adaptation_pass(self.model, False)
            set_adaptation_pass(self.teacher, False)
        self.updates += 1
        self.update_teacher()

    @torch.no_grad()
    def update_teacher(self) -> None:
        nu = self.config.nu
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(1 - nu).add_(s.detach(), alpha=nu)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's prediction (a batch that is not adapted on, e.g. NaN pixels)."""
        with torch.no_grad():
            return self.teacher(x)

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        memory = None if self.memory is None else {"num_classes": self.memory.num_classes,
                                                   "items": self.memory.state()}
        return {"teacher": self.teacher.state_dict(), "memory": memory, "seen": self.seen}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.memory, self.seen = None, state["seen"]
        if state["memory"] is not None:
            self.memory = self.new_memory(state["memory"]["num_classes"])
            self.memory.load_state(state["memory"]["items"])
