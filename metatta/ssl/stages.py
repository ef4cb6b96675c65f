"""The training stages of CTA's networks and of TTT's joint training: what each stage is, its
config, its checkpoint file and its learning-rate schedule.

CTA (`method: cta`): `simclr` (a fresh encoder of the source architecture, SimCLR's NT-Xent), then
`align` (that encoder matched to the frozen supervised encoder). TTT (`method: ttt`): `joint`
(source encoder and classifier + a rotation head). The supervised encoder and classifier are the
source model's. Why the defaults are what they are: docs/results/cta-training.md.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from metatta.config import build_dataclass
from metatta.data.domains import HELD_OUT_CORRUPTIONS, check_corruption_names
from metatta.training import load_state, save_state


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
    # (the paper's loss). 1 measured better on the held-out corruptions (docs/results/cta-training.md).
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
    # horizontal flips in every augmentation; auto: unless the source model's dataset's classes change
    # in a mirror (digits: metatta.data.clean.MIRROR_CHANGES_CLASS), resolved by train_stages
    hflip: bool | Literal["auto"] = "auto"
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


def trains_with_flips(cfg: CTATrainConfig) -> bool:
    """Whether the stages mirror images: hflip as resolved by train_stages; "auto" left unresolved
    (a stage run directly) keeps the recipe's flips."""
    return cfg.hflip is not False


def stage_files(cfg: CTATrainConfig) -> dict[str, Path]:
    root = Path(cfg.checkpoint_dir) / cfg.name
    return {stage: root / f"{stage}.pt" for stage in STAGES[cfg.method]}


def load_stage_state(path: Path) -> dict[str, Any]:
    """A stage checkpoint (model, optimizer, epoch, history, stage, source_sha256)."""
    return load_state(path, "stage checkpoint")


def save_stage_state(path: Path, state: dict[str, Any]) -> None:
    save_state(path, state)  # atomic: a kill mid-write leaves the previous checkpoint


def stage_complete(path: Path, epochs: int) -> bool:
    return path.is_file() and int(load_stage_state(path)["epoch"]) >= epochs


def lr_at(step: int, total: int, stage: StageConfig) -> float:
    """Linear warmup over `warmup_fraction` of the steps, then cosine decay to 0."""
    warmup = int(stage.warmup_fraction * total)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return stage.lr * 0.5 * (1 + math.cos(math.pi * progress))
