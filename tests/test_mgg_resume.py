"""A resumed MGG meta-training is the uninterrupted one (issue #24 item 3): the learner
checkpoint carries every rollout worker's data position, trajectory and RNG state, and the
MLflow run of a resumed training holds exactly one point per learner step."""
import dataclasses

import pytest
import torch

from metatta import tracking
from metatta.learned.meta_training import split_domains, steps_per_epoch
from test_mgg_training import config, domains, source_checkpoint  # noqa: F401 (fixtures)
from trainers.mgg import train_mgg

CHECKPOINT_AT, KILLED_AT = 4, 6  # the last checkpoint, and the step the killed run had reached


class Killed(RuntimeError):
    """Stands for a SIGKILL of the driver: the run ends after step KILLED_AT, past its last checkpoint."""


def kill_at(step, pool):
    if step == KILLED_AT:
        raise Killed(f"killed after step {step}")


def resume_config(tmp_path, checkpoint, name, **overrides):
    # 16 images per actor and corruption = 8 batches of 2: one trajectory spans several learner steps,
    # so the checkpoint falls inside a domain with a trajectory in flight; lr randomization uses the
    # workers' generators
    return config(tmp_path, checkpoint, name=name, train_images=32, epochs=2, checkpoint_every=CHECKPOINT_AT,
                  inner_lr_max=1e-2, **overrides)


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def interrupted_then_resumed(cfg, domains, use_ray):
    with pytest.raises(Killed):
        train_mgg(cfg, use_ray=use_ray, domains=domains, on_step=kill_at)
    return train_mgg(cfg, resume=True, use_ray=use_ray, domains=domains)


def check_resume_is_exact(tmp_path, checkpoint, domains, use_ray):
    whole_cfg = resume_config(tmp_path, checkpoint, "whole")
    total = whole_cfg.epochs * steps_per_epoch(split_domains(domains, whole_cfg)[0], whole_cfg)
    assert CHECKPOINT_AT < KILLED_AT < total and total % steps_per_epoch(split_domains(domains, whole_cfg)[0],
                                                                         whole_cfg) == 0
    whole = train_mgg(whole_cfg, use_ray=use_ray, domains=domains)
    resumed = interrupted_then_resumed(resume_config(tmp_path, checkpoint, "resumed", mlflow=True), domains, use_ray)

    assert whole.steps == resumed.steps == total
    expected, got = whole.mgg.state_dict(), resumed.mgg.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), \
        f"resumed MGG differs by up to {max_abs_difference(expected, got)}"
    assert [h["meta_loss"] for h in resumed.history] == [h["meta_loss"] for h in whole.history]
    points = tracking.client().get_metric_history(resumed.run_id, "meta_loss")
    assert sorted(p.step for p in points) == list(range(1, total + 1))  # one point per step, none twice


def test_local_resume_after_a_kill_is_bit_identical_and_logs_each_step_once(tmp_path, source_checkpoint, domains,
                                                                             mlflow_uri):
    check_resume_is_exact(tmp_path, source_checkpoint, domains, use_ray=False)
