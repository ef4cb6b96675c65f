"""MGG meta-training on Ray: the rollout workers of `metatta.learned.meta_training` as Ray actors.

- N rollout actors (one GPU each on a cluster, one CPU each here) each own a
  share of the held-out-corruption images; the learner (`meta_train`, in the
  driver) sends the MGG weights with every request (the MGG has ~160
  parameters: broadcasting them costs nothing next to an unroll).
- Actors restart on failure (`max_restarts`), and the interrupted request is
  retried on the restarted actor, which first continues from its state in the
  learner's last checkpoint (data position, trajectory, generators), sent along
  with every request as a reference that only a restarted actor reads.
- On `--resume`, every actor starts from its state in the learner checkpoint.

`train_mgg(..., use_ray=False)` runs the same loop in one process (`LocalPool`).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

from metatta.data.types import DomainData
from metatta.learned.meta_training import (LocalPool, MGGTrainConfig, MGGTrainOutcome, RolloutWorker,
                                           check_worker_states, meta_train)
from trainers.cluster import cluster_gpus, connect

log = logging.getLogger(__name__)


def gpus_per_actor(cluster_gpus: float, num_actors: int, device: str) -> float:
    """A whole GPU per actor where the cluster has one for each; else an equal share of the GPUs
    (rounded down to Ray's 1e-4 resource grain), so that more actors than GPUs all start
    instead of waiting forever for a free GPU. 0: the actors run on CPU."""
    if device == "cpu" or cluster_gpus < 1 or num_actors < 1:
        return 0
    return 1 if cluster_gpus >= num_actors else math.floor(cluster_gpus / num_actors * 1e4) / 1e4


class RolloutActor(RolloutWorker):
    """A `RolloutWorker` that, when Ray has restarted it after a failure, continues from its state
    in the learner's last checkpoint: Ray rebuilds a restarted actor with its first constructor
    arguments (the state it started from), so each request carries the latest checkpointed state."""

    def __init__(self, *args, **kwargs):
        import ray

        super().__init__(*args, **kwargs)
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def run_from(self, mgg_state, checkpointed: list) -> dict[str, Any]:
        """`run(mgg_state)`; `checkpointed`: [a reference to this worker's state in the last checkpoint,
        or None before the first], wrapped in a list so that Ray passes the reference unread."""
        if self.restarted:
            import ray

            self.restarted = False
            if checkpointed[0] is not None:
                self.load_state_dict(ray.get(checkpointed[0]))
                log.warning("rollout actor %d restarted: continues from the last checkpoint (epoch %d)",
                            self.index, self.epoch)
        return self.run(mgg_state)


class RayPool:
    """One Ray actor per share; restarted on failure (from the last checkpoint), interrupted calls retried.

    `states`: one `RolloutWorker.state_dict()` per actor to start from (a resumed training)."""

    def __init__(self, shares, checkpoint, cfg, states=None):
        ray = connect()
        states = check_worker_states(states, len(shares))
        gpus = gpus_per_actor(cluster_gpus(), len(shares), cfg.device)
        actor_cls = ray.remote(RolloutActor)
        self.actors = [
            actor_cls.options(
                name=f"{cfg.name}-rollout-{i}", num_cpus=1, num_gpus=gpus, max_restarts=-1, max_task_retries=-1,
                scheduling_strategy="SPREAD",  # across the nodes: losing one node loses few actors
            ).remote(share, checkpoint, cfg, i, state)
            for i, (share, state) in enumerate(zip(shares, states))
        ]
        self.checkpointed_refs = [None] * len(self.actors)  # each actor's state in the last checkpoint
        log.info("started %d rollout actors (%s each)", len(self.actors), f"{gpus:g} GPU" if gpus else "1 CPU")

    def run(self, mgg_state):
        ray = connect()
        ref = ray.put(mgg_state)
        return ray.get([a.run_from.remote(ref, [state]) for a, state in zip(self.actors, self.checkpointed_refs)])

    def states(self) -> list[dict[str, Any]]:
        ray = connect()
        return ray.get([a.state_dict.remote() for a in self.actors])

    def checkpointed(self, states) -> None:
        ray = connect()
        self.checkpointed_refs = [ray.put(state) for state in states]

    def shutdown(self):
        ray = connect()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def train_mgg(
    cfg: MGGTrainConfig,
    *,
    resume: bool = False,
    use_ray: bool = True,
    domains: list[DomainData] | None = None,
    on_step: Callable[[int, Any], None] | None = None,
) -> MGGTrainOutcome:
    """`meta_train` with the rollout workers as Ray actors (`use_ray=False`: in this process)."""
    return meta_train(cfg, RayPool if use_ray else LocalPool, resume=resume, domains=domains, on_step=on_step)
