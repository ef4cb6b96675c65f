"""What every trainer shares (MGG meta-training, CTA/TTT network training), as plain functions:
atomic checkpoint files, the benchmark domains a trainer validates on, the validation error of a
method with a trained piece, and the outcome every training returns.

MLflow run open/resume and adapter registration are in `metatta.tracking` (`training_run`,
`register_and_promote`); checkpoint hashing is `metatta.models.checkpoint.checkpoint_hash`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from metatta.data.benchmark_files import capped_num_images, fashion_mnist_c, read_cifar_c
from metatta.data.streams import build_stream
from metatta.data.types import DomainData
from metatta.evaluation import evaluate
from metatta.methods.base import build_method


@dataclasses.dataclass
class TrainOutcome:
    """What a training returns: its validation error, the adapter directory it wrote, the MLflow
    model version it registered (None: not registered) and whether that became the champion."""

    validation_error: float | None
    adapter_dir: Path
    registered_version: str | None
    promoted: bool
    history: Any  # the per-step (or per-stage, per-epoch) metrics
    run_id: str | None


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically: a kill mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path, what: str, context: str | None = None) -> dict[str, Any]:
    """A file written by `save_state` (weights-only loading); errors name `what` and the path,
    after `context` (e.g. the option that asked for it) when given."""
    prefix = f"{context}: " if context else ""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{prefix}no {what} at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt zip files
        raise ValueError(f"{prefix}cannot read {what} {path}: {e}") from e


def benchmark_domains(root: str | Path | None, corruptions: Sequence[str], severities: Sequence[int],
                      num_images: int | None = None) -> list[DomainData]:
    """The domains of `corruptions` x `severities` from a directory of "-C" files; `root` None:
    Fashion-MNIST-C, built (only these corruptions' files) when not cached."""
    root = Path(root) if root else fashion_mnist_c(corruptions=list(corruptions))
    num_images = capped_num_images(root, num_images)  # a small dataset: what it holds, with a warning
    return read_cifar_c(root, list(corruptions), list(severities), num_images=num_images)


def method_error(method: str, model: torch.nn.Module, config: dict[str, Any], domains: list[DomainData],
                 batch_size: int, seed: int, device: torch.device, **context: Any) -> float:
    """Mean error of `method` on `model` over `domains`, episodic (reset per domain): the
    validation error a trainer reports for what it trained (passed in `context`)."""
    adapted = build_method(method, model, config, **context)
    stream = build_stream(domains, "episodic", batch_size, seed=seed)
    return evaluate(adapted, stream, device=device, progress=False).mean_error
