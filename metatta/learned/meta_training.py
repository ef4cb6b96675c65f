"""Meta-training of the MGG (MGTTA's learned optimizer), as plain functions.

- Rollout workers (`RolloutWorker`) each own a share of the held-out-corruption
  images and their own TTA trajectory. Per learner step every worker runs one
  truncated unroll of K MGG-driven steps (`metatta.learned.unroll.unroll`) and
  returns the meta-gradient and metrics.
- The learner (`meta_train`) averages the meta-gradients (`average`), clips and
  steps Adam on the MGG (`guarded_step`) and sends the new weights with the next
  request. It checkpoints atomically every `checkpoint_every` steps, with every
  worker's data position, trajectory and generator states; `resume=True`
  carries on from the last checkpoint, in the same MLflow run, exactly as the
  uninterrupted training would (bit for bit), and does not log again the steps
  the interrupted run had logged after its last checkpoint.
- Where the workers run is the pool's business: `LocalPool` here (one process),
  `trainers.mgg.RayPool` as restartable Ray actors.

Options beyond the paper, every default the paper's configuration
(configs/fmnist_c/mgg_paper.yaml pins them):
- `learned_step_size` / `init_log_step_scale`: a meta-learned scale on the
  update (`metatta.learned.mgg`), carried by the saved adapter;
- `unroll_steps` K > 1 with `outer_loss_over` all | last and `outer_reduction`
  mean | sum: longer truncations, each worker unrolling its own trajectories;
- `outer_loss` lookahead | supervised, the latter on labelled held-out
  corruptions of the clean *training* split (`train_data: train_split`,
  `metatta.learned.heldout`); supervised on the -C files (test images) is refused;
- `inner_lr_max`: lr randomization, each trajectory at an inner lr drawn
  log-uniformly from [inner_lr, inner_lr_max] (an MGG that must work at any
  step size it meets, as learned optimizers are trained for robustness);
- stability: non-finite inner updates and truncations are skipped inside the
  unroll, and a learner step whose averaged meta-gradient or resulting weights
  are non-finite is undone; the counts are in every history entry and in
  `MGGTrainOutcome.skipped`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from metatta import tracking
from metatta.config import build_dataclass
from metatta.data import clean
from metatta.data.benchmark_files import fashion_mnist_c, images_per_severity
from metatta.data.domains import HELD_OUT_CORRUPTIONS, check_corruption_names
from metatta.data.shares import images_to_tensor, split_shares
from metatta.data.types import DomainData
from metatta.device import resolve_device
from metatta.learned.heldout import SPLIT, build_heldout_train_set
from metatta.learned.losses import LOSS_CHOICES, TTALoss, loss_kind_for
from metatta.learned.mgg import MGG, save_mgg
from metatta.learned.unroll import BACKENDS, OUTER_LOSS_OVER, OUTER_LOSSES, REDUCTIONS, Trajectory, unroll
from metatta.methods.common import configure_norm_adaptation
from metatta.models import load_source_model
from metatta.models.checkpoint import checkpoint_hash, load_feature_stats
from metatta.rng_state import capture_rng_state, restore_rng_state
from metatta.source import source_checkpoint
from metatta.training import TrainOutcome, benchmark_domains, load_state, method_error, save_state

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MGGTrainConfig:
    name: str = "mgg_fmnist"
    source_checkpoint: str | None = None  # else trained/cached from source_config
    source_config: str = "configs/fmnist_c/source.yaml"
    benchmark_root: str | None = None  # Fashion-MNIST-C is built when None
    corruptions: list[str] = dataclasses.field(default_factory=lambda: list(HELD_OUT_CORRUPTIONS))
    severity: int = 5
    train_images: int = 128  # in all, split evenly over corruptions, then over actors (paper: 128)
    val_images: int = 256  # per corruption, disjoint from the training images
    batch_size: int = 2  # paper: 2
    epochs: int = 40  # paper: 40
    unroll_steps: int = 1  # K; 1 is the paper's one-step lookahead
    inner_lr: float = 1e-4  # paper: adapt_lr during training
    # lr randomization: each trajectory draws its inner lr log-uniformly from [inner_lr, inner_lr_max],
    # so the MGG meets (and must stay useful at) the step sizes a user may set; None: inner_lr always
    inner_lr_max: float | None = None
    meta_lr: float = 1e-2  # paper: Adam lr on the MGG
    grad_clip: float = 1.0  # max global norm of the averaged meta-gradient
    loss: str = "entropy+stats"  # entropy | entropy+stats | auto (ViT: entropy+stats, else entropy)
    stats_lambda: float = 0.4
    reliable_entropy_factor: float | None = None  # EATA's entropy term (metatta.learned.losses); None: paper
    num_actors: int = 2
    eval_every: int = 0  # learner steps between validations; 0: only at the end
    val_batch_size: int = 64
    test_lr: float = 1e-3  # adapt_lr of MGTTA at validation/test time
    checkpoint_dir: str = "outputs/mgg"
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    register_as: str | None = "mgg"  # MLflow registered model name; None: do not register
    mlflow: bool = True
    backend: str = "higher"  # unroll engine: higher | func
    # ---- beyond the paper (defaults = the paper; see the module docstring) ----
    learned_step_size: bool = False  # meta-learn s in theta <- theta - lr * s * d (MGG.log_step_scale)
    init_log_step_scale: float = 0.0  # log s at the start (0: s = 1, the paper's step)
    outer_loss: str = "lookahead"  # lookahead: TTA loss of the next batch (paper) | supervised: its cross-entropy
    outer_loss_over: str = "all"  # all steps of an unroll | last step only
    outer_reduction: str = "mean"  # over the steps (outer_loss_over=all): mean | sum
    train_data: str = "benchmark"  # benchmark: the -C files (test split, as the paper) | train_split
    dataset: str = "fashion_mnist"  # clean dataset of train_data=train_split
    data_root: str | None = None  # where that clean dataset is (None: the loader's default places)
    heldout_seed: int = 0  # image choice and corruption seeds of train_data=train_split


SOURCE_FIELDS = ("train_mgg.source_checkpoint", "train_mgg.source_config")
TRAIN_DATA = ("benchmark", "train_split")
CHOICES = {"loss": LOSS_CHOICES, "outer_loss": OUTER_LOSSES, "outer_loss_over": OUTER_LOSS_OVER,
           "outer_reduction": REDUCTIONS, "train_data": TRAIN_DATA, "backend": BACKENDS}


def mgg_train_config(data: dict[str, Any]) -> MGGTrainConfig:
    """A checked config; every error names the field (train_mgg.<field>)."""
    cfg = build_dataclass(MGGTrainConfig, data, where="train_mgg")
    check_corruption_names(cfg.corruptions)
    for field in ("train_images", "batch_size", "epochs", "unroll_steps", "num_actors", "val_images"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"train_mgg.{field} must be >= 1, got {getattr(cfg, field)}")
    for field in ("inner_lr", "meta_lr", "test_lr"):
        if not getattr(cfg, field) > 0:
            raise ValueError(f"train_mgg.{field} must be > 0, got {getattr(cfg, field)}")
    if cfg.inner_lr_max is not None and not cfg.inner_lr_max >= cfg.inner_lr:
        raise ValueError(f"train_mgg.inner_lr_max must be >= train_mgg.inner_lr ({cfg.inner_lr}), got {cfg.inner_lr_max}")
    for field, allowed in CHOICES.items():
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"train_mgg.{field} {getattr(cfg, field)!r} is not one of {allowed}")
    if cfg.init_log_step_scale != 0.0 and not cfg.learned_step_size:
        raise ValueError("train_mgg.init_log_step_scale is set but train_mgg.learned_step_size is false")
    if not math.isfinite(cfg.init_log_step_scale):
        raise ValueError(f"train_mgg.init_log_step_scale must be finite, got {cfg.init_log_step_scale}")
    if cfg.outer_loss == "supervised" and cfg.train_data != "train_split":
        raise ValueError("train_mgg.outer_loss 'supervised' needs train_mgg.train_data 'train_split': the "
                         "benchmark files are built from the test split, whose labels must not train anything")
    check_unroll_fits(cfg)
    return cfg


def check_unroll_fits(cfg: MGGTrainConfig, why: str = "", hint: str = "") -> None:
    """Every actor's share of every corruption holds at least one unroll."""
    per_actor = cfg.train_images // (len(cfg.corruptions) * cfg.num_actors)
    needed = cfg.unroll_steps + 1  # a fresh trajectory primes on one batch, then steps K times
    if per_actor < cfg.batch_size * needed:
        raise ValueError(
            f"train_mgg.train_images: {cfg.train_images} training images{why} over {len(cfg.corruptions)} "
            f"corruptions and {cfg.num_actors} actors leave {per_actor} per actor and corruption; an unroll of "
            f"train_mgg.unroll_steps={cfg.unroll_steps} needs at least {needed} batches of {cfg.batch_size}{hint}"
        )


def images_per_corruption(cfg: MGGTrainConfig, domains: list[DomainData] | None = None) -> int:
    """How many distinct images each corruption can have: the given domains' smallest, else those of
    the clean training split (train_split: disjoint per corruption) or of a benchmark severity block."""
    if domains is not None:
        return min(len(d) for d in domains)
    if cfg.train_data == "train_split":
        _, labels = clean.load_clean(cfg.dataset, SPLIT, cfg.data_root)
        return len(labels) // len(cfg.corruptions)
    root = Path(cfg.benchmark_root) if cfg.benchmark_root else fashion_mnist_c(corruptions=list(cfg.corruptions))
    return images_per_severity(root)


def fit_image_counts(cfg: MGGTrainConfig, available: int) -> MGGTrainConfig:
    """`cfg` with train_images and val_images scaled down together, with a warning, when a corruption
    needs more images (train_images / #corruptions + val_images) than the `available` ones (a small
    dataset, e.g. a digits-sized one): the same training/validation split of what there is. Raises,
    naming the fields, when even that leaves an actor no full unroll."""
    corruptions = len(cfg.corruptions)
    needed = cfg.train_images // corruptions + cfg.val_images
    if needed <= available:
        return cfg
    scale = available / needed
    val_images = max(1, math.floor(cfg.val_images * scale))
    train_images = (available - val_images) * corruptions
    log.warning("train_mgg: train_images %d and val_images %d need %d images per corruption, but the data holds %d; "
                "using train_images %d and val_images %d (the same split of what there is)", cfg.train_images,
                cfg.val_images, needed, available, train_images, val_images)
    fitted = dataclasses.replace(cfg, train_images=train_images, val_images=val_images)
    check_unroll_fits(fitted, why=f" (scaled down to {available} images per corruption)",
                      hint="; on this dataset lower train_mgg.batch_size, unroll_steps or num_actors")
    return fitted


def build_mgg(cfg: MGGTrainConfig):
    """The MGG architecture this config trains (learner and actors build the same one)."""
    return MGG(learned_step_size=cfg.learned_step_size, init_log_step_scale=cfg.init_log_step_scale)


# ---- data ----------------------------------------------------------------------------------
def split_domains(domains: list[DomainData], cfg: MGGTrainConfig) -> tuple[list[list[DomainData]], list[DomainData]]:
    """Training shares (one list of domains per actor) and the validation domains
    (`metatta.data.shares.split_shares` with this config's sizes)."""
    return split_shares(domains, cfg.train_images, cfg.num_actors, cfg.val_images)


def training_domains(cfg: MGGTrainConfig) -> tuple[list[DomainData], dict[str, Any] | None]:
    """The held-out-corruption domains and, for train_data=train_split, their provenance."""
    if cfg.train_data == "train_split":
        per_domain = cfg.train_images // len(cfg.corruptions) + cfg.val_images
        held_out = build_heldout_train_set(cfg.corruptions, cfg.severity, per_domain, cfg.dataset, cfg.data_root,
                                           cfg.heldout_seed)
        return held_out.domains, held_out.provenance
    return benchmark_domains(cfg.benchmark_root, cfg.corruptions, [cfg.severity]), None


# ---- the rollout side -----------------------------------------------------------------------
def source_parts(checkpoint: str, device: torch.device):
    """(source model, clean feature statistics) from a source checkpoint."""
    return load_source_model(checkpoint, device=device), load_feature_stats(checkpoint, device=device)


def make_loss(cfg: MGGTrainConfig, source_stats, model: torch.nn.Module):
    """The inner loop's test-time loss on `model` (`loss: auto` resolved against it: the ViT's
    CLS-statistics loss for a ViT), the loss MGTTA will use with the trained MGG."""
    kind = loss_kind_for(cfg.loss, model)
    return TTALoss(kind, source_stats if kind != "entropy" else None, cfg.stats_lambda,
                   reliable_factor=cfg.reliable_entropy_factor)


class RolloutWorker:
    """Owns a share of the training images and one persistent trajectory.

    It walks its share domain by domain (a fresh trajectory per domain, as the
    MGG's memory resets per domain at test time), in a seeded order that
    changes every epoch. `state_dict()` is where it stands (epoch, position in
    the epoch, trajectory, generators); a worker built with `state=` carries on
    from there exactly (a resumed training)."""

    def __init__(self, share: list[DomainData], checkpoint: str, cfg: MGGTrainConfig, index: int,
                 state: dict[str, Any] | None = None):
        self.cfg, self.index = cfg, index
        self.device = resolve_device(cfg.device)
        model, stats = source_parts(checkpoint, self.device)
        configure_norm_adaptation(model)
        self.trajectory = Trajectory(model, make_loss(cfg, stats, model), backend=cfg.backend)
        self.mgg = build_mgg(cfg).to(self.device)
        self.domains = [(images_to_tensor(d.images), torch.from_numpy(np.asarray(d.labels)).long(), d.name) for d in share]
        self.epoch, self.queue = -1, []
        self.domains_done, self.batches_done = 0, 0  # position in the epoch's queue
        self.lr_generator = torch.Generator().manual_seed(cfg.seed * 100_003 + index * 1009 + 7)
        self.inner_lr = cfg.inner_lr
        if state is None:
            self._next_epoch()
        else:
            self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """Everything the next requests depend on besides the MGG weights: the data position
        (epoch, domains finished in it, batches taken of the current one), the trajectory, the
        inner-lr generator and this process's global generators (CPU tensors and plain values)."""
        return {"index": self.index, "epoch": self.epoch, "domains_done": self.domains_done,
                "batches_done": self.batches_done, "inner_lr": self.inner_lr,
                "lr_generator": self.lr_generator.get_state(), "trajectory": self.trajectory.state_dict(),
                "rng": capture_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["index"]) != self.index:
            raise ValueError(f"rollout worker {self.index}: given the state of worker {state['index']}")
        self.epoch, self.domains_done, self.batches_done = (int(state[k]) for k in ("epoch", "domains_done",
                                                                                    "batches_done"))
        queue = self._epoch_queue(self.epoch)[self.domains_done:]
        if queue:
            name, batches = queue[0]
            queue[0] = (name, batches[self.batches_done:])
        self.queue = queue
        self.inner_lr = float(state["inner_lr"])
        self.lr_generator.set_state(state["lr_generator"])
        self.trajectory.load_state_dict(state["trajectory"])
        restore_rng_state(state["rng"])

    def _new_trajectory(self) -> None:
        """Start a fresh trajectory, with a fresh inner lr when `inner_lr_max` is set."""
        self.trajectory.reset()
        if self.cfg.inner_lr_max is not None:
            u = float(torch.rand((), generator=self.lr_generator))
            low, high = math.log(self.cfg.inner_lr), math.log(self.cfg.inner_lr_max)
            self.inner_lr = math.exp(low + u * (high - low))

    def _epoch_queue(self, epoch: int) -> list[tuple[str, list]]:
        """The (domain name, batches) of an epoch, in its seeded order (a function of the epoch only)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.index * 1009 + epoch)
        queue = []
        for k in torch.randperm(len(self.domains), generator=g).tolist():
            x, y, name = self.domains[k]
            order = torch.randperm(len(y), generator=g)
            batches = [(x[order[i:i + self.cfg.batch_size]], y[order[i:i + self.cfg.batch_size]])
                       for i in range(0, len(y) - self.cfg.batch_size + 1, self.cfg.batch_size)]
            queue.append((name, batches))
        return queue

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.queue = self._epoch_queue(self.epoch)
        self.domains_done, self.batches_done = 0, 0
        self._new_trajectory()

    def _take(self, count: int) -> list:
        """`count` batches of the current domain, moving on (and resetting the
        trajectory) when the domain has fewer left than an unroll needs."""
        while True:
            if not self.queue:
                self._next_epoch()
            name, batches = self.queue[0]
            if len(batches) >= count:
                taken, self.queue[0] = batches[:count], (name, batches[count:])
                self.batches_done += count
                return [(x.to(self.device), y.to(self.device)) for x, y in taken]
            self.queue.pop(0)
            self.domains_done, self.batches_done = self.domains_done + 1, 0
            self._new_trajectory()
            count = self.trajectory.batches_needed(self.cfg.unroll_steps)

    def run(self, mgg_state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One truncated unroll with the given MGG weights: meta-gradient and metrics."""
        self.mgg.load_state_dict(mgg_state)
        start = time.perf_counter()
        batches = self._take(self.trajectory.batches_needed(self.cfg.unroll_steps))
        cfg = self.cfg
        result = unroll(self.mgg, self.trajectory, batches, K=cfg.unroll_steps, inner_lr=self.inner_lr,
                        reduction=cfg.outer_reduction, outer_loss=cfg.outer_loss, outer_loss_over=cfg.outer_loss_over)
        metrics = {**result.metrics, "unroll_seconds": time.perf_counter() - start, "epoch": float(self.epoch),
                   "inner_lr": self.inner_lr}
        return {"grads": result.grads, "metrics": metrics, "steps": cfg.unroll_steps, "skipped": result.skipped}


# ---- the learner ------------------------------------------------------------------------------
def check_worker_states(states: list[dict[str, Any]] | None, num_workers: int) -> list[dict[str, Any] | None]:
    """One state (or None: a fresh start) per worker; a checkpoint for another number of
    workers cannot be resumed exactly."""
    if states is None:
        return [None] * num_workers
    if len(states) != num_workers:
        raise ValueError(f"--resume: the learner checkpoint holds {len(states)} rollout worker states, "
                         f"train_mgg.num_actors is {num_workers}; resume with num_actors={len(states)}")
    return list(states)


class LocalPool:
    """The rollout workers in this process; `trainers.mgg.RayPool` is the same as Ray actors.

    `states`: one `RolloutWorker.state_dict()` per worker to carry on from (a resumed training)."""

    def __init__(self, shares, checkpoint, cfg, states=None):
        states = check_worker_states(states, len(shares))
        self.workers = [RolloutWorker(share, checkpoint, cfg, i, state)
                        for i, (share, state) in enumerate(zip(shares, states))]

    def run(self, mgg_state):
        return [w.run(mgg_state) for w in self.workers]

    def states(self) -> list[dict[str, Any]]:
        """Every worker's `state_dict()`, for the learner checkpoint."""
        return [w.state_dict() for w in self.workers]

    def checkpointed(self, states) -> None:
        """The learner saved a checkpoint with these worker states (a restarted Ray actor
        continues from them; workers in this process are never restarted)."""

    def shutdown(self):
        self.workers = []


@dataclasses.dataclass
class MGGTrainOutcome(TrainOutcome):
    mgg: Any = None
    steps: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # see skip_totals
    data_provenance: dict[str, Any] | None = None  # train_data=train_split: where every image came from


SKIP_COUNTERS = {"inner_updates": "skipped_inner_updates", "unrolls": "skipped_unrolls",
                 "meta_steps": "skipped_meta_step"}


def average(outputs: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor] | None, dict[str, float]]:
    """Mean meta-gradient over the actors whose unroll was not skipped (None if all were),
    mean metrics over those (over all when all were skipped), and skip counts summed."""
    kept = [o for o in outputs if not o.get("skipped", False)]
    grads = None
    if kept:
        grads = {n: torch.stack([o["grads"][n] for o in kept]).mean(0) for n in kept[0]["grads"]}
    pool = kept or outputs
    keys = set.intersection(*(set(o["metrics"]) for o in pool))
    metrics = {k: float(np.mean([o["metrics"][k] for o in pool])) for k in sorted(keys)}
    metrics["skipped_inner_updates"] = float(sum(o["metrics"].get("skipped_inner_updates", 0.0) for o in outputs))
    metrics["skipped_unrolls"] = float(len(outputs) - len(kept))
    return grads, metrics


def guarded_step(mgg, optimizer, grads: dict[str, torch.Tensor] | None, grad_clip: float) -> dict[str, float]:
    """Clip and apply the averaged meta-gradient; undo the step (weights and optimizer
    state) when the gradient or the new weights are not finite. Returns metrics."""
    if grads is None or not all(torch.isfinite(g).all() for g in grads.values()):
        return {"skipped_meta_step": 1.0}
    weights = {k: v.clone() for k, v in mgg.state_dict().items()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    optimizer.zero_grad(set_to_none=True)
    for name, p in mgg.named_parameters():
        if name in grads:
            p.grad = grads[name].to(p.dtype)
    norm = float(torch.nn.utils.clip_grad_norm_(mgg.parameters(), grad_clip))
    optimizer.step()
    if all(torch.isfinite(p).all() for p in mgg.parameters()):
        return {"meta_grad_norm_clipped": norm, "skipped_meta_step": 0.0}
    log.warning("meta step gave non-finite MGG weights; undone")
    mgg.load_state_dict(weights)
    optimizer.load_state_dict(opt_state)
    return {"meta_grad_norm_clipped": norm, "skipped_meta_step": 1.0}


def skip_totals(history: list[dict[str, float]]) -> dict[str, int]:
    """What the stability guards skipped over a training: non-finite inner updates (in
    all unrolls), unrolls (per actor) and learner steps."""
    return {name: int(sum(h.get(key, 0.0) for h in history)) for name, key in SKIP_COUNTERS.items()}


def steps_per_epoch(shares: list[list[DomainData]], cfg: MGGTrainConfig) -> int:
    """Learner steps for every actor to see its share once (one priming batch per domain)."""
    per_actor = []
    for share in shares:
        batches = [len(d) // cfg.batch_size for d in share]
        per_actor.append(sum(max(1, (b - 1) // cfg.unroll_steps) for b in batches))
    return max(1, min(per_actor))


def checkpoint_path(cfg: MGGTrainConfig) -> Path:
    return Path(cfg.checkpoint_dir) / cfg.name / "learner.pt"


def save_checkpoint(path: Path, mgg, optimizer, step: int, run_id: str | None, history,
                    workers: list[dict[str, Any]]) -> None:
    """The learner's state after `step`: MGG, optimizer, history, MLflow run, every rollout
    worker's `state_dict()` and the learner process's generators; resuming from it continues
    the training exactly as if it had not stopped."""
    save_state(path, {"mgg": mgg.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                      "run_id": run_id or "", "history": history, "workers": workers,
                      "rng": capture_rng_state()})


def load_checkpoint(path: Path) -> dict[str, Any]:
    return load_state(path, "learner checkpoint", context="--resume")


def mgtta_config(cfg: MGGTrainConfig) -> dict[str, Any]:
    """The MGTTA config an MGG trained by `cfg` is validated and tested with: its test lr and the
    test-time loss it was meta-trained on."""
    return {"lr": cfg.test_lr, "loss": cfg.loss, "stats_lambda": cfg.stats_lambda,
            "reliable_entropy_factor": cfg.reliable_entropy_factor}


def validation_error(mgg, checkpoint: str, val_domains: list[DomainData], cfg: MGGTrainConfig) -> float:
    """Mean error of MGTTA with this MGG over the validation domains (reset per domain)."""
    device = resolve_device(cfg.device)
    model, stats = source_parts(checkpoint, device)
    return method_error("mgtta", model, mgtta_config(cfg), val_domains, cfg.val_batch_size, cfg.seed, device,
                        mgg=mgg, source_stats=stats)


def meta_train(
    cfg: MGGTrainConfig,
    pool_class: Callable[[list[list[DomainData]], str, MGGTrainConfig, list | None], Any] | None = None,
    *,
    resume: bool = False,
    domains: list[DomainData] | None = None,
    on_step: Callable[[int, Any], None] | None = None,
) -> MGGTrainOutcome:
    """Meta-train the MGG; register it in MLflow and move the champion alias
    when it beats the current one on the validation stream.

    `pool_class(shares, checkpoint, cfg, worker_states)` holds the rollout workers (`run(mgg_state)`
    -> one output per worker, `states()` -> their `RolloutWorker.state_dict()`s, `checkpointed(states)`,
    `shutdown()`; `worker_states` None: fresh workers): `LocalPool` (the default) runs them in this process,
    `trainers.mgg.RayPool` as Ray actors. `domains`: the domains to split into training
    shares and validation sets (None: `training_domains(cfg)`); `on_step(step, pool)` is
    called after every learner step."""
    pool_class = pool_class or LocalPool
    torch.manual_seed(cfg.seed)
    cfg = fit_image_counts(cfg, images_per_corruption(cfg, domains))  # before a source model trains
    checkpoint = source_checkpoint(cfg.source_checkpoint, cfg.source_config, SOURCE_FIELDS)
    provenance = None
    if domains is None:
        domains, provenance = training_domains(cfg)
    shares, val_domains = split_domains(domains, cfg)
    total_steps = cfg.epochs * steps_per_epoch(shares, cfg)

    mgg = build_mgg(cfg)
    optimizer = torch.optim.Adam(mgg.parameters(), lr=cfg.meta_lr)
    step, run_id, history, worker_states, learner_rng = 0, None, [], None, None
    ckpt = checkpoint_path(cfg)
    if resume:
        state = load_checkpoint(ckpt)
        mgg.load_state_dict(state["mgg"])
        optimizer.load_state_dict(state["optimizer"])
        step, run_id, history = int(state["step"]), state["run_id"] or None, list(state["history"])
        worker_states, learner_rng = state.get("workers"), state.get("rng")
        if worker_states is not None:
            check_worker_states(worker_states, len(shares))  # before any worker starts
        else:
            log.warning("%s has no rollout worker states (written before they were saved): the workers start "
                        "at epoch 0 and the resumed training differs from an uninterrupted one", ckpt)
        log.info("resumed from %s at step %d of %d", ckpt, step, total_steps)

    pool = pool_class(shares, str(checkpoint), cfg, worker_states)
    if learner_rng is not None:  # after the pool: building local workers draws from this process's generators
        restore_rng_state(learner_rng)
    run_ctx = tracking.training_run(cfg.name, dataclasses.asdict(cfg), {"kind": "mgg-meta-training"}, run_id,
                                    enabled=cfg.mlflow)
    try:
        with run_ctx as run:
            run_id = run.info.run_id if run is not None else None
            # steps the interrupted run logged after its last checkpoint: recomputed identically, not logged twice
            logged = tracking.logged_steps(run_id, "meta_loss") if run is not None and resume else set()
            progress = tqdm(total=total_steps, initial=step, desc=f"meta-train {cfg.name}")
            while step < total_steps:
                start = time.perf_counter()
                outputs = pool.run({k: v.detach().cpu() for k, v in mgg.state_dict().items()})
                grads, metrics = average(outputs)
                metrics.update(guarded_step(mgg, optimizer, grads, cfg.grad_clip))
                step += 1
                seconds = time.perf_counter() - start
                metrics["unroll_steps_per_second"] = sum(o["steps"] for o in outputs) / seconds
                metrics["step"] = float(step)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    metrics["validation_error"] = validation_error(mgg, checkpoint, val_domains, cfg)
                history.append(metrics)
                progress.update(1)
                progress.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}")
                if step % cfg.log_every == 0 or step == total_steps or "validation_error" in metrics:
                    log.info("step %d/%d meta_loss %.4f%s", step, total_steps, metrics["meta_loss"],
                             f" val_error {metrics['validation_error']:.2f}" if "validation_error" in metrics else "")
                    if run is not None and step not in logged:
                        tracking.log_metrics(metrics, step=step)
                if step % cfg.checkpoint_every == 0 or step == total_steps:
                    workers = pool.states()
                    save_checkpoint(ckpt, mgg, optimizer, step, run_id, history, workers)
                    pool.checkpointed(workers)
                if on_step is not None:
                    on_step(step, pool)
            progress.close()
            val_error = validation_error(mgg, checkpoint, val_domains, cfg)
            log.info("final validation error (held-out corruptions, MGTTA): %.2f%%", val_error)
            adapter_dir = save_mgg(mgg, Path(cfg.checkpoint_dir) / cfg.name / "adapter", extra={
                "source_checkpoint": str(checkpoint),
                "source_checkpoint_sha256": checkpoint_hash(checkpoint),
                "train_config": dataclasses.asdict(cfg),
                "validation_error": val_error,
                "steps": step,
                "skipped": skip_totals(history),
                "train_data_provenance": provenance,
            })
            if run is not None:
                tracking.log_metrics({"final_validation_error": val_error}, step=step)
            version, promoted = tracking.register_and_promote(cfg.register_as, adapter_dir, run_id, val_error)
    finally:
        pool.shutdown()
    return MGGTrainOutcome(validation_error=val_error, adapter_dir=adapter_dir, registered_version=version,
                           promoted=promoted, history=history, run_id=run_id, mgg=mgg, steps=step,
                           skipped=skip_totals(history), data_provenance=provenance)
