"""CTA's and TTT's network training on Ray Train.

Each stage (`metatta.ssl.stages`) runs as a Ray Train `TorchTrainer` with `num_workers` workers
(gloo on CPU, NCCL on GPU), the model in DDP; every worker runs `metatta.ssl.training.run_stage`
on its own shard, and Ray Train restarts a failed worker group (`max_failures`), which carries on
from the stage checkpoint. `train_cta(..., use_ray=False)` runs the same stages in this process.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from metatta.data.types import DomainData
from metatta.ssl.stages import CTATrainConfig
from metatta.ssl.training import CTATrainOutcome, run_stage, train_stages
from trainers.cluster import cluster_gpus

log = logging.getLogger(__name__)


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
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.device != "cpu" and cluster_gpus() >= cfg.num_workers
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


def train_cta(
    cfg: CTATrainConfig,
    *,
    resume: bool = False,
    use_ray: bool = True,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    domains: list[DomainData] | None = None,
    on_epoch: Callable[[str, int, dict[str, float]], None] | None = None,
) -> CTATrainOutcome:
    """`train_stages` with every stage on Ray Train (`use_ray=False`: in this process)."""
    return train_stages(cfg, fit_stage_on_ray if use_ray else None, resume=resume, data=data, domains=domains,
                        on_epoch=on_epoch)
