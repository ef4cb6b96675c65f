"""A resumed MGG meta-training is the uninterrupted one (issue #24 item 3): the learner
checkpoint carries every rollout worker's data position, trajectory and RNG state, and the
MLflow run of a resumed training holds exactly one point per learner step."""
import dataclasses

import pytest
import torch

from metatta import tracking
from metatta.learned.meta_training import (RolloutWorker, checkpoint_path, load_checkpoint, split_domains,
                                           steps_per_epoch)
from test_mgg_training import config, domains, source_checkpoint  # noqa: F401 (fixtures)
from trainers.mgg import train_mgg

CHECKPOINT_AT, KILLED_AT = 3, 5  # the last checkpoint, and the step the killed run had reached


class Killed(RuntimeError):
    """Stands for a SIGKILL of the driver: the run ends after step KILLED_AT, past its last checkpoint."""


def kill_at(step, pool):
    if step == KILLED_AT:
        raise Killed(f"killed after step {step}")


def resume_config(tmp_path, checkpoint, name, **overrides):
    # 6 images per actor and corruption = 3 batches of 2: a trajectory spans two learner steps (prime
    # + step, step), 4 steps an epoch; the checkpoint at step 3 falls inside a domain with a trajectory
    # in flight, the kill in the second epoch; lr randomization draws from the workers' generators
    settings = dict(name=name, train_images=24, epochs=2, checkpoint_every=CHECKPOINT_AT, inner_lr_max=1e-2)
    return config(tmp_path, checkpoint, **{**settings, **overrides})


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def interrupted_then_resumed(cfg, domains, use_ray):
    with pytest.raises(Killed):
        train_mgg(cfg, use_ray=use_ray, domains=domains, on_step=kill_at)
    return train_mgg(cfg, resume=True, use_ray=use_ray, domains=domains)


def check_resume_is_exact(tmp_path, checkpoint, domains, use_ray, whole_use_ray=None):
    """Uninterrupted (`whole_use_ray`, default `use_ray`) against killed and resumed (`use_ray`)."""
    whole_cfg = resume_config(tmp_path, checkpoint, "whole")
    per_epoch = steps_per_epoch(split_domains(domains, whole_cfg)[0], whole_cfg)
    total = whole_cfg.epochs * per_epoch
    assert CHECKPOINT_AT < KILLED_AT < total and CHECKPOINT_AT % per_epoch != 0  # checkpoint inside an epoch
    whole = train_mgg(whole_cfg, use_ray=use_ray if whole_use_ray is None else whole_use_ray, domains=domains)
    name = "resumed_ray" if use_ray else "resumed"
    resumed = interrupted_then_resumed(resume_config(tmp_path, checkpoint, name, mlflow=True), domains, use_ray)

    assert whole.steps == resumed.steps == total
    expected, got = whole.mgg.state_dict(), resumed.mgg.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), \
        f"resumed MGG differs by up to {max_abs_difference(expected, got)}"
    assert [h["meta_loss"] for h in resumed.history] == [h["meta_loss"] for h in whole.history]
    points = tracking.client().get_metric_history(resumed.run_id, "meta_loss")
    assert sorted(p.step for p in points) == list(range(1, total + 1))  # one point per step, none twice


def test_local_resume_after_a_kill_is_bit_identical_and_logs_each_step_once(tmp_path, source_checkpoint, domains,
                                                                             module_mlflow_uri):
    check_resume_is_exact(tmp_path, source_checkpoint, domains, use_ray=False)


@pytest.mark.slow  # three Ray actor pools: tens of seconds on a shared 2-core machine
def test_ray_resume_after_a_kill_is_bit_identical_and_logs_each_step_once(tmp_path, source_checkpoint, domains,
                                                                           module_mlflow_uri, ray_session):
    # the actors start from their checkpointed states; the uninterrupted reference runs in this
    # process: Ray actors and local workers compute the same thing, bit for bit
    check_resume_is_exact(tmp_path, source_checkpoint, domains, use_ray=True, whole_use_ray=False)


def test_a_worker_built_from_a_state_continues_exactly(tmp_path, source_checkpoint, domains):
    cfg = resume_config(tmp_path, source_checkpoint, "worker")
    share = split_domains(domains, cfg)[0][0]
    worker = RolloutWorker(share, str(source_checkpoint), cfg, index=0)
    mgg_state = {k: v.clone() for k, v in worker.mgg.state_dict().items()}
    for _ in range(3):  # into the second domain, its trajectory in flight
        worker.run(mgg_state)
    state = worker.state_dict()
    assert (state["epoch"], state["domains_done"], state["batches_done"]) == (0, 1, 2)
    assert state["trajectory"]["pending_grads"] is not None
    copy = RolloutWorker(share, str(source_checkpoint), cfg, index=0, state=state)
    for _ in range(4):  # through the end of the epoch into the next one
        a, b = worker.run(mgg_state), copy.run(mgg_state)
        assert a["metrics"]["meta_loss"] == b["metrics"]["meta_loss"] and a["metrics"]["epoch"] == b["metrics"]["epoch"]
        assert all(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])
    with pytest.raises(ValueError, match="state of worker 0"):
        RolloutWorker(share, str(source_checkpoint), cfg, index=1, state=state)


@pytest.mark.slow  # a Ray actor pool and an actor restart: tens of seconds on a shared 2-core machine
def test_a_restarted_ray_actor_continues_from_the_last_checkpoint(tmp_path, source_checkpoint, domains, ray_session):
    ray = ray_session
    # a checkpoint after every step, the crash right after one: the restarted actor loses nothing
    cfg = resume_config(tmp_path, source_checkpoint, "crash", checkpoint_every=1)
    whole = train_mgg(dataclasses.replace(cfg, name="crash_reference"), use_ray=False, domains=domains)
    killed = []

    def kill_once(step, pool):
        if step == CHECKPOINT_AT and not killed:
            ray.kill(pool.actors[1], no_restart=False)  # a crash: Ray restarts it, the call is retried
            killed.append(step)

    crashed = train_mgg(cfg, use_ray=True, domains=domains, on_step=kill_once)
    assert killed == [CHECKPOINT_AT]
    expected, got = whole.mgg.state_dict(), crashed.mgg.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected), \
        f"MGG after an actor restart differs by up to {max_abs_difference(expected, got)}"


def test_resume_refuses_another_number_of_actors(tmp_path, source_checkpoint, domains):
    cfg = config(tmp_path, source_checkpoint, name="actors", epochs=2)
    train_mgg(dataclasses.replace(cfg, epochs=1), use_ray=False, domains=domains)
    assert len(load_checkpoint(checkpoint_path(cfg))["workers"]) == 2
    with pytest.raises(ValueError, match="holds 2 rollout worker states, train_mgg.num_actors is 1"):
        train_mgg(dataclasses.replace(cfg, num_actors=1), resume=True, use_ray=False, domains=domains)
