"""Training of CTA's networks and of its joint-training TTT baseline, on Ray Train.

CTA (`method: cta`), three stages (SPECS.md, "CTA"):
1. supervised encoder + classifier: the source model (trained by
   metatta/source.py if it is not cached yet), reused as it is: it is what
   every other method adapts, so CTA and the baselines share one classifier;
2. `simclr`: an encoder of the same architecture, from random weights, with
   SimCLR's projection head and NT-Xent loss on two augmentations per image;
3. `align`: the SimCLR encoder trained so its features match the frozen
   supervised encoder's (symmetric InfoNCE, `metatta.ssl.align`) on the same
   lightly augmented image (the source recipe's crop and flip). The
   projection head is kept, frozen, for test time.
TTT (`method: ttt`), one stage, `joint`: the source encoder and classifier
with a new rotation head, trained on cross-entropy + rotation_weight x
rotation loss (Sun et al. train from scratch; starting from the source model
costs a fraction of that on a CPU, and gives TTT the same classifier as CTA).

Each stage runs on Ray Train: a `TorchTrainer` with `num_workers` workers
(gloo on CPU, NCCL on GPU), each on its own shard of the clean training set,
the model in DDP. Every worker runs `run_stage`, a plain function that tests
call without Ray. After every epoch rank 0 writes the stage checkpoint
(`<checkpoint_dir>/<name>/<stage>.pt`, atomic: model, optimizer, epoch,
metric history) and logs the epoch's metrics to the MLflow run. A stage
always continues from its checkpoint when there is one, so a worker group
that Ray Train restarts (`max_failures`) and a job started again with
`--resume` both carry on from the last finished epoch; an epoch's shuffling
and augmentation are seeded by (seed, stage, epoch, rank), so a resumed run
computes what an uninterrupted one would. Without `--resume` old stage
checkpoints of the same name are deleted first.

At the end: the validation error of the method with the trained network on
held-out corruptions (the four that MGG training uses; reported errors are on
the fifteen others), the adapter directory (`metatta.ssl.networks`: plain
weights, weights-only loading), registration as MLflow model `register_as`,
and the `champion` alias moved when the version beats the holder
(`tracking.promote_if_better`, as for the MGG).

Choices the paper leaves open: Adam with cosine decay after a 5% linear warmup
in every stage; SimCLR lr 1e-3, temperature 0.5 (SimCLR's CIFAR value), batch
256 per worker, negatives from the worker's own batch; alignment lr 3e-3,
batch 128 per worker, temperature 0.03. The alignment temperature matters
most: post-ReLU pooled features all have high cosine similarity to each other,
so the frozen classifier needs a much closer match than InfoNCE at 0.1 asks
for (measured, 100 steps of 128 from the same SimCLR encoder: clean error of
the frozen classifier on the SSL features 26.4% at 0.1 / lr 1e-3, 19.4% at
0.03 / lr 3e-3); CLIP's learned temperature ends near 0.01. Per-worker
threads: Ray gives each worker one CPU (OMP_NUM_THREADS=1).

Alignment is InfoNCE + `feature_weight` (default 1) x a feature-matching term
(relative squared error of the raw pooled features), not InfoNCE alone. Why
(benchmarks/cta_sweep.py, held-out corruptions, 8,000 training images, 8
SimCLR + 6 alignment epochs, results in benchmarks/results/cta_sweep.md):
InfoNCE sees directions only, and the aligned features came out at 0.40x the
supervised encoder's norm, so the frozen classifier was underconfident (mean
confidence 53% vs 81%) and misread them: held-out error 31.5% before
adaptation (supervised encoder with batch statistics: 24.8%). Rescaling those
features by one label-free scalar recovers only 0.6 points (30.9), so the
directions are off too; training with the extra term gives norm ratio 0.79,
cosine 0.93 vs 0.89 and error 29.6 before adaptation, 28.5 after 20 test-time
steps (InfoNCE alone: 32.8). `simclr_weight` (NT-Xent during alignment, the
projector training too) and `augment: simclr` (align on a SimCLR view) are
options. Measured later on the same held-out sweep (cta_sweep_e8_v2.md,
cta_sweep_e8_combo.md), CTA error at 0 / 5 / 20 test-time steps: temperature
0.03 29.6 / 29.5 / 28.4; 0.1 26.5 / 25.1 / 26.9; simclr_weight 1 29.1 / 27.5 /
24.4; both 26.5 / 25.6 / 21.6 (BN 24.8); augment simclr 43.0 (worse).
configs/fmnist_c/cta.yaml therefore sets temperature 0.1 and simclr_weight 1;
the dataclass defaults here stay as they were (the tests' tiny runs use them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from metatta.config import build_dataclass
from metatta.data.domains import HELD_OUT_CORRUPTIONS, check_corruption_names
from metatta.data.types import DomainData
from metatta.device import resolve_device
from metatta.source import source_checkpoint

log = logging.getLogger(__name__)

STAGES = {"cta": ("simclr", "align"), "ttt": ("joint",)}
STAGE_SEEDS = {"simclr": 1, "align": 2, "joint": 3}  # one random stream per stage
HEADS = {"cta": "projector", "ttt": "rotation"}


@dataclasses.dataclass
class StageConfig:
    epochs: int = 1
    batch_size: int = 256  # per worker
    lr: float = 1e-3  # Adam, cosine decay after a linear warmup
    weight_decay: float = 1e-6
    warmup_fraction: float = 0.05
    temperature: float = 0.5  # simclr: NT-Xent; align: InfoNCE; unused by joint


# One class per stage, so that a partial override ({"epochs": 5}) keeps that stage's other defaults.
@dataclasses.dataclass
class SimCLRStageConfig(StageConfig):
    epochs: int = 3


@dataclasses.dataclass
class AlignStageConfig(StageConfig):
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    temperature: float = 0.03
    # + feature_weight x relative squared error of the raw features (metatta.ssl.align.feature_matching_loss):
    # InfoNCE leaves the SSL features' norm free, the frozen classifier does not ignore it. 0: InfoNCE only
    # (the paper's loss). 1 measured better on the held-out corruptions (module docstring).
    feature_weight: float = 1.0
    # + simclr_weight x NT-Xent of two SimCLR views (the projector trains too): keeps the SSL task, and the
    # projector the test-time loss goes through, consistent with the aligned encoder. 0: projector frozen.
    simclr_weight: float = 0.0
    # the image both encoders see: "light" (the source recipe's crop and flip) or "simclr" (one SimCLR view:
    # the supervised encoder's features are matched on a wider input distribution than it was trained on)
    augment: str = "light"


@dataclasses.dataclass
class JointStageConfig(StageConfig):
    lr: float = 5e-4


@dataclasses.dataclass
class CTATrainConfig:
    name: str = "cta_fmnist"
    method: str = "cta"  # cta | ttt
    source_checkpoint: str | None = None  # else trained/cached from source_config
    source_config: str = "configs/fmnist_c/source.yaml"
    train_images: int | None = None  # first N clean training images (quick runs); None: all
    num_workers: int = 2  # Ray Train workers (one CPU, or one GPU, each)
    max_failures: int = 1  # worker-group restarts Ray Train makes; each resumes from the stage checkpoint
    simclr: SimCLRStageConfig = dataclasses.field(default_factory=SimCLRStageConfig)
    align: AlignStageConfig = dataclasses.field(default_factory=AlignStageConfig)
    joint: JointStageConfig = dataclasses.field(default_factory=JointStageConfig)
    head_hidden: int = 128  # projection / rotation head: Linear(D, hidden) -> ReLU -> Linear(hidden, out)
    projection_dim: int = 64
    rotation_weight: float = 1.0  # joint: cross-entropy + rotation_weight * rotation loss
    crop_scale: tuple[float, float] = (0.2, 1.0)  # SimCLR's random resized crop
    crop_padding: int = 2  # align / joint: the source recipe's random crop (and horizontal flip)
    channels_last: bool = True  # NHWC weights and batches: faster convolutions on CPU (as metatta/source.py)
    # validation: the method with the trained network on held-out corruptions (the champion rule)
    benchmark_root: str | None = None  # Fashion-MNIST-C is built when None
    val_corruptions: list[str] = dataclasses.field(default_factory=lambda: list(HELD_OUT_CORRUPTIONS))
    val_severity: int = 5
    val_images: int = 500  # per corruption
    val_batch_size: int = 200
    method_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's test-time config
    checkpoint_dir: str = "outputs/cta"
    register_as: str | None = "cta"  # MLflow registered model; None: do not register
    mlflow: bool = True
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def cta_train_config(data: dict[str, Any] | CTATrainConfig) -> CTATrainConfig:
    cfg = data if isinstance(data, CTATrainConfig) else build_dataclass(CTATrainConfig, data, where="train_cta")
    if cfg.method not in STAGES:
        raise ValueError(f"train_cta.method must be one of {sorted(STAGES)}, got {cfg.method!r}")
    check_corruption_names(cfg.val_corruptions)
    for field in ("num_workers", "head_hidden", "projection_dim", "val_images", "val_batch_size"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"train_cta.{field} must be >= 1, got {getattr(cfg, field)}")
    if cfg.train_images is not None and cfg.train_images < 1:
        raise ValueError(f"train_cta.train_images must be >= 1 or null, got {cfg.train_images}")
    for stage in STAGES[cfg.method]:
        s = getattr(cfg, stage)
        if s.epochs < 1 or s.batch_size < 2 or s.lr <= 0 or s.temperature <= 0 or not 0 <= s.warmup_fraction < 1:
            raise ValueError(f"train_cta.{stage}: need epochs >= 1, batch_size >= 2, lr > 0, temperature > 0 and "
                             f"0 <= warmup_fraction < 1 (got {s})")
    if cfg.align.augment not in ("light", "simclr"):
        raise ValueError(f"train_cta.align.augment must be 'light' or 'simclr', got {cfg.align.augment!r}")
    if cfg.align.feature_weight < 0 or cfg.align.simclr_weight < 0:
        raise ValueError(f"train_cta.align: feature_weight and simclr_weight must be >= 0, got "
                         f"{cfg.align.feature_weight} and {cfg.align.simclr_weight}")
    # Ray Train workers run in their own directories: a relative checkpoint_dir would put each stage's
    # checkpoint where the driver never looks. Resolve it here, in the driver.
    return dataclasses.replace(cfg, checkpoint_dir=str(Path(cfg.checkpoint_dir).resolve()))


# ---- the networks of each stage --------------------------------------------------------------
def _source_model(checkpoint: str):
    from metatta.models import load_source_model

    return load_source_model(checkpoint)


def _head_dims(cfg: CTATrainConfig) -> dict[str, list[int]]:
    from metatta.ssl.rotation import NUM_ROTATIONS

    out = cfg.projection_dim if cfg.method == "cta" else NUM_ROTATIONS
    return {HEADS[cfg.method]: [cfg.head_hidden, out]}


def initial_network(stage: str, cfg: CTATrainConfig, checkpoint: str, files: dict[str, Path]):
    """The MultiHeadNet a stage starts from (before any checkpoint of its own is loaded)."""
    from metatta.ssl.networks import build_network

    source = _source_model(checkpoint)
    net = build_network(source, _head_dims(cfg))
    if stage == "simclr":  # a fresh encoder of the source architecture; the classifier stays the source's
        net.encoder.load_state_dict(build_network(_fresh_source(checkpoint), {}).encoder.state_dict())
    elif stage == "align":
        net.load_state_dict(load_stage_state(files["simclr"])["model"])
    return net


def _fresh_source(checkpoint: str) -> nn.Module:
    """The source checkpoint's architecture with fresh (random) weights."""
    from metatta.models import build_model
    from metatta.models.checkpoint import read_header
    from metatta.ssl.networks import source_model_info

    info = source_model_info(read_header(checkpoint))
    return build_model(info["model"], info["num_classes"], info["in_channels"], **info["model_kwargs"])


class SimCLRObjective(nn.Module):
    """NT-Xent of the projections of two views; encoder and projector train."""

    def __init__(self, net, temperature: float):
        super().__init__()
        self.net, self.temperature = net, temperature
        net.classifier.requires_grad_(False)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        from metatta.ssl.simclr import nt_xent

        z = self.net(torch.cat([v1, v2]), head="projector")  # one pass: BN statistics over both views
        loss = nt_xent(*z.chunk(2), temperature=self.temperature)
        return loss, {"loss": loss.detach()}


class AlignObjective(nn.Module):
    """Symmetric InfoNCE between the SSL encoder and the frozen supervised encoder, plus the optional
    feature-matching and SimCLR terms (AlignStageConfig); the encoder trains, and the projector
    when simclr_weight > 0."""

    def __init__(self, net, supervised_encoder: nn.Module, stage: AlignStageConfig, simclr_temperature: float):
        super().__init__()
        self.net, self.stage, self.simclr_temperature = net, stage, simclr_temperature
        net.classifier.requires_grad_(False)
        net.heads.requires_grad_(stage.simclr_weight > 0)
        self.supervised = supervised_encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.supervised.eval()  # frozen: its BN keeps the source statistics
        return self

    def forward(self, x: torch.Tensor, v1: torch.Tensor | None = None, v2: torch.Tensor | None = None):
        from metatta.ssl.align import alignment_loss, feature_matching_loss
        from metatta.ssl.simclr import nt_xent

        f_ssl = self.net.encoder(x)
        with torch.no_grad():
            f_sup = self.supervised(x)
        infonce = alignment_loss(f_ssl, f_sup, self.stage.temperature)
        matching = feature_matching_loss(f_ssl, f_sup)
        loss = infonce + self.stage.feature_weight * matching if self.stage.feature_weight else infonce
        metrics = {"infonce": infonce.detach(), "feature_matching": matching.detach(),
                   "cosine": F.cosine_similarity(f_ssl.detach(), f_sup, dim=1).mean(),
                   "norm_ratio": f_ssl.detach().norm(dim=1).mean() / f_sup.norm(dim=1).mean()}
        if self.stage.simclr_weight:
            z = self.net(torch.cat([v1, v2]), head="projector")
            simclr = nt_xent(*z.chunk(2), temperature=self.simclr_temperature)
            loss = loss + self.stage.simclr_weight * simclr
            metrics["simclr"] = simclr.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics


class JointObjective(nn.Module):
    """TTT's joint training: classification of the images + rotation prediction of rotated copies."""

    def __init__(self, net, rotation_weight: float):
        super().__init__()
        self.net, self.rotation_weight = net, rotation_weight

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_rot: torch.Tensor, r: torch.Tensor):
        features = self.net.encoder(torch.cat([x, x_rot]))  # one pass through the shared encoder
        logits = self.net.classifier(features[: len(x)])
        ce = F.cross_entropy(logits, y)
        rot = F.cross_entropy(self.net.heads["rotation"](features[len(x):]), r)
        loss = ce + self.rotation_weight * rot
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "rotation": rot.detach(), "accuracy": accuracy}


def build_objective(stage: str, net, cfg: CTATrainConfig, checkpoint: str) -> nn.Module:
    if stage == "simclr":
        return SimCLRObjective(net, cfg.simclr.temperature)
    if stage == "align":
        from metatta.ssl.networks import split_classifier

        return AlignObjective(net, split_classifier(_source_model(checkpoint))[0], cfg.align, cfg.simclr.temperature)
    if stage == "joint":
        return JointObjective(net, cfg.rotation_weight)
    raise ValueError(f"unknown training stage {stage!r}")


def stage_inputs(stage: str, x: torch.Tensor, y: torch.Tensor, cfg: CTATrainConfig,
                 generator: torch.Generator) -> tuple:
    """The objective's inputs for a float batch in [0, 1] (augmentations drawn from `generator`)."""
    from metatta.ssl.augment import SimCLRAugment
    from metatta.ssl.rotation import rotate_batch
    from metatta.source import augment_batch

    simclr = SimCLRAugment(crop_scale=tuple(cfg.crop_scale))
    if stage == "simclr":
        return simclr.views(x, generator)
    if stage == "align":
        pair = simclr(x, generator) if cfg.align.augment == "simclr" else augment_batch(x, cfg.crop_padding, True,
                                                                                         generator)
        if cfg.align.simclr_weight:  # + SimCLR's two views of the unaugmented batch
            return (pair, *simclr.views(x, generator))
        return (pair,)
    light = augment_batch(x, cfg.crop_padding, True, generator)  # the source recipe's crop and flip
    x_rot, r = rotate_batch(light, "rand", generator)
    return light, y, x_rot, r


# ---- one stage, one worker -------------------------------------------------------------------
def stage_files(cfg: CTATrainConfig) -> dict[str, Path]:
    root = Path(cfg.checkpoint_dir) / cfg.name
    return {stage: root / f"{stage}.pt" for stage in STAGES[cfg.method]}


def load_stage_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no stage checkpoint at {path}") from None
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"cannot read stage checkpoint {path}: {e}") from e


def _save_stage_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint


def stage_complete(path: Path, epochs: int) -> bool:
    return path.is_file() and int(load_stage_state(path)["epoch"]) >= epochs


def lr_at(step: int, total: int, stage: StageConfig) -> float:
    """Linear warmup over `warmup_fraction` of the steps, then cosine decay to 0."""
    warmup = int(stage.warmup_fraction * total)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return stage.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _load_train_data(cfg: CTATrainConfig, checkpoint: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and labels: `data` when given, else the source model's clean training split."""
    if data is None:
        from metatta.models.checkpoint import read_header
        from metatta.source import load_clean_split

        data = load_clean_split(read_header(checkpoint)["dataset"], "train")
    images, labels = data
    limit = cfg.train_images or len(images)
    x = torch.from_numpy(np.ascontiguousarray(images[:limit])).permute(0, 3, 1, 2)
    return x, torch.from_numpy(np.asarray(labels[:limit]).astype(np.int64))


def _shard(n: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
    """This worker's rows: equal shares of one seeded permutation (every worker takes the same
    number of steps, which DDP needs)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    per_worker = n // world_size
    return order[rank::world_size][:per_worker]


def _epoch_generator(seed: int, stage: str, epoch: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGE_SEEDS[stage] * 10_007 + epoch * 101 + rank)


def run_stage(
    spec: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
    report: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train one stage on this worker's shard, from the stage checkpoint if there is one; returns
    the metric history. `spec`: {"cfg", "stage", "checkpoint" (source), "source_sha256", "data"
    (None: the clean training split), "tracking_uri", "run_id"}. `prepare` wraps the objective
    for distributed training (Ray Train's DDP), `report` is called by every worker after every
    epoch (Ray Train's barrier), `on_epoch(epoch, metrics)` after rank 0 saved the checkpoint."""
    cfg, stage = cta_train_config(spec["cfg"]), spec["stage"]
    stage_cfg: StageConfig = getattr(cfg, stage)
    device = device or resolve_device(cfg.device)
    files = stage_files(cfg)
    torch.manual_seed(cfg.seed)  # the same fresh heads and encoder on every worker
    net = initial_network(stage, cfg, spec["checkpoint"], files)
    state = _resume_state(files[stage], spec["source_sha256"])
    if state is not None:
        net.load_state_dict(state["model"])
    objective = build_objective(stage, net, cfg, spec["checkpoint"]).to(device)
    if cfg.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    model = prepare(objective) if prepare is not None else objective
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    start_epoch, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        log.info("%s: resuming from %s after epoch %d", stage, files[stage], start_epoch)

    x_all, y_all = _load_train_data(cfg, spec["checkpoint"], spec.get("data"))
    rows = _shard(len(x_all), rank, world_size, cfg.seed)
    steps = len(rows) // stage_cfg.batch_size
    if steps < 1:
        raise ValueError(f"train_cta.{stage}: {len(rows)} images per worker ({len(x_all)} over {world_size}) "
                         f"make no batch of {stage_cfg.batch_size}")
    logger = _EpochLogger(spec, stage) if rank == 0 else None
    for epoch in range(start_epoch, stage_cfg.epochs):
        metrics = _train_epoch(model, optimizer, stage, cfg, x_all, y_all, rows, epoch, rank, world_size, device,
                               progress=cfg.progress and rank == 0)
        history.append(metrics)
        if rank == 0:
            _save_stage_state(files[stage], {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                             "epoch": epoch + 1, "history": history, "stage": stage,
                                             "source_sha256": spec["source_sha256"]})
            logger.log(metrics, epoch + 1)
            log.info("%s epoch %d/%d: %s", stage, epoch + 1, stage_cfg.epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if report is not None:
            report(metrics)
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
    return history


def _resume_state(path: Path, source_sha256: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = load_stage_state(path)
    if state.get("source_sha256") != source_sha256:
        raise ValueError(f"stage checkpoint {path} was trained for another source model; delete it or train "
                         f"without --resume")
    return state


def _train_epoch(model, optimizer, stage, cfg, x_all, y_all, rows, epoch, rank, world_size, device,
                 progress: bool) -> dict[str, float]:
    stage_cfg: StageConfig = getattr(cfg, stage)
    generator = _epoch_generator(cfg.seed, stage, epoch, rank)
    order = rows[torch.randperm(len(rows), generator=generator)]
    steps = len(rows) // stage_cfg.batch_size
    total_steps = steps * stage_cfg.epochs
    sums: dict[str, float] = {}
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{stage} epoch {epoch + 1}/{stage_cfg.epochs}", disable=not progress,
                     leave=False):
        idx = order[step * stage_cfg.batch_size : (step + 1) * stage_cfg.batch_size]
        x = x_all[idx].to(device, non_blocking=True).float().div_(255)  # augmented on the device
        inputs = [_layout(t, cfg) for t in stage_inputs(stage, x, y_all[idx].to(device), cfg, generator)]
        loss, metrics = model(*inputs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_cta.{stage}: loss became {loss.item()} at epoch {epoch + 1}, step {step} "
                                     f"(lower train_cta.{stage}.lr, now {stage_cfg.lr})")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch * steps + step, total_steps, stage_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    seconds = time.perf_counter() - start
    out = {k: v / steps for k, v in sums.items()}
    out["samples_per_second"] = steps * stage_cfg.batch_size * world_size / seconds  # all workers together
    out["epoch_seconds"] = seconds
    out["workers"] = float(world_size)
    return out


def _layout(t: torch.Tensor, cfg: CTATrainConfig) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if cfg.channels_last and t.ndim == 4 else t


class _EpochLogger:
    """Rank 0's per-epoch metrics into the training's MLflow run (`<stage>/<metric>`, step = epoch)."""

    def __init__(self, spec: dict[str, Any], stage: str):
        self.run_id, self.stage = spec.get("run_id"), stage
        if self.run_id and spec.get("tracking_uri"):
            import os

            os.environ["MLFLOW_TRACKING_URI"] = spec["tracking_uri"]  # a Ray worker has its own environment

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        from metatta import tracking

        now = int(time.time() * 1000)
        batch = [Metric(tracking._safe_key(f"{self.stage}/{k}"), float(v), now, epoch) for k, v in metrics.items()]
        tracking.client().log_batch(self.run_id, metrics=batch)


# ---- Ray Train ------------------------------------------------------------------------------
def _ray_train_loop(spec: dict[str, Any]) -> None:
    """What every Ray Train worker runs: `run_stage` with the worker's rank, device and DDP."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    run_stage(spec, rank=context.get_world_rank(), world_size=context.get_world_size(),
              device=ray.train.torch.get_device(), prepare=ray.train.torch.prepare_model,
              report=lambda metrics: ray.train.report(metrics))


def fit_stage_on_ray(spec: dict[str, Any], cfg: CTATrainConfig) -> None:
    """Run a stage as a Ray Train TorchTrainer (gloo on CPU, NCCL on GPU) with cfg.num_workers workers."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init()
    use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= cfg.num_workers
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"{cfg.name}-{spec['stage']}-{int(time.time())}",
                             storage_path=str((Path(cfg.checkpoint_dir) / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    log.info("%s: Ray Train, %d workers (%s)", spec["stage"], cfg.num_workers, "NCCL, GPU" if use_gpu else "gloo, CPU")
    trainer.fit()


# ---- the whole training ---------------------------------------------------------------------
@dataclasses.dataclass
class TrainOutcome:
    network: Any  # the trained MultiHeadNet
    validation_error: float
    unadapted_validation_error: float  # the same network, steps 0
    adapter_dir: Path
    registered_version: str | None
    promoted: bool
    history: dict[str, list[dict[str, float]]]
    run_id: str | None


def train_cta(
    cfg: CTATrainConfig,
    *,
    resume: bool = False,
    use_ray: bool = True,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    domains: list[DomainData] | None = None,
    on_epoch: Callable[[str, int, dict[str, float]], None] | None = None,
) -> TrainOutcome:
    """Train every stage of `cfg.method` that is not finished, validate, save, register, promote.

    `data`: clean (uint8 (N, H, W, C), labels) to train on instead of the source's dataset;
    `domains`: validation domains instead of the held-out corruptions; `on_epoch(stage, epoch,
    metrics)` is called in-process (use_ray=False only)."""
    cfg = cta_train_config(cfg)
    checkpoint = source_checkpoint(cfg.source_checkpoint, cfg.source_config,
                                   ("train_cta.source_checkpoint", "train_cta.source_config"))
    files = stage_files(cfg)
    run_file = files[STAGES[cfg.method][0]].parent / "mlflow_run_id"
    if resume and not any(p.is_file() for p in files.values()):
        raise FileNotFoundError(f"--resume: no stage checkpoint in {files[STAGES[cfg.method][0]].parent}")
    if not resume:
        for path in [*files.values(), run_file]:
            path.unlink(missing_ok=True)
    run_id = run_file.read_text().strip() if resume and run_file.is_file() else None
    spec = stage_spec(cfg, str(checkpoint), data)
    with (_mlflow_run(cfg, run_id) if cfg.mlflow else contextlib.nullcontext()) as run:
        run_id = run.info.run_id if run is not None else None
        if run_id:
            run_file.parent.mkdir(parents=True, exist_ok=True)
            run_file.write_text(run_id)
        for stage in STAGES[cfg.method]:
            if stage_complete(files[stage], getattr(cfg, stage).epochs):
                log.info("%s: finished already (%s)", stage, files[stage])
                continue
            job = {**spec, "stage": stage, "run_id": run_id}
            if use_ray:
                fit_stage_on_ray(job, cfg)
            else:
                callback = (lambda epoch, metrics, stage=stage: on_epoch(stage, epoch, metrics)) if on_epoch else None
                run_stage(job, on_epoch=callback)
        return _finish(cfg, str(checkpoint), spec["source_sha256"], files, domains, run_id)


def stage_spec(cfg: CTATrainConfig, checkpoint: str, data=None, stage: str | None = None,
               run_id: str | None = None) -> dict[str, Any]:
    """What `run_stage` needs, as plain values (it travels to the Ray Train workers)."""
    from metatta import tracking
    from metatta.models.checkpoint import checkpoint_hash

    return {"cfg": dataclasses.asdict(cfg), "checkpoint": checkpoint, "source_sha256": checkpoint_hash(checkpoint),
            "data": data, "tracking_uri": tracking.tracking_uri() if cfg.mlflow else None, "stage": stage,
            "run_id": run_id}


def trained_network(cfg: CTATrainConfig, checkpoint: str, files: dict[str, Path]):
    """The final network: the last stage's weights."""
    net = initial_network(STAGES[cfg.method][0], cfg, checkpoint, files)
    net.load_state_dict(load_stage_state(files[STAGES[cfg.method][-1]])["model"])
    return net.eval()


def save_adapter(net, cfg: CTATrainConfig, checkpoint: str, source_sha256: str, **extra: Any) -> Path:
    """The network as an adapter directory (`<checkpoint_dir>/<name>/adapter`: weights, the source
    model it was built for, the training config and `extra`), usable with `--adapter`."""
    from metatta.models.checkpoint import read_header
    from metatta.ssl.networks import save_network, source_model_info

    return save_network(net, Path(cfg.checkpoint_dir) / cfg.name / "adapter", cfg.method,
                        source_model_info(read_header(checkpoint)), extra={
                            "source_checkpoint": checkpoint, "source_checkpoint_sha256": source_sha256,
                            "train_config": dataclasses.asdict(cfg), **extra})


def _finish(cfg, checkpoint: str, source_sha256: str, files, domains, run_id) -> TrainOutcome:
    from metatta import tracking

    net = trained_network(cfg, checkpoint, files)
    domains = domains if domains is not None else _load_val_domains(cfg)
    val_error = validation_error(net, cfg, domains)
    unadapted = validation_error(net, cfg, domains, steps=0)
    log.info("%s: held-out validation error %.2f%% (%.2f%% before adaptation)", cfg.method, val_error, unadapted)
    history = {stage: list(load_stage_state(path)["history"]) for stage, path in files.items()}
    adapter_dir = save_adapter(net, cfg, checkpoint, source_sha256, validation_error=val_error,
                               unadapted_validation_error=unadapted,
                               epochs={stage: len(h) for stage, h in history.items()})
    version, promoted = None, False
    if run_id:
        tracking.log_metrics({"final_validation_error": val_error, "final_unadapted_validation_error": unadapted})
        if cfg.register_as:
            version = tracking.register_adapter(cfg.register_as, adapter_dir, run_id, tags={"kind": cfg.method})
            promoted = tracking.promote_if_better(cfg.register_as, version, val_error)
    return TrainOutcome(net, val_error, unadapted, adapter_dir, version, promoted, history, run_id)


def validation_error(net, cfg: CTATrainConfig, domains: list[DomainData], steps: int | None = None) -> float:
    """Mean error of the method with this network over the validation domains (reset per domain)."""
    import copy

    from metatta.data.streams import build_stream
    from metatta.evaluation import evaluate
    from metatta.methods.base import build_method

    device = resolve_device(cfg.device)
    config = {**cfg.method_config, **({"steps": steps} if steps is not None else {})}
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, copy.deepcopy(net).to(device), config)
    stream = build_stream(domains, "episodic", cfg.val_batch_size, seed=cfg.seed)
    return evaluate(method, stream, device=device, progress=False).mean_error


def _mlflow_run(cfg: CTATrainConfig, run_id: str | None):
    from metatta import tracking

    if run_id:
        return tracking.resume_run(run_id)
    return tracking.start_run(cfg.name, params=dataclasses.asdict(cfg), tags={"kind": f"{cfg.method}-training"})


def _load_val_domains(cfg: CTATrainConfig) -> list[DomainData]:
    from metatta.data.benchmark_files import fashion_mnist_c, read_cifar_c

    root = Path(cfg.benchmark_root) if cfg.benchmark_root else fashion_mnist_c(corruptions=cfg.val_corruptions)
    return read_cifar_c(root, cfg.val_corruptions, [cfg.val_severity], num_images=cfg.val_images)
