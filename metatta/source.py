"""Train a source classifier on clean data and write a checkpoint with its
clean test error and clean feature statistics.

Recipe (chosen for speed on two CPU cores; the ResNet-8 "resnet_fmnist" reaches
< 10% Fashion-MNIST test error in a few epochs): SGD with Nesterov momentum
0.9, weight decay 5e-4 on conv/linear weights only (none on BN/LN affines and
biases), a one-cycle learning-rate schedule (or cosine), light augmentation
(random crop with zero padding and horizontal flip, done on whole batches in
torch), cross-entropy with optional label smoothing.

After training: the clean test error (eval mode), MGTTA's clean feature
statistics on `feature_stats_images` clean training images (no augmentation),
and `metatta.models.checkpoint.save_checkpoint`.

`ensure_source_model` trains only when the checkpoint is not there yet, so
`make demo` reuses it; `source_checkpoint` is the one place that turns "a
checkpoint or a training config" into a checkpoint path (experiments, searches
and every trainer call it).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from metatta.config import ConfigError, build_dataclass, load_config
from metatta.data.clean import flips_allowed, load_clean
from metatta.device import resolve_device
from metatta.models import build_model
from metatta.models.checkpoint import header_path, save_checkpoint, verify_checkpoint
from metatta.models.feature_stats import compute_feature_stats
from metatta.paths import models_dir

log = logging.getLogger(__name__)

SplitLoader = Callable[[str, str], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class SourceTrainConfig:
    model: str = "resnet_fmnist"  # a name metatta.models.build_model knows
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "fashion_mnist"
    num_classes: int = 10
    in_channels: int = 1
    epochs: int = 6
    # With the whole training split (num_train_images null), at least this many steps: on a small
    # dataset (a digits-sized one) the epochs are raised to reach them, with a warning. 0: off.
    min_steps: int = 0
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw: for ViTs, which SGD trains poorly
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # sgd only
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = 0.2  # onecycle: fraction of the steps spent warming up
    label_smoothing: float = 0.0
    augment: bool = True  # random crop (zero padding) + horizontal flip
    crop_padding: int = 2
    # auto: flip unless the dataset's classes change in a mirror (digits: clean.MIRROR_CHANGES_CLASS)
    hflip: bool | Literal["auto"] = "auto"
    num_train_images: int | None = None  # first N training images (quick runs); None: all
    num_test_images: int | None = None  # first N test images; None: all
    feature_stats_images: int = 10000  # clean training images for MGTTA's feature statistics
    eval_batch_size: int = 1000
    channels_last: bool = True  # faster convolutions on CPU for these small nets
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: str | None = None  # None: <cache root>/models/<model>.pt (metatta.paths; $METATTA_CACHE moves it)
    progress: bool = True


@dataclasses.dataclass
class SourceTrainResult:
    checkpoint: Path
    clean_test_error: float  # percent
    train_time_s: float  # the training loop only
    total_time_s: float  # data, training, evaluation, feature statistics, saving
    epoch_losses: list[float]  # mean training loss per epoch
    train_images: int
    test_images: int
    device: str


def source_train_config(data: dict[str, Any] | SourceTrainConfig | None) -> SourceTrainConfig:
    if isinstance(data, SourceTrainConfig):
        cfg = data
    else:
        cfg = build_dataclass(SourceTrainConfig, data, where="train_source")
    for name in ("epochs", "batch_size", "num_classes", "in_channels", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"train_source.{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("num_train_images", "num_test_images"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"train_source.{name} must be >= 1 or null, got {value}")
    if cfg.min_steps < 0:
        raise ValueError(f"train_source.min_steps must be >= 0, got {cfg.min_steps}")
    if cfg.feature_stats_images < 1:
        raise ValueError(f"train_source.feature_stats_images must be >= 1, got {cfg.feature_stats_images}")
    if cfg.lr <= 0 or cfg.weight_decay < 0 or not 0 <= cfg.momentum < 1:
        raise ValueError(f"train_source: need lr > 0, weight_decay >= 0, 0 <= momentum < 1 "
                         f"(got {cfg.lr}, {cfg.weight_decay}, {cfg.momentum})")
    if not 0 < cfg.warmup_fraction < 1:
        raise ValueError(f"train_source.warmup_fraction must be in (0, 1), got {cfg.warmup_fraction}")
    if cfg.crop_padding < 0:
        raise ValueError(f"train_source.crop_padding must be >= 0, got {cfg.crop_padding}")
    if cfg.hflip == "auto":
        cfg = dataclasses.replace(cfg, hflip=flips_allowed(cfg.dataset))
    elif cfg.hflip and cfg.augment and not flips_allowed(cfg.dataset):
        log.warning("train_source.hflip is true on %s, whose classes a mirror changes; hflip: auto would not flip",
                    cfg.dataset)
    if cfg.output is None:
        cfg = dataclasses.replace(cfg, output=str(models_dir() / f"{cfg.model.replace(':', '_')}.pt"))
    return cfg


# ---- data ---------------------------------------------------------------------------------
def load_clean_split(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, C), int64 labels (N,)) of a clean dataset split (fashion_mnist, cifar10, cifar100)."""
    return load_clean(dataset, split)


def epochs_for_min_steps(cfg: SourceTrainConfig, steps_per_epoch: int, train_images: int) -> SourceTrainConfig:
    """`cfg` with its epochs raised so that training makes `min_steps` steps, when it trains on the
    whole split (a deliberately small `num_train_images` is a quick run and stays as asked)."""
    steps = cfg.epochs * steps_per_epoch
    if cfg.num_train_images is not None or steps >= cfg.min_steps:
        return cfg
    epochs = math.ceil(cfg.min_steps / steps_per_epoch)
    log.warning("train_source: %d epochs of %d %s images are %d steps, fewer than min_steps %d; training %d epochs",
                cfg.epochs, train_images, cfg.dataset, steps, cfg.min_steps, epochs)
    return dataclasses.replace(cfg, epochs=epochs)


def _checked_split(images: np.ndarray, labels: np.ndarray, cfg: SourceTrainConfig, split: str,
                   limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"{cfg.dataset} {split} split"
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{where}: images must be uint8 (N, H, W, C), got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    if images.shape[3] != cfg.in_channels:
        raise ValueError(f"{where}: images have {images.shape[3]} channels but train_source.in_channels is {cfg.in_channels}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"{where}: {len(images)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"{where}: labels span [{labels.min()}, {labels.max()}], outside [0, {cfg.num_classes}) "
                         f"(train_source.num_classes = {cfg.num_classes})")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # uint8 NCHW; floats made per batch
    return x, torch.from_numpy(labels.astype(np.int64))


def augment_batch(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding `padding`) and horizontal flip of a float batch (B, C, H, W), per image."""
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (torch.arange(h)[None, :] + dy[:, None]).to(x.device)  # (B, H)
        cols = (torch.arange(w)[None, :] + dx[:, None]).to(x.device)  # (B, W)
        batch_idx = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


# ---- training -------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; norm affines, biases, tokens and embeddings go without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler(cfg: SourceTrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_fraction,
            anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0, cycle_momentum=False,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _to_float(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def test_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
               channels_last: bool = False, progress: bool = False) -> float:
    """Top-1 error in percent, eval mode, over uint8 NCHW images."""
    was_training = model.training
    model.eval()
    wrong = 0
    for i in tqdm(range(0, len(x), batch_size), desc="clean test", disable=not progress, leave=False):
        logits = model(_to_float(x[i : i + batch_size], device, channels_last))
        wrong += (logits.argmax(1).cpu() != y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * wrong / max(len(x), 1)


def train_source(config: dict[str, Any] | SourceTrainConfig, load_split: SplitLoader | None = None) -> SourceTrainResult:
    """Train the source model of `config` and write its checkpoint (see the module docstring).

    `load_split(dataset, split)` returns a clean split as (uint8 (N, H, W, C),
    int64 (N,)); the default reads the dataset through `metatta.data`. The weights are
    bit-identical across runs with the same config and `torch.get_num_threads()` (a different
    thread count may change the order of float reductions).
    """
    cfg = source_train_config(config)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train_source(cfg, load_split or load_clean_split)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train_source(cfg: SourceTrainConfig, load_split: SplitLoader) -> SourceTrainResult:
    # Deterministic for a seed and thread count (the caller enables deterministic algorithms): one
    # seeded generator draws the data order and the augmentation, no loader workers, and the model's
    # initialisation follows torch.manual_seed(seed).
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    x_train, y_train = _checked_split(*load_split(cfg.dataset, "train"), cfg, "train", cfg.num_train_images)
    x_test, y_test = _checked_split(*load_split(cfg.dataset, "test"), cfg, "test", cfg.num_test_images)
    model = build_model(cfg.model, cfg.num_classes, cfg.in_channels, **cfg.model_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                    nesterov=cfg.nesterov and cfg.momentum > 0)
    # Drop the last incomplete batch: a BN batch of one image would fail, and it changes little.
    steps_per_epoch = max(len(x_train) // cfg.batch_size, 1)
    cfg = epochs_for_min_steps(cfg, steps_per_epoch, len(x_train))
    scheduler = _scheduler(cfg, optimizer, cfg.epochs * steps_per_epoch)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s (%.2fM parameters) on %d %s images for %d epochs (%d steps of %d) on %s, %d threads",
             cfg.model, n_params / 1e6, len(x_train), cfg.dataset, cfg.epochs, cfg.epochs * steps_per_epoch,
             cfg.batch_size, device, torch.get_num_threads())

    train_start = time.perf_counter()
    epoch_losses = []
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total, seen, correct = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = x_train[idx].float().div_(255)
            if cfg.augment:
                x = augment_batch(x, cfg.crop_padding, cfg.hflip, generator)
            x = x.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_train[idx].to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train_source: loss became {loss.item()} at epoch {epoch + 1}, step {step} "
                                         f"(lower train_source.lr, now {cfg.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            correct += (logits.detach().argmax(1) == y).sum().item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        epoch_losses.append(total / seen)
        log.info("epoch %d/%d: train loss %.4f, train accuracy %.2f%% (augmented), %.0f s elapsed",
                 epoch + 1, cfg.epochs, total / seen, 100 * correct / seen, time.perf_counter() - train_start)
    train_time = time.perf_counter() - train_start

    error = test_error(model, x_test, y_test, cfg.eval_batch_size, device, cfg.channels_last, cfg.progress)
    log.info("clean test error %.2f%% on %d images; training took %.0f s", error, len(x_test), train_time)

    model = model.to(memory_format=torch.contiguous_format)
    n_stats = min(cfg.feature_stats_images, len(x_train))
    stats_images = (x_train[i : min(i + cfg.eval_batch_size, n_stats)].to(device).float().div_(255)
                    for i in range(0, n_stats, cfg.eval_batch_size))
    feature_stats = compute_feature_stats(model, stats_images, device=device, progress=cfg.progress)

    output = save_checkpoint(
        cfg.output, model,
        model_name=cfg.model, model_kwargs=cfg.model_kwargs, num_classes=cfg.num_classes,
        in_channels=cfg.in_channels, dataset=cfg.dataset, clean_test_error=error, train_time_s=train_time,
        feature_stats=feature_stats,
        extra={
            "train_config": dataclasses.asdict(cfg), "train_images": len(x_train), "test_images": len(x_test),
            "feature_stats_images": n_stats, "epoch_losses": epoch_losses, "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
    )
    total_time = time.perf_counter() - start
    log.info("wrote %s (clean test error %.2f%%, %.0f s in all)", output, error, total_time)
    return SourceTrainResult(checkpoint=output, clean_test_error=error, train_time_s=train_time,
                             total_time_s=total_time, epoch_losses=epoch_losses, train_images=len(x_train),
                             test_images=len(x_test), device=str(device))


def ensure_source_model(config: dict[str, Any] | SourceTrainConfig, load_split: SplitLoader | None = None) -> Path:
    """The checkpoint at `config.output`, trained first only if it does not exist.

    An existing checkpoint is verified (header and sha256) and must be of the
    configured model/dataset; anything else is an error rather than a silent
    retrain, so a checkpoint is never overwritten by accident.
    """
    cfg = source_train_config(config)
    path = Path(cfg.output)
    if not path.exists() and not header_path(path).exists():
        log.info("no source checkpoint at %s: training one", path)
        return train_source(cfg, load_split).checkpoint
    header = verify_checkpoint(path)
    wanted = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "dataset": cfg.dataset,
              "num_classes": cfg.num_classes, "in_channels": cfg.in_channels}
    found = {key: header.get(key) for key in wanted}
    if found != wanted:
        raise ValueError(f"source checkpoint {path} was trained as {found}, but the config asks for {wanted}; "
                         f"delete it or set `output` to another path")
    log.info("using cached source model %s (%s, clean test error %s%%)", path, header["model"],
             header.get("clean_test_error"))
    return path


def source_checkpoint(checkpoint: str | Path | None, config: str | Path | None,
                      fields: tuple[str, str] = ("source.checkpoint", "source.config")) -> Path:
    """The source checkpoint to use: `checkpoint` when given (it must exist), else the cached
    model of the source training config file `config` (trained first when not cached).
    `fields` name the two settings in errors."""
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{fields[0]}: no file {checkpoint}")
        return Path(checkpoint)
    if config is None:
        raise ConfigError(f"give {fields[0]} or {fields[1]}")
    return ensure_source_model(load_config(config))
