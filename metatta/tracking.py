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
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import psutil

from metatta.cli import UserError
from metatta.output_paths import resolve_output_path
from metatta.safe_files import read_json_file, read_state_dict, read_yaml_file

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "metatta"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        # ./mlflow.db; under `ray job submit` only with $METATTA_OUTPUT_ROOT (metatta.output_paths)
        db = resolve_output_path("mlflow.db", "MLFLOW_TRACKING_URI (default: ./mlflow.db)")
        uri = f"sqlite:///{Path(db).resolve()}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _mlflow():
    import mlflow

    # MLflow's own loggers are chatty at INFO (alembic migrations on every new db).
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def artifact_root() -> str | None:
    """Absolute artifact root beside a SQLite store; MLflow's default is
    `./mlruns` relative to the *current* directory, which Tune trials change."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def set_experiment(name: str) -> str:
    mlflow = _mlflow()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_root())
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def start_run(
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    mlflow = _mlflow()
    experiment_id = set_experiment(experiment)
    if not nested:
        close_orphaned_runs(experiment_id)
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    with mlflow.start_run(run_name=run_name, nested=nested, tags={**owner, **(tags or {})}) as run:
        if params:
            mlflow.log_params(flatten(params))
        yield run


HOST_TAG, PID_TAG = "metatta.host", "metatta.pid"  # which process owns a run (for orphan cleanup)


def close_orphaned_runs(experiment_id: str) -> list[str]:
    """Close the runs left RUNNING by a process of this host that no longer exists (a driver that
    was SIGKILLed never ends its run): KILLED, tagged with why. Runs of other hosts, and runs
    without an owner tag, are left alone. Returns the run ids closed."""
    c = client()
    host, closed = socket.gethostname(), []
    for run in c.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        pid = int(tags[PID_TAG])
        if _alive_since(pid, run.info.start_time):
            continue
        c.set_tag(run.info.run_id, "metatta.closed_by", f"orphan cleanup: its driver (pid {pid}) is gone")
        c.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d MLflow run(s) left RUNNING by a driver that died: %s", len(closed), ", ".join(closed))
    return closed


def _alive_since(pid: int, start_ms: int) -> bool:
    """Whether process `pid` exists and is older than a run started at `start_ms` (a younger one
    reuses a dead owner's pid)."""
    try:
        return psutil.Process(pid).create_time() * 1000 <= start_ms + 1000
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[Any]:
    """Continue logging into an existing run (a resumed training job)."""
    mlflow = _mlflow()
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def training_run(name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None,
                 enabled: bool = True):
    """The MLflow run a training logs into: the run `run_id` continued (a resumed training), else a
    new run; a context that yields None when `enabled` is false (no MLflow at all)."""
    if not enabled:
        return contextlib.nullcontext()
    if run_id:
        return resume_run(run_id)
    return start_run(name, params=params, tags=tags)


def log_run_metrics(run_id: str, metrics: dict[str, float], step: int, prefix: str = "") -> None:
    """Log `metrics` (named `<prefix><name>`) into run `run_id` from any process, active run or not
    (a Ray worker logging into the driver's run)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(metric_key(f"{prefix}{k}"), float(v), now, step) for k, v in metrics.items()]
    client().log_batch(run_id, metrics=batch)


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which run `run_id` has a value of metric `key`."""
    return {m.step for m in client().get_metric_history(run_id, metric_key(key))}


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _mlflow().log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)


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
            f"{tag}/skipped_updates": getattr(r, "skipped_updates", 0),
        }
        metrics.update({f"{tag}/error/{d}": e for d, e in r.domain_errors.items()})
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()})
    for path in artifacts:
        mlflow.log_artifact(str(path))


def metric_key(key: str) -> str:
    """`key` as an MLflow metric name (those allow alphanumerics, _ - . space : / only)."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


# ---- model registry: trained adapters --------------------------------------------------
# An adapter is a directory of plain files: `weights.pt` (a state dict, loaded with
# weights_only=True) and `adapter.json` (what it is and how to rebuild it). Registering
# logs the directory to the run and creates a model version pointing at it; loading
# downloads the files. Nothing is ever unpickled.

ADAPTER_WEIGHTS = "weights.pt"
ADAPTER_CONFIG = "adapter.json"
VALIDATION_TAG = "validation_error"
CHAMPION = "champion"


def client():
    from mlflow import MlflowClient

    _mlflow()
    return MlflowClient()


def register_adapter(name: str, directory: str | Path, run_id: str, tags: dict[str, str] | None = None) -> str:
    """Log `directory` under the run's `adapter/` artifacts and register it as a
    new version of model `name`; returns the version number (a string)."""
    return _register_directory(name, directory, run_id, "adapter", (ADAPTER_WEIGHTS, ADAPTER_CONFIG), tags)


def _register_directory(name: str, directory: str | Path, run_id: str, kind: str, required: Sequence[str],
                        tags: dict[str, str] | None) -> str:
    """Log a directory of plain files under the run's `<kind>/` artifacts and register
    it as a new version of model `name` (created on first use)."""
    from mlflow.exceptions import MlflowException

    directory = Path(directory)
    for file in required:
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{kind} directory {directory} lacks {file}")
    c = client()
    c.log_artifacts(run_id, str(directory), artifact_path=kind)
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    source = f"{c.get_run(run_id).info.artifact_uri}/{kind}"
    version = c.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    log.info("registered %s %s version %s from run %s", kind, name, version.version, run_id)
    return str(version.version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/name@alias' -> (name, None, alias); 'models:/name/3' -> (name, '3', None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"adapter URI {uri!r} must look like models:/<name>@<alias> or models:/<name>/<version>")
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    if not version.isdigit():
        raise ValueError(f"adapter URI {uri!r}: version must be a number")
    return name, version, None


class NotRegistered(UserError, LookupError):
    """A models:/ URI that names no registered model, version or alias (a user error: one line, exit 2)."""


def resolve_version(uri: str) -> str:
    """The version number a models:/ URI names (an alias resolved now); NotRegistered when there is none."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    c = client()
    if not c.search_registered_models(filter_string=f"name='{name}'"):
        raise NotRegistered(f"{uri}: no registered model {name!r} in the tracking store {tracking_uri()} "
                            f"(not trained and registered yet, or another MLFLOW_TRACKING_URI)")
    if version is not None:
        try:
            c.get_model_version(name, version)
        except MlflowException as e:
            raise NotRegistered(f"{uri}: registered model {name!r} has no version {version}") from e
        return version
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        raise NotRegistered(f"{uri}: no version of model {name!r} has alias {alias!r}") from e


def download_registered(uri: str, dst: str | Path | None = None) -> tuple[str, Path]:
    """(version, local directory) of the registered files a models:/ URI names (an alias resolved now)."""
    mlflow = _mlflow()
    name, _, _ = parse_model_uri(uri)
    version = resolve_version(uri)
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                    dst_path=str(dst) if dst else None))
    return version, path


def download_adapter(uri: str, dst: str | Path | None = None) -> Path:
    """Fetch a registered adapter's files; `uri` is models:/name@alias or models:/name/N.
    The files are checked (adapter.json is JSON, weights.pt a plain state dict) before any use."""
    name, _, _ = parse_model_uri(uri)
    version, path = download_registered(uri, dst)
    for required in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (path / required).is_file():
            raise FileNotFoundError(f"{uri} (version {version}) has no {required}")
    what = f"registered adapter {name} version {version} ({uri}):"
    read_json_file(path / ADAPTER_CONFIG, what)
    read_state_dict(path / ADAPTER_WEIGHTS, what)
    return path


def adapter_directory(ref: str | Path) -> Path:
    """The local directory of an adapter named by models:/<name>@<alias>, models:/<name>/<N>
    (downloaded) or a path."""
    text = str(ref)
    if text.startswith("models:/"):
        return download_adapter(text)
    path = Path(text)
    if not path.is_file() and not (path / ADAPTER_CONFIG).is_file() and not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter {text}: not an adapter directory (no {ADAPTER_WEIGHTS} / {ADAPTER_CONFIG})")
    return path


def adapter_info(path: str | Path) -> dict[str, Any]:
    """An adapter directory's adapter.json ({} when it has none: a bare MGG weights directory)."""
    config = Path(path) / ADAPTER_CONFIG
    return read_json_file(config, "adapter config") if config.is_file() else {}


def load_adapter_files(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, config) from an adapter directory, without unpickling objects."""
    path = Path(path)
    config = read_json_file(path / ADAPTER_CONFIG, "adapter config")
    state = read_state_dict(path / ADAPTER_WEIGHTS, "adapter weights")
    return state, config


VALIDATION_DECIMALS = 6  # the precision validation errors are recorded (and compared) at
PROMOTION_TAG = "promotion"  # why the alias did or did not move to this version


def promote_if_better(name: str, version: str, validation_error: float, alias: str = CHAMPION) -> bool:
    """Record the version's validation error; move `alias` to it when it beats the current
    holder. Returns whether the alias moved.

    The rule: lower validation error wins, compared at the recorded precision
    (VALIDATION_DECIMALS). A tie keeps the incumbent: a retrained version that is
    no better does not replace the one already served and evaluated, so among
    equals the first registered holds the alias. A non-finite error is never
    promoted. The decision and its reason are tagged on the version (`promotion`)."""
    from mlflow.exceptions import MlflowException

    c = client()
    finite = math.isfinite(validation_error)
    recorded = round(validation_error, VALIDATION_DECIMALS) if finite else validation_error
    c.set_model_version_tag(name, version, VALIDATION_TAG, f"{validation_error:.{VALIDATION_DECIMALS}f}")
    try:
        current = c.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        reason = f"already {alias}"
    elif not finite:
        reason = f"not promoted: validation error {validation_error} is not finite"
    elif current is not None:
        best = round(float(current.tags.get(VALIDATION_TAG, "inf")), VALIDATION_DECIMALS)
        if recorded > best:
            reason = f"not promoted: {recorded} is worse than {alias} v{current.version} ({best})"
        elif recorded == best:
            reason = f"not promoted: ties {alias} v{current.version} at {best} (a tie keeps the incumbent)"
        else:
            reason = f"{alias}: {recorded} beats v{current.version} ({best})"
    else:
        reason = f"{alias}: first version with a validation error"
    promoted = reason.startswith(f"{alias}:")
    c.set_model_version_tag(name, version, PROMOTION_TAG, reason)
    if promoted:
        c.set_registered_model_alias(name, alias, version)
    log.info("%s v%s (validation error %s): %s", name, version, recorded, reason)
    return promoted


def register_and_promote(name: str | None, directory: str | Path, run_id: str | None, validation_error: float,
                         tags: dict[str, str] | None = None) -> tuple[str | None, bool]:
    """Register a trained adapter as a new version of model `name` and move the champion alias
    to it when it beats the holder: (version, promoted). (None, False) when there is no run or
    no name (registration off)."""
    if not run_id or not name:
        return None, False
    version = register_adapter(name, directory, run_id, tags=tags)
    return version, promote_if_better(name, version, validation_error)


# ---- model registry: tuned settings ----------------------------------------------------
# A tuned setting (the best config of a Ray Tune search, trainers/tune.py) is a
# directory of plain files: `settings.yaml` (a method config, usable as a
# method's `config`) and `settings.json` (the method, the held-out error, the
# search and the source checkpoint it was tuned for). Registered and promoted
# like adapters (promote_if_better: champion = lowest held-out error).

SETTINGS_FILE = "settings.yaml"
SETTINGS_INFO = "settings.json"


def write_settings_dir(directory: str | Path, config: dict[str, Any], info: dict[str, Any]) -> Path:
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SETTINGS_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    (directory / SETTINGS_INFO).write_text(json.dumps(info, indent=2, default=str))
    return directory


def register_settings(name: str, directory: str | Path, run_id: str, tags: dict[str, str] | None = None) -> str:
    """Log a settings directory under the run's `settings/` artifacts and register it
    as a new version of model `name`; returns the version number."""
    return _register_directory(name, directory, run_id, "settings", (SETTINGS_FILE, SETTINGS_INFO), tags)


def load_settings(uri: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method config, info) from a settings YAML file, a settings directory, or
    models:/<name>@<alias> / models:/<name>/<N>; info is {} for a bare YAML file."""
    text = str(uri)
    if text.startswith("models:/"):
        version, path = download_registered(text)
        if not (path / SETTINGS_FILE).is_file():
            raise FileNotFoundError(f"{text} (version {version}) has no {SETTINGS_FILE}")
    else:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"settings: no such file or directory {text!r}")
    yaml_path = path / SETTINGS_FILE if path.is_dir() else path
    info_path = yaml_path.parent / SETTINGS_INFO if path.is_dir() else None
    config = read_yaml_file(yaml_path, f"settings {text}:") or {}
    if not isinstance(config, dict):
        raise ValueError(f"settings {text}: {yaml_path.name} must hold a mapping of method config fields")
    info = read_json_file(info_path, f"settings {text}:") if info_path is not None and info_path.is_file() else {}
    return config, info
