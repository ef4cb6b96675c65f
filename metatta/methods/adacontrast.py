"""AdaContrast: contrastive test-time adaptation (Chen, Wang, Darrell & Ebrahimi, "Contrastive
Test-Time Adaptation", CVPR 2022; code: DianCh/AdaContrast, target.py and moco/builder.py; the
online version followed here is the broadest public TTA codebase's,
mariodoebler/test-time-adaptation classification/methods/adacontrast.py).

A MoCo pair: the model being adapted (the query encoder) and a momentum copy of it (the key
encoder), a memory queue of the key encoder's normalized features with their pseudo-labels, and
a bank of its features and class probabilities on weak views for refining pseudo-labels. Per
test batch x, with views made from x (`weak_view`: a horizontal flip with probability 1/2 per
image; `strong_view`, twice: MoCo-v2 "light", see below), as in their `loss_calculation`:

1. the model on the weak view: features f_w, logits l_w;
2. the pseudo-labels: after `refine_after` test images (1,024), the soft kNN vote
   (`soft_knn_pseudo_labels`): the mean of the bank's probabilities of the `num_neighbors` (10)
   bank entries nearest to f_w (cosine distance), its argmax; before that, argmax l_w;
3. the model on the first strong view: features f_q (q = f_q / |f_q|), logits l_q;
4. the key encoder follows the model, k_enc <- m k_enc + (1 - m) model over all parameters
   (m = 0.999; before this batch's optimizer step, as in their code), then encodes the second
   strong view: keys k (normalized, no gradient);
5. InfoNCE logits [q.k, q.queue] / T (T = 0.07; the queue as it was before this batch)
   (`instance_logits`); the keys and pseudo-labels enter the queue (ring buffer of
   `queue_size` 16,384, which starts with random unit features and random labels as theirs);
6. loss = alpha CE(l_q, pseudo-labels) + beta InfoNCE + eta div, where InfoNCE is the
   cross-entropy with the key as the positive and the queue entries whose label equals the
   image's pseudo-label masked out (`class_aware_instance_loss`; the labels are the queue's
   after step 5, so slots this batch has just overwritten are masked by its own labels, as in
   both their codes), and div = -H(mean softmax(l_q)) (their `div`: the diversity term);
   alpha = beta = eta = 1; one optimizer step;
7. the key encoder on the weak view: its features and softmax enter the bank (grown to
   `queue_size`, then a ring buffer, `update_bank`);
8. the prediction: the adapted model in eval mode on x itself (after the update, as their
   `forward`). With `steps` > 1, steps 1-7 repeat, each step on new views (theirs reuses the
   batch's views).

Modes, as in their code: the model and the key encoder run in train mode while adapting (BN
normalizes with batch statistics and moves its running statistics, momentum 0.1, on the weak
and the strong view); the prediction uses eval mode, i.e. BN's running statistics, which trail
a new domain by about ten batches (`predict_statistics: batch` predicts with the test batch's
statistics instead; not theirs). A ViT has no BN; its dropouts are 0.

Adapted: every parameter of the model (their configure_model enables all; the paper trains
the whole network). The key encoder and the queue are extra state that `reset()` restores,
with the bank and the image counter.

Views: their CIFAR-10/100-C and ImageNet-C transforms ("twss", moco-v2-light, resize and crop
to the image's own size) leave the test view unchanged and reduce the weak view to a random
horizontal flip; the strong view is, per image: ColorJitter(0.4, 0.4, 0.4, 0.1) with
probability 0.8 (the four ops in a random order; saturation and hue leave a 1-channel image
unchanged), RandomGrayscale 0.2 (3 channels only), a Gaussian blur with sigma in [0.1, 2] with
probability 0.5, a horizontal flip with probability 0.5. Differences: the blur is an exact
Gaussian kernel of radius 6 with edge padding where theirs is PIL's box-blur approximation, and
the views are computed on float tensors where theirs go through 8-bit PIL images. Measured
against their transform on 2,000 Fashion-MNIST-C images (a one-off check): mean absolute change
0.124 (theirs 0.123), image std 0.267 (0.266), mean horizontal gradient 0.089 (0.090); on
tinted RGB copies also the chroma, 0.217 (0.219).

Defaults: their CIFAR-10-C setting (cfgs/cifar10_c/adacontrast.yaml, conf.py): SGD lr 2e-4,
momentum 0.9, Nesterov, weight decay 1e-4, batch 200; queue 16,384, m 0.999, T 0.07, class-aware
contrast, CE on the strong view ("weak_strong"), cosine kNN with 10 neighbours.
CIFAR-100-C is the same; ImageNet-C only has batch 64 (configs/methods/adacontrast_imagenet.yaml).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from metatta.methods.augment import color_jitter_views
from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.common import classifier_layer, ema_update, features_and_logits, step_or_refuse
from metatta.methods.memo import marginal_entropy

DISTANCES = ("cosine", "euclidean")
CONTRAST_TYPES = ("class_aware", "all")
CE_VIEWS = ("weak_strong", "weak_weak")
PREDICT_STATISTICS = ("running", "batch")


@dataclasses.dataclass
class AdaContrastConfig(MethodConfig):
    optimizer: str = "sgd"  # OPTIM.METHOD
    lr: float = 2e-4  # OPTIM.LR
    lr_batch_size: int | None = 200  # their CIFAR-10-C batch (TEST.BATCH_SIZE)
    momentum: float = 0.9  # OPTIM.MOMENTUM
    nesterov: bool = True  # OPTIM.NESTEROV (with momentum > 0)
    weight_decay: float = 1e-4  # OPTIM.WD
    queue_size: int = 16384  # ADACONTRAST.QUEUE_SIZE: the key queue and the kNN bank
    key_momentum: float = 0.999  # M_TEACHER.MOMENTUM: the key encoder's EMA
    temperature: float = 0.07  # CONTRAST.TEMPERATURE (T_moco)
    contrast_type: str = "class_aware"  # class_aware: same-pseudo-label negatives masked | all
    alpha: float = 1.0  # weight of the cross-entropy to the pseudo-labels
    beta: float = 1.0  # weight of the InfoNCE term
    eta: float = 1.0  # weight of the diversity term
    ce_views: str = "weak_strong"  # CE_SUP_TYPE: CE and diversity on the strong view | weak_weak: the weak one
    refine: bool = True  # REFINE_METHOD nearest_neighbors (False: argmax of the weak view)
    num_neighbors: int = 10  # NUM_NEIGHBORS
    distance: str = "cosine"  # DIST_TYPE: cosine | euclidean
    refine_after: int = 1024  # their first_X_samples: argmax pseudo-labels until this many test images
    # The prediction's BN statistics: "running" (theirs: eval mode, the running statistics moved by the
    # train-mode adaptation passes, so they trail a new domain by ~10 batches) | "batch" (the test batch's).
    predict_statistics: str = "running"
    classifier: str | None = None  # the linear classifier's module name; None: the last nn.Linear

    def validate(self) -> None:
        super().validate()
        for name in ("queue_size", "num_neighbors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.refuse(name, "an integer >= 1")
        if not isinstance(self.refine_after, int) or isinstance(self.refine_after, bool) or self.refine_after < 0:
            self.refuse("refine_after", "an integer >= 0")
        if not 0.0 <= self.key_momentum <= 1.0:
            self.refuse("key_momentum", "a number in [0, 1]")
        if not self.temperature > 0:
            self.refuse("temperature", "a number > 0")
        for name in ("alpha", "beta", "eta"):
            if not getattr(self, name) >= 0:
                self.refuse(name, "a number >= 0")
        for name, allowed in (("distance", DISTANCES), ("contrast_type", CONTRAST_TYPES), ("ce_views", CE_VIEWS),
                              ("predict_statistics", PREDICT_STATISTICS)):
            if getattr(self, name) not in allowed:
                self.refuse(name, "one of " + ", ".join(map(repr, allowed)))


# ---- the views ------------------------------------------------------------------------------------
def _coins(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _flip_some(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def weak_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Their "plain" transform at the image's own size: a horizontal flip with probability 1/2 per image."""
    return _flip_some(x, _coins(len(x), 0.5, generator))


def gaussian_blur_per_image(x: torch.Tensor, sigma: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Separable Gaussian blur of each image of (B, C, H, W) with its own sigma (B,), edge padding."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.softmax(-(taps.view(1, -1) / sigma.double().view(-1, 1)).pow(2) / 2, dim=1)
    kernel = kernel.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 2 * radius + 1)
    height, width = x.shape[-2:]
    y = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    y = sum(kernel[..., i] * y[..., i: i + width] for i in range(2 * radius + 1))
    return sum(kernel[..., i] * y[..., i: i + height, :] for i in range(2 * radius + 1))


def strong_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Their moco-v2-light transform at the image's own size, drawn per image (module docstring)."""
    b = len(x)
    y = x.clamp(0.0, 1.0).clone()
    jitter = _coins(b, 0.8, generator).nonzero().flatten()
    if len(jitter):
        order = torch.rand(len(jitter), 4, generator=generator).argsort(1)  # a random order of the 4 ops
        factors = torch.ones(len(jitter), 5, dtype=torch.float64)  # brightness, contrast, saturation, hue, (gamma)
        factors[:, :3] = 0.6 + 0.8 * torch.rand(len(jitter), 3, generator=generator, dtype=torch.float64)
        factors[:, 3] = -0.1 + 0.2 * torch.rand(len(jitter), generator=generator, dtype=torch.float64)
        idx = jitter.to(y.device)
        y[idx] = color_jitter_views(y[idx].unsqueeze(1), order, factors).squeeze(1)
    if y.shape[1] == 3:
        grey = _coins(b, 0.2, generator).to(y.device).view(-1, 1, 1, 1)
        y = torch.where(grey, TF.rgb_to_grayscale(y, num_output_channels=3), y)
    blur = _coins(b, 0.5, generator).nonzero().flatten()
    if len(blur):
        sigma = 0.1 + 1.9 * torch.rand(len(blur), generator=generator)
        idx = blur.to(y.device)
        y[idx] = gaussian_blur_per_image(y[idx], sigma)
    return _flip_some(y, _coins(b, 0.5, generator))


# ---- the mechanism --------------------------------------------------------------------------------
@torch.no_grad()
def soft_knn_pseudo_labels(features: torch.Tensor, bank_features: torch.Tensor, bank_probs: torch.Tensor,
                           num_neighbors: int, distance: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, probs): for each row of `features`, the mean of `bank_probs` over its
    `num_neighbors` nearest bank entries (cosine or euclidean distance), and its argmax."""
    if distance == "cosine":
        distances = 1 - F.normalize(features, dim=1) @ F.normalize(bank_features, dim=1).t()
    elif distance == "euclidean":
        distances = torch.cdist(features, bank_features)
    else:
        raise ValueError(f"adacontrast: distance must be one of {DISTANCES}, got {distance!r}")
    nearest = distances.topk(min(num_neighbors, len(bank_features)), dim=1, largest=False).indices
    probs = bank_probs[nearest].mean(1)
    return probs.argmax(1), probs


def instance_logits(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """(B, 1 + K) MoCo logits of unit queries (B, D): [q.k, q.queue_j] / T, the key first."""
    positive = (queries * keys).sum(1, keepdim=True)
    return torch.cat([positive, queries @ queue.t()], dim=1) / temperature


def class_aware_instance_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor,
                              queue_labels: torch.Tensor | None) -> torch.Tensor:
    """InfoNCE (cross-entropy to column 0, the key) with the queue entries whose label equals the
    query's pseudo-label taken out of the negatives (logit -inf); `queue_labels` None: none masked."""
    if queue_labels is not None:
        same = pseudo_labels.view(-1, 1) == queue_labels.view(1, -1)  # (B, K)
        masked = torch.cat([torch.zeros_like(same[:, :1]), same], dim=1)
        logits = logits.masked_fill(masked, float("-inf"))
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def ring_positions(start: int, count: int, size: int, device: torch.device) -> torch.Tensor:
    """The slots `count` new entries take in a ring buffer of `size` from `start` (wrapping)."""
    return torch.arange(start, start + count, device=device) % size


@torch.no_grad()
def update_bank(features: torch.Tensor, probs: torch.Tensor, pointer: int, new_features: torch.Tensor,
                new_probs: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Their `update_labels`: while the bank holds fewer than `size` entries it grows by the whole
    batch; after that the batch replaces entries from `pointer` on, wrapping. The pointer is theirs,
    (pointer + batch) % the bank's new length, so the first replacement overwrites the batch added
    last while growing, and the ring goes on from the oldest entry after it. Returns the new
    (features, probs, pointer)."""
    end = pointer + len(new_features)
    if len(features) < size:
        features, probs = torch.cat([features, new_features]), torch.cat([probs, new_probs])
    else:
        slots = ring_positions(pointer, len(new_features), len(features), features.device)
        features, probs = features.clone(), probs.clone()
        features[slots], probs[slots] = new_features, new_probs
    return features, probs, end % len(features)


@register("adacontrast")
class AdaContrast(TTAMethod):
    Config = AdaContrastConfig

    def configure_model(self) -> None:
        self.model.train()
        self.model.requires_grad_(True)
        _, self.classifier = classifier_layer(self.model, self.config.classifier)

    def init_extra_state(self) -> None:
        cfg, device = self.config, self.classifier.weight.device
        self.key_encoder = copy.deepcopy(self.model).requires_grad_(False)
        _, self.key_classifier = classifier_layer(self.key_encoder, cfg.classifier)
        dim, num_classes = self.classifier.in_features, self.classifier.out_features
        # As their AdaMoCo: random unit features (drawn as a (D, K) matrix) and random labels.
        self.queue = F.normalize(torch.randn(dim, cfg.queue_size), dim=0).t().contiguous().to(device)
        self.queue_labels = torch.randint(0, num_classes, (cfg.queue_size,)).to(device)
        self.queue_pointer = 0
        self.bank_features = torch.zeros(0, dim, device=device)
        self.bank_probs = torch.zeros(0, num_classes, device=device)
        self.bank_pointer = 0
        self.seen = 0  # test images adapted on since the last reset (their first_X_samples)

    def collect_params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self, params: list) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":  # theirs is Nesterov SGD, which the base's SGD is not
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   nesterov=cfg.nesterov and cfg.momentum > 0)
        return super().build_optimizer(params)

    # ---- one step ---------------------------------------------------------------------------------
    def pseudo_labels(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Step 2: the kNN vote over the bank once `refine_after` images were seen, else argmax."""
        cfg = self.config
        if cfg.refine and self.seen >= cfg.refine_after and len(self.bank_features):
            return soft_knn_pseudo_labels(features, self.bank_features, self.bank_probs, cfg.num_neighbors,
                                          cfg.distance)[0]
        return logits.argmax(1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """The keys and their pseudo-labels replace the oldest queue entries (ring buffer)."""
        slots = ring_positions(self.queue_pointer, len(keys), len(self.queue), self.queue.device)
        self.queue[slots], self.queue_labels[slots] = keys, labels
        self.queue_pointer = (self.queue_pointer + len(keys)) % len(self.queue)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weak view and the two strong views (query, key) of a test batch; a fidelity harness
        replaces this to give both implementations the same views."""
        return weak_view(x), strong_view(x), strong_view(x)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        self.model.train()
        self.key_encoder.train()
        x_weak, x_query, x_key = (self.in_layout(view) for view in self.views(x))
        with torch.enable_grad():
            features_w, logits_w = features_and_logits(self.model, self.classifier, x_weak)
            with torch.no_grad():
                labels = self.pseudo_labels(features_w, logits_w)
            self.seen += len(x)
            features_q, logits_q = features_and_logits(self.model, self.classifier, x_query)
            queries = F.normalize(features_q, dim=1)
            with torch.no_grad():
                ema_update(zip(self.key_encoder.parameters(), self.model.parameters()), cfg.key_momentum)
                keys = F.normalize(features_and_logits(self.key_encoder, self.key_classifier, x_key)[0], dim=1)
                queue = self.queue.clone()
            logits_ins = instance_logits(queries, keys, queue, cfg.temperature)
            self.enqueue(keys, labels)
            instance = class_aware_instance_loss(
                logits_ins, labels, self.queue_labels if cfg.contrast_type == "class_aware" else None)
            supervised = logits_q if cfg.ce_views == "weak_strong" else logits_w
            loss = (cfg.alpha * F.cross_entropy(supervised, labels) + cfg.beta * instance
                    - cfg.eta * marginal_entropy(supervised))
            stepped = step_or_refuse(self, loss)
        if stepped:
            with torch.no_grad():
                features_k, logits_k = features_and_logits(self.key_encoder, self.key_classifier, x_weak)
                self.bank_features, self.bank_probs, self.bank_pointer = update_bank(
                    self.bank_features, self.bank_probs, self.bank_pointer, features_k, logits_k.softmax(1),
                    cfg.queue_size)
        return logits_w.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt (the base's loop: guard, episodic reset, NaN batches), then predict x with the
        adapted model in eval mode, as their `forward`."""
        super().forward(x)
        return self.predict(self.in_layout(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model in eval mode (BN: running statistics), or with `predict_statistics: batch` in
        train mode (BN: the batch's statistics; the running ones move but nothing reads them then)."""
        self.model.train(self.config.predict_statistics == "batch")
        try:
            with torch.no_grad():
                return self.model(x)
        finally:
            self.model.train()

    # ---- state ------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"key_encoder": self.key_encoder.state_dict(), "queue": self.queue, "queue_labels": self.queue_labels,
                "queue_pointer": self.queue_pointer, "bank_features": self.bank_features,
                "bank_probs": self.bank_probs, "bank_pointer": self.bank_pointer, "seen": self.seen}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.key_encoder.load_state_dict(state["key_encoder"])
        self.queue, self.queue_labels = state["queue"].clone(), state["queue_labels"].clone()
        self.bank_features, self.bank_probs = state["bank_features"].clone(), state["bank_probs"].clone()
        self.queue_pointer, self.bank_pointer, self.seen = state["queue_pointer"], state["bank_pointer"], state["seen"]

