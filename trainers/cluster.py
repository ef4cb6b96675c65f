"""How the Ray layer attaches to a cluster, in one place, and how a job's workers end with its driver.

Ray ends a job's workers and actors when its driver exits or is killed, except detached actors,
which outlive their job by design. Ray Train creates one for every `fit()` (its unnamed
`PlacementGroupCleaner`), and it watches its controller through the dashboard's state API: on a
cluster without a dashboard, or on a machine where more than one Ray runs, it never sees the
controller die, so every SIGKILLed CTA job left one behind. Hence a driver attached by `connect`
owns a named sentinel actor, which Ray ends with the driver, and every worker of its job runs
`watch_driver`: once the sentinel is gone, the worker exits. Named detached actors stay: they are
cluster services a later job finds by name (Ray's `AutoscalingCoordinator`, our `RayClaims`).
"""
from __future__ import annotations

import os
import sys
import threading
import time

DRIVER_NAMESPACE = "metatta_drivers"
WATCH_INTERVAL_S = 1.0
_sentinel = None  # this driver's handle: Ray ends an actor whose handles are all gone


def connect():
    """The `ray` module, attached to a cluster: the one this process attached to already (a
    test's `ray.init(...)`), else `ray.init()`: the running cluster of `ray job submit` /
    `ray start --head` (RAY_ADDRESS), or a local instance started here. A cluster attached here
    ends the job's workers with this driver, even a SIGKILLed one (`watch_driver`)."""
    import ray

    if not ray.is_initialized():
        # The hook runs before a worker can import from the driver's checkout: it travels by
        # value (this module's functions), not as a name to import. The runtime env is merged
        # with a `ray job submit --runtime-env-json` one (working_dir, env_vars).
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.init(runtime_env={"worker_process_setup_hook": watch_driver})
        global _sentinel
        _sentinel = start_driver_sentinel(ray)
    return ray


def cluster_gpus() -> float:
    """GPUs in the attached cluster (0 without any)."""
    return connect().cluster_resources().get("GPU", 0)


def sentinel_name(job_id: str) -> str:
    return f"driver-{job_id}"


class DriverSentinel:
    """Does nothing; it exists while the driver that owns it does (not detached)."""

    def ping(self) -> bool:
        return True


def start_driver_sentinel(ray):
    """The named sentinel of this driver's job; Ray registers the name before `.remote()` returns."""
    name = sentinel_name(ray.get_runtime_context().get_job_id())
    return ray.remote(DriverSentinel).options(name=name, namespace=DRIVER_NAMESPACE, num_cpus=0,
                                              max_restarts=-1).remote()


def watch_driver() -> None:
    """Ray's worker_process_setup_hook for a job attached by `connect`: a daemon thread that ends
    this worker once its job's driver is gone."""
    import ray

    name = sentinel_name(ray.get_runtime_context().get_job_id())
    threading.Thread(target=_watch, args=(ray, name), name="metatta-driver-watch", daemon=True).start()


def _watch(ray, name: str) -> None:
    seen = False  # armed once the sentinel was seen: a worker may start before it is registered
    while True:
        time.sleep(WATCH_INTERVAL_S)
        try:
            ray.get_actor(name, namespace=DRIVER_NAMESPACE)
            seen = True
        except ValueError:  # no live actor of that name: Ray ended it with the driver
            if not seen:
                continue
            if ray.get_runtime_context().get_actor_name():
                return  # a named (detached) actor: a cluster service, not this job's to end
            os._exit(0)
