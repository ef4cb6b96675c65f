"""How the Ray layer attaches to a cluster, in one place."""
from __future__ import annotations


def connect():
    """The `ray` module, attached to a cluster: the one this process attached to already (a
    test's `ray.init(...)`), else `ray.init()`: the running cluster of `ray job submit` /
    `ray start --head` (RAY_ADDRESS), or a local instance started here."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray


def cluster_gpus() -> float:
    """GPUs in the attached cluster (0 without any)."""
    return connect().cluster_resources().get("GPU", 0)
