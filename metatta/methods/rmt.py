"""RMT: robust mean teacher (Döbler, Marsden & Yang, "Robust Mean Teacher for Continual and
Gradual Test-Time Adaptation", CVPR 2023; code: mariodoebler/test-time-adaptation,
classification/methods/rmt.py).

A student learns from its exponential-moving-average teacher, with a contrastive
term that pulls test features towards the source class prototypes and, where the
config allows (`lambda_ce_src` > 0), replay of labelled source data. Per test batch,
as in the authors' `loss_calculation`:

1. student on x and on a CoTTA augmentation of x (`metatta.methods.augment`): logits
   s, s_aug and features f, f_aug (the classifier's inputs); teacher logits t on x;
2. self-training: mean over the batch of (SCE(s, t) + SCE(s_aug, t)) / 2 with the
   symmetric cross-entropy SCE(a, b) = -(1/2) softmax(b).log_softmax(a)
   - (1/2) softmax(a).log_softmax(b) (`symmetric_cross_entropy`);
3. contrastive: for each test image the source prototype nearest to f (cosine), and
   the three views (prototype, f, f_aug) go through a projector (Linear-ReLU-Linear,
   128) and an L2 normalization; SupCon loss with temperature 0.1, every view an
   anchor, the other two views of the same image its positives
   (`contrastive_loss`);
4. source replay: cross-entropy of the student on a labelled source batch;
5. loss = lambda_ce_trg * (2) + lambda_cont * (3) + lambda_ce_src * (4), one optimizer
   step over the student's parameters and the projector's; then the teacher follows,
   t <- 0.999 t + 0.001 s (all parameters);
6. the prediction is s + t (the logits of step 1, before the update).

Before adaptation, as in their code: the source prototypes are the class means of
the features of the labelled source batches (`source_batches`, on the configured
student: BN on batch statistics); then a warm-up of `warmup_samples` source images
(50,000, in batches of the given size) trains the student towards the teacher with
SCE, the lr rising linearly to its value, the teacher following by EMA. The state
after the warm-up is the one `reset()` returns to.

Adapted: every parameter of the student (their configure_model enables all) and the
projector's; BN normalizes with batch statistics (eval mode without running buffers).

Defaults: their CIFAR-10-C setting (cfgs/cifar10_c/rmt.yaml, conf.py): Adam lr 1e-3,
batch 200, teacher momentum 0.999, temperature 0.1, projection 128, all three lambdas
1, warm-up 50,000 samples.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from metatta.methods.augment import CoTTAAugment
from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import (
    classifier_layer,
    ema_update,
    features_and_logits,
    step_or_refuse,
    use_batch_statistics,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RMTConfig(MethodConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    teacher_momentum: float = 0.999  # M_TEACHER.MOMENTUM
    lambda_ce_trg: float = 1.0  # self-training (RMT.LAMBDA_CE_TRG)
    lambda_cont: float = 1.0  # contrastive (RMT.LAMBDA_CONT)
    lambda_ce_src: float = 1.0  # source replay (RMT.LAMBDA_CE_SRC); 0: source-free
    temperature: float = 0.1  # CONTRAST.TEMPERATURE
    projection_dim: int = 128  # CONTRAST.PROJECTION_DIM
    warmup_samples: int = 50000  # RMT.NUM_SAMPLES_WARM_UP; 0: no warm-up
    soft_augmentation: bool = False  # CoTTA's strong ranges, as their get_tta_transforms
    aug_noise_std: float = 0.005
    classifier: str | None = None  # the linear classifier's module name; None: the last nn.Linear

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise ValueError(f"rmt: config.teacher_momentum must be in [0, 1], got {self.teacher_momentum}")
        if self.temperature <= 0:
            raise ValueError(f"rmt: config.temperature must be > 0, got {self.temperature}")
        for name in ("projection_dim",):
            if getattr(self, name) < 1:
                raise ValueError(f"rmt: config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lambda_ce_trg", "lambda_cont", "lambda_ce_src", "warmup_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"rmt: config.{name} must be >= 0, got {getattr(self, name)}")


def symmetric_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample -(1/2) softmax(t).log_softmax(s) - (1/2) softmax(s).log_softmax(t)."""
    return -0.5 * ((teacher_logits.softmax(1) * logits.log_softmax(1)).sum(1)
                   + (logits.softmax(1) * teacher_logits.log_softmax(1)).sum(1))


def contrastive_loss(views: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon over (B, V, D) already projected and normalized views: every view is an anchor,
    the other views of the same sample its positives, all other views negatives."""
    b, v, _ = views.shape
    flat = torch.cat(torch.unbind(views, dim=1))  # (V*B, D), view-major as their torch.cat(unbind)
    logits = flat @ flat.t() / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(v * b, device=views.device, dtype=views.dtype)
    positives = torch.eye(b, device=views.device, dtype=views.dtype).repeat(v, v) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    return -((positives * log_prob).sum(1) / positives.sum(1)).mean()


def labelled_batches(batches: Iterable[Any] | None, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The context input `source_batches` as a list of (images, labels), checked."""
    if batches is None:
        raise ValueError(f"{where}: needs labelled source data (context input source_batches: (images, labels) "
                         "batches) for its prototypes")
    out = []
    for index, item in enumerate(batches):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"{where}: source_batches[{index}] must be an (images, labels[, ...]) batch, "
                             f"got {type(item).__name__}")
        x, y = item[0], item[1]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]:
            raise ValueError(f"{where}: source_batches[{index}] must hold (B, C, H, W) images and (B,) labels, got "
                             f"{getattr(x, 'shape', None)} and {getattr(y, 'shape', None)}")
        out.append((x, y.long()))
    if not out:
        raise ValueError(f"{where}: source_batches is empty")
    return out


@torch.no_grad()
def source_prototypes(model: nn.Module, classifier: nn.Linear, batches: list[tuple[torch.Tensor, torch.Tensor]],
                      in_layout: Callable[[torch.Tensor], torch.Tensor], where: str) -> torch.Tensor:
    """(K, D): the mean feature (the classifier's input) of each class over the labelled batches."""
    num_classes = classifier.out_features
    sums = torch.zeros(num_classes, classifier.in_features, device=classifier.weight.device)
    counts = torch.zeros(num_classes, device=sums.device)
    for x, y in tqdm(batches, desc=f"{where} prototypes", leave=False):
        x, y = in_layout(x.to(sums.device)), y.to(sums.device)
        features, _ = features_and_logits(model, classifier, x)
        sums.index_add_(0, y, features)
        counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"{where}: source_batches have no image of classes {missing}; prototypes need every class")
    return sums / counts.unsqueeze(1)


def nearest_prototype_views(features: torch.Tensor, features_aug: torch.Tensor,
                            prototypes: torch.Tensor) -> torch.Tensor:
    """(B, 3, D): for each test image its nearest source prototype (cosine), f and f_aug."""
    with torch.no_grad():
        nearest = F.cosine_similarity(features.unsqueeze(1), prototypes.unsqueeze(0), dim=2).argmax(1)
    return torch.stack([prototypes[nearest], features, features_aug], dim=1)


def projection_head(in_features: int, dim: int, device: torch.device) -> nn.Sequential:
    """The contrastive projector of RMT and SANTA: Linear, ReLU, Linear to `dim`."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(), nn.Linear(dim, dim)).to(device)


def prototype_contrastive_loss(projector: nn.Module, features: torch.Tensor, features_aug: torch.Tensor,
                               prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """RMT's and SANTA's contrastive term: SupCon over the projected, normalized
    (nearest source prototype, f, f_aug) views of each test image."""
    views = nearest_prototype_views(features, features_aug, prototypes)
    return contrastive_loss(F.normalize(projector(views), p=2, dim=2), temperature)


@register("rmt")
class RMT(TTAMethod):
    Config = RMTConfig
    context_inputs = ("source_batches",)

    def __init__(
        self,
        model: nn.Module,
        config: RMTConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        source_batches: Iterable[Any] | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        self._source = labelled_batches(source_batches, "rmt")
        self._projector_dim = config.projection_dim
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        self.augment = CoTTAAugment(soft=config.soft_augmentation, noise_std=config.aug_noise_std)
        self._replay = self._cycle()
        self.prototypes = self.source_prototypes()
        if config.warmup_samples > 0:
            self.warm_up()
        self._source_state = self._snapshot()  # the source state is the warmed-up one, as in their code

    # ---- what RMT specifies ----------------------------------------------------------
    def configure_model(self) -> None:
        self.model.eval()
        use_batch_statistics(self.model)
        self.model.requires_grad_(True)
        _, self.classifier = classifier_layer(self.model, self.config.classifier)

    def init_extra_state(self) -> None:
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.projector = projection_head(self.classifier.in_features, self._projector_dim, self.classifier.weight.device)

    def collect_params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.projector.parameters())

    def _cycle(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.cycle(self._source)

    def _source_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self._replay)
        device = self.classifier.weight.device
        return self.in_layout(x.to(device)), y.to(device)

    def source_prototypes(self) -> torch.Tensor:
        return source_prototypes(self.model, self.classifier, self._source, self.in_layout, where=self.name)

    def warm_up(self) -> None:
        """Their warm-up: SCE of the student to the teacher on source images, lr rising linearly."""
        batch = self._source[0][0].shape[0]
        steps = self.config.warmup_samples // batch
        final = [g["lr"] for g in self.optimizer.param_groups]
        with torch.enable_grad():
            for i in tqdm(range(steps), desc="RMT warm-up", leave=False):
                for g, lr in zip(self.optimizer.param_groups, final):
                    g["lr"] = lr * (i + 1) / steps
                x, _ = self._source_batch()
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                loss = symmetric_cross_entropy(self.model(x), teacher_logits).mean(0)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.update_teacher()
        for g, lr in zip(self.optimizer.param_groups, final):
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with torch.enable_grad():
            features, logits = features_and_logits(self.model, self.classifier, x)
            features_aug, logits_aug = features_and_logits(self.model, self.classifier, self.in_layout(self.augment(x)))
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            contrastive = prototype_contrastive_loss(self.projector, features, features_aug, self.prototypes,
                                                     cfg.temperature)
            self_training = (0.5 * symmetric_cross_entropy(logits, teacher_logits)
                             + 0.5 * symmetric_cross_entropy(logits_aug, teacher_logits)).mean(0)
            loss = cfg.lambda_ce_trg * self_training + cfg.lambda_cont * contrastive
            if cfg.lambda_ce_src > 0:
                x_src, y_src = self._source_batch()
                loss = loss + cfg.lambda_ce_src * F.cross_entropy(self.model(x_src), y_src)
            if step_or_refuse(self, loss):
                self.update_teacher()
        return (logits + teacher_logits).detach()

    def update_teacher(self) -> None:
        ema_update(zip(self.teacher.parameters(), self.model.parameters()), self.config.teacher_momentum)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x) + self.teacher(x)

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "projector": self.projector.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.projector.load_state_dict(state["projector"])
