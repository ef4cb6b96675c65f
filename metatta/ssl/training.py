"""Training of CTA's networks and of TTT's joint-training network, as plain functions.

Every stage (`metatta.ssl.stages`) runs `run_stage` on each worker: its own shard of the clean
training set, the objective of `metatta.ssl.objectives` (wrapped by `prepare`, e.g. in DDP). After
every epoch rank 0 writes the stage checkpoint (`<checkpoint_dir>/<name>/<stage>.pt`, atomic:
model, optimizer, epoch, metric history) and logs the epoch's metrics to the MLflow run. A stage
always continues from its checkpoint when there is one, so a restarted worker group and a job
started again with `resume=True` both carry on from the last finished epoch; an epoch's shuffling
and augmentation are seeded by (seed, stage, epoch, rank), so a resumed run computes what an
uninterrupted one would. Without `resume` old stage checkpoints of the same name are deleted first.

`train_stages` runs every unfinished stage (in this process, or through a `fit_stage` such as
`trainers.cta.fit_stage_on_ray`), then: the validation error of the method with the trained
network on the held-out corruptions, the adapter directory (`metatta.ssl.networks`: plain
weights, weights-only loading), registration as MLflow model `register_as`, and the `champion`
alias moved when the version beats the holder (`tracking.register_and_promote`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from metatta import tracking
from metatta.data.clean import flips_allowed
from metatta.data.types import DomainData
from metatta.device import resolve_device
from metatta.models.checkpoint import checkpoint_hash, read_header
from metatta.source import load_clean_split, source_checkpoint
from metatta.ssl.networks import save_network, source_model_info
from metatta.ssl.objectives import build_objective, initial_network, stage_inputs
from metatta.ssl.stages import (
    STAGE_SEEDS,
    STAGES,
    CTATrainConfig,
    StageConfig,
    cta_train_config,
    load_stage_state,
    lr_at,
    save_stage_state,
    stage_complete,
    stage_files,
    trains_with_flips,
)
from metatta.training import TrainOutcome, benchmark_domains, method_error

log = logging.getLogger(__name__)


# ---- one stage, one worker -------------------------------------------------------------------
def _load_train_data(cfg: CTATrainConfig, checkpoint: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and labels: `data` when given, else the source model's clean training split."""
    if data is None:
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
            save_stage_state(files[stage], {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
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
            os.environ["MLFLOW_TRACKING_URI"] = spec["tracking_uri"]  # a Ray worker has its own environment

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        if self.run_id:
            tracking.log_run_metrics(self.run_id, metrics, epoch, prefix=f"{self.stage}/")


# ---- the whole training ---------------------------------------------------------------------
@dataclasses.dataclass
class CTATrainOutcome(TrainOutcome):
    network: Any = None  # the trained MultiHeadNet
    unadapted_validation_error: float | None = None  # the same network, steps 0


def train_stages(
    cfg: CTATrainConfig,
    fit_stage: Callable[[dict[str, Any], CTATrainConfig], None] | None = None,
    *,
    resume: bool = False,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    domains: list[DomainData] | None = None,
    on_epoch: Callable[[str, int, dict[str, float]], None] | None = None,
) -> CTATrainOutcome:
    """Train every stage of `cfg.method` that is not finished, validate, save, register, promote.

    `fit_stage(job, cfg)` runs one stage (`trainers.cta.fit_stage_on_ray`: on Ray Train's
    workers); None: `run_stage` in this process. `data`: clean (uint8 (N, H, W, C), labels) to
    train on instead of the source's dataset; `domains`: validation domains instead of the
    held-out corruptions; `on_epoch(stage, epoch, metrics)` is called in-process (fit_stage None
    only)."""
    cfg = cta_train_config(cfg)
    checkpoint = source_checkpoint(cfg.source_checkpoint, cfg.source_config,
                                   ("train_cta.source_checkpoint", "train_cta.source_config"))
    if cfg.hflip == "auto":
        cfg = dataclasses.replace(cfg, hflip=flips_allowed(read_header(checkpoint)["dataset"]))
    files = stage_files(cfg)
    run_file = files[STAGES[cfg.method][0]].parent / "mlflow_run_id"
    if resume and not any(p.is_file() for p in files.values()):
        raise FileNotFoundError(f"--resume: no stage checkpoint in {files[STAGES[cfg.method][0]].parent}")
    if not resume:
        for path in [*files.values(), run_file]:
            path.unlink(missing_ok=True)
    run_id = run_file.read_text().strip() if resume and run_file.is_file() else None
    # the validation images are read (and their number checked) before any training
    domains = domains if domains is not None else validation_domains(cfg)
    spec = stage_spec(cfg, str(checkpoint), data)
    with tracking.training_run(cfg.name, dataclasses.asdict(cfg), {"kind": f"{cfg.method}-training"}, run_id,
                               enabled=cfg.mlflow) as run:
        run_id = run.info.run_id if run is not None else None
        if run_id:
            run_file.parent.mkdir(parents=True, exist_ok=True)
            run_file.write_text(run_id)
        for stage in STAGES[cfg.method]:
            if stage_complete(files[stage], getattr(cfg, stage).epochs):
                log.info("%s: finished already (%s)", stage, files[stage])
                continue
            job = {**spec, "stage": stage, "run_id": run_id}
            if fit_stage is not None:
                fit_stage(job, cfg)
            else:
                callback = (lambda epoch, metrics, stage=stage: on_epoch(stage, epoch, metrics)) if on_epoch else None
                run_stage(job, on_epoch=callback)
        return _finish(cfg, str(checkpoint), spec["source_sha256"], files, domains, run_id)


def stage_spec(cfg: CTATrainConfig, checkpoint: str, data=None, stage: str | None = None,
               run_id: str | None = None) -> dict[str, Any]:
    """What `run_stage` needs, as plain values (it travels to the Ray Train workers)."""
    return {"cfg": dataclasses.asdict(cfg), "checkpoint": checkpoint, "source_sha256": checkpoint_hash(checkpoint),
            "data": data, "tracking_uri": tracking.tracking_uri() if cfg.mlflow else None, "stage": stage,
            "run_id": run_id}


def trained_network(cfg: CTATrainConfig, checkpoint: str, files: dict[str, Path]):
    """The final network: the last stage's weights, carrying the augmentation they were trained with
    (validation and the saved adapter then augment at test time as training did)."""
    net = initial_network(STAGES[cfg.method][0], cfg, checkpoint, files)
    net.load_state_dict(load_stage_state(files[STAGES[cfg.method][-1]])["model"])
    net.trained_augmentation = {"hflip": trains_with_flips(cfg)}
    return net.eval()


def save_adapter(net, cfg: CTATrainConfig, checkpoint: str, source_sha256: str, **extra: Any) -> Path:
    """The network as an adapter directory (`<checkpoint_dir>/<name>/adapter`: weights, the source
    model it was built for, the training config and `extra`), usable with `--adapter`."""
    return save_network(net, Path(cfg.checkpoint_dir) / cfg.name / "adapter", cfg.method,
                        source_model_info(read_header(checkpoint)), extra={
                            "source_checkpoint": checkpoint, "source_checkpoint_sha256": source_sha256,
                            "train_config": dataclasses.asdict(cfg), **extra})


def _finish(cfg, checkpoint: str, source_sha256: str, files, domains, run_id) -> CTATrainOutcome:
    net = trained_network(cfg, checkpoint, files)
    val_error = validation_error(net, cfg, domains)
    unadapted = validation_error(net, cfg, domains, steps=0)
    log.info("%s: held-out validation error %.2f%% (%.2f%% before adaptation)", cfg.method, val_error, unadapted)
    history = {stage: list(load_stage_state(path)["history"]) for stage, path in files.items()}
    adapter_dir = save_adapter(net, cfg, checkpoint, source_sha256, validation_error=val_error,
                               unadapted_validation_error=unadapted,
                               epochs={stage: len(h) for stage, h in history.items()})
    if run_id:
        tracking.log_metrics({"final_validation_error": val_error, "final_unadapted_validation_error": unadapted})
    version, promoted = tracking.register_and_promote(cfg.register_as, adapter_dir, run_id, val_error,
                                                      tags={"kind": cfg.method})
    return CTATrainOutcome(validation_error=val_error, adapter_dir=adapter_dir, registered_version=version,
                           promoted=promoted, history=history, run_id=run_id, network=net,
                           unadapted_validation_error=unadapted)


def validation_error(net, cfg: CTATrainConfig, domains: list[DomainData], steps: int | None = None) -> float:
    """Mean error of the method with this network over the validation domains (reset per domain)."""
    device = resolve_device(cfg.device)
    config = {**cfg.method_config, **({"steps": steps} if steps is not None else {})}
    torch.manual_seed(cfg.seed)
    return method_error(cfg.method, copy.deepcopy(net).to(device), config, domains, cfg.val_batch_size, cfg.seed,
                        device)


def validation_domains(cfg: CTATrainConfig) -> list[DomainData]:
    """The held-out corruptions a trained network is validated on (`val_images` per corruption)."""
    return benchmark_domains(cfg.benchmark_root, cfg.val_corruptions, [cfg.val_severity], num_images=cfg.val_images)
