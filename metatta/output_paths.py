"""Where relative output paths go, also under `ray job submit`.

`ray job submit --working-dir .` runs the launcher in a temporary copy of the
working directory on the head node (`.../runtime_resources/working_dir_files/
_ray_pkg_<hash>`), deleted when Ray cleans up; the directory the job was
submitted from is unknown there (it may be on another machine). A relative
output path (`outputs`, `best_palm.yaml`, `ray_results`, checkpoints) or the
default `./mlflow.db` would silently land in that copy. So:

- an absolute path is used as given;
- a relative path is resolved against `$METATTA_OUTPUT_ROOT` when it is set
  (an absolute directory; pass it to a job with `--runtime-env-json
  '{"env_vars": {"METATTA_OUTPUT_ROOT": "/abs/dir"}}'`);
- otherwise, under a Ray job, it is refused with an error naming the field;
- otherwise (a plain run) it stays relative to the current directory.

A process is the entrypoint of a Ray job when Ray's job supervisor set
`RAY_JOB_CONFIG_JSON_ENV_VAR` in its environment (Ray 2.x sets it for every
submitted entrypoint, with the job's runtime_env and metadata).
"""
from __future__ import annotations

import os
from pathlib import Path

from metatta.cli import UserError

OUTPUT_ROOT_ENV = "METATTA_OUTPUT_ROOT"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_job() -> bool:
    """Whether this process is (or descends from) the entrypoint of `ray job submit`."""
    return RAY_JOB_ENV in os.environ


def output_root() -> Path | None:
    root = os.environ.get(OUTPUT_ROOT_ENV)
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_absolute():
        raise UserError(f"${OUTPUT_ROOT_ENV} must be an absolute directory, got {root!r}")
    return path


def resolve_output_path(path: str | os.PathLike, field: str) -> str:
    """The path output named by `field` is written to (see the module docstring)."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return str(given)
    root = output_root()
    if root is not None:
        return str(root / given)
    if in_ray_job():
        raise UserError(
            f"{field}: relative path {str(path)!r} under `ray job submit` would be written into Ray's temporary "
            f"copy of the working directory ({Path.cwd()}) and lost; pass an absolute path "
            f"({field}=/abs/dir), or set {OUTPUT_ROOT_ENV} for the job: --runtime-env-json "
            f"'{{\"env_vars\": {{\"{OUTPUT_ROOT_ENV}\": \"/abs/dir\"}}}}'")
    return str(path)
