"""MLflow: tracking URI, runs, metrics and artifacts of evaluations.

The default backend is SQLite in an absolute path (`<cwd>/mlflow.db` when first
resolved): Ray Tune changes each trial's working directory, and MLflow 3
refuses the file store. `MLFLOW_TRACKING_URI` overrides. Resolving exports the
URI to the environment so subprocesses and Ray workers started later agree.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "metatta"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _mlflow():
    import mlflow

    # MLflow's own loggers are chatty at INFO (alembic migrations on every new db).
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


@contextlib.contextmanager
def start_run(
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, nested=nested, tags=tags) as run:
        if params:
            mlflow.log_params(flatten(params))
        yield run


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': '1'}; MLflow params are flat strings (max 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value, default=str)[:6000] if not isinstance(value, str) else value[:6000]
    return out


def log_results(results: Sequence[Any], artifacts: Sequence[str | Path] = (), prefix: str = "") -> None:
    """Log each Result's mean error, ECE, speed and per-domain errors to the active run."""
    mlflow = _mlflow()
    for r in results:
        tag = f"{prefix}{r.method}"
        metrics = {
            f"{tag}/mean_error": r.mean_error,
            f"{tag}/ece": r.ece,
            f"{tag}/images_per_second": r.images_per_second,
            f"{tag}/peak_memory_mb": r.peak_memory_mb,
        }
        metrics.update({f"{tag}/error/{d}": e for d, e in r.domain_errors.items()})
        mlflow.log_metrics({_safe_key(k): v for k, v in metrics.items()})
    for path in artifacts:
        mlflow.log_artifact(str(path))


def _safe_key(key: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . space : / only.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)
