"""MGG meta-training: plain-function workers, the Ray actor pool, resume, registry."""
import dataclasses

import numpy as np
import pytest
import torch

from metatta import tracking
from metatta.data.types import DomainData
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.models.feature_stats import compute_feature_stats
from test_mgg_options import train_split_only  # noqa: F401 (a fixture)
from metatta.learned import meta_training
from metatta.learned.meta_training import (RolloutWorker, fit_image_counts, images_per_corruption, load_checkpoint,
                                           mgg_train_config, split_domains, steps_per_epoch)
from trainers.mgg import gpus_per_actor, train_mgg

CORRUPTIONS = ["speckle_noise", "gaussian_blur"]


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet_fmnist", num_classes=10, in_channels=1)
    clean = torch.rand(64, 1, 28, 28)
    stats = compute_feature_stats(model, clean)
    path = tmp_path_factory.mktemp("src") / "resnet.pt"
    return save_checkpoint(path, model, model_name="resnet_fmnist", num_classes=10, in_channels=1,
                           feature_stats=stats)


@pytest.fixture(scope="module")
def domains():
    rng = np.random.default_rng(0)
    return [DomainData(c, 5, rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
                       rng.integers(0, 10, 40).astype(np.int64)) for c in CORRUPTIONS]


def config(tmp_path, checkpoint, **overrides):
    data = dict(name="t", source_checkpoint=str(checkpoint), corruptions=CORRUPTIONS, train_images=16,
                val_images=8, batch_size=2, epochs=1, num_actors=2, checkpoint_dir=str(tmp_path / "ckpt"),
                checkpoint_every=1, log_every=1, device="cpu", val_batch_size=8, mlflow=False, register_as=None)
    data.update(overrides)
    return mgg_train_config(data)


def test_config_errors(tmp_path, source_checkpoint):
    with pytest.raises(ValueError, match="unroll of train_mgg.unroll_steps=1 needs"):
        config(tmp_path, source_checkpoint, train_images=4)
    with pytest.raises(ValueError, match="unknown corruption"):
        config(tmp_path, source_checkpoint, corruptions=["fog", "nope"])
    with pytest.raises(ValueError, match="epochs"):
        config(tmp_path, source_checkpoint, epochs=0)


def test_split_is_disjoint_and_balanced(tmp_path, source_checkpoint, domains):
    cfg = config(tmp_path, source_checkpoint)
    shares, val = split_domains(domains, cfg)
    assert [len(d) for d in shares[0]] == [4, 4] and [len(d) for d in shares[1]] == [4, 4]
    assert [len(d) for d in val] == [8, 8]
    train_rows = np.concatenate([shares[0][0].images, shares[1][0].images])
    assert not any((v == train_rows).all(axis=(1, 2, 3)).any() for v in val[0].images)
    with pytest.raises(ValueError, match="need"):
        split_domains(domains, dataclasses.replace(cfg, val_images=100))


def test_worker_walks_domains_and_returns_meta_gradients(tmp_path, source_checkpoint, domains):
    cfg = config(tmp_path, source_checkpoint)
    shares, _ = split_domains(domains, cfg)
    worker = RolloutWorker(shares[0], str(source_checkpoint), cfg, index=0)
    state = {k: v.clone() for k, v in worker.mgg.state_dict().items()}
    outputs = [worker.run(state) for _ in range(3)]
    for out in outputs:
        assert set(out["grads"]) == {n for n, _ in worker.mgg.named_parameters()}
        assert all(torch.isfinite(g).all() for g in out["grads"].values())
        assert np.isfinite(out["metrics"]["meta_loss"])
    # 2 batches per domain: each unroll primes a fresh trajectory (K=1 needs 2 batches) -> one per domain
    assert all(out["metrics"]["trajectory_steps"] == 1.0 for out in outputs)
    assert outputs[2]["metrics"]["epoch"] == 1.0  # wrapped into a new epoch after 2 domains


def test_lr_randomization_draws_an_inner_lr_per_trajectory(tmp_path, source_checkpoint, domains):
    fixed = config(tmp_path, source_checkpoint, inner_lr=1e-4)
    randomized = dataclasses.replace(fixed, inner_lr_max=1e-2)
    shares, _ = split_domains(domains, fixed)
    lrs = {}
    for name, cfg in (("fixed", fixed), ("randomized", randomized)):
        worker = RolloutWorker(shares[0], str(source_checkpoint), cfg, index=0)
        state = {k: v.clone() for k, v in worker.mgg.state_dict().items()}
        lrs[name] = [worker.run(state)["metrics"]["inner_lr"] for _ in range(6)]  # a fresh trajectory each
    assert lrs["fixed"] == [1e-4] * 6
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs["randomized"]) and len(set(lrs["randomized"])) == 6
    again = RolloutWorker(shares[0], str(source_checkpoint), randomized, index=0)  # seeded: reproducible
    assert [again.run(state)["metrics"]["inner_lr"] for _ in range(6)] == lrs["randomized"]


def test_local_training_checkpoints_and_resumes(tmp_path, source_checkpoint, domains):
    cfg = config(tmp_path, source_checkpoint, epochs=2)
    assert steps_per_epoch(split_domains(domains, cfg)[0], cfg) == 2
    first = train_mgg(dataclasses.replace(cfg, epochs=1), use_ray=False, domains=domains)
    assert first.steps == 2 and 0.0 <= first.validation_error <= 100.0
    saved = load_checkpoint(tmp_path / "ckpt" / "t" / "learner.pt")
    assert saved["step"] == 2 and len(saved["history"]) == 2
    resumed = train_mgg(cfg, resume=True, use_ray=False, domains=domains)
    assert resumed.steps == 4 and len(resumed.history) == 4
    assert (resumed.adapter_dir / "weights.pt").is_file()
    with pytest.raises(FileNotFoundError, match="no learner checkpoint"):
        train_mgg(dataclasses.replace(cfg, name="other"), resume=True, use_ray=False, domains=domains)


def test_training_moves_the_mgg(tmp_path, source_checkpoint, domains):
    cfg = config(tmp_path, source_checkpoint, epochs=2, meta_lr=0.05)
    from metatta.learned.mgg import MGG

    torch.manual_seed(cfg.seed)
    initial = MGG().state_dict()
    outcome = train_mgg(cfg, use_ray=False, domains=domains)
    changed = [k for k, v in outcome.mgg.state_dict().items() if not torch.allclose(v, initial[k])]
    assert changed, "no MGG weight moved"


def test_registers_and_promotes(tmp_path, source_checkpoint, domains, mlflow_uri):
    cfg = config(tmp_path, source_checkpoint, mlflow=True, register_as="mgg_test")
    outcome = train_mgg(cfg, use_ray=False, domains=domains)
    assert outcome.registered_version == "1" and outcome.promoted
    path = tracking.download_adapter("models:/mgg_test@champion", tmp_path / "dl")
    from metatta.learned.mgg import load_mgg

    loaded = load_mgg(path)
    features = torch.randn(50, 2)
    assert torch.equal(loaded(features)[0], outcome.mgg(features)[0])
    info = tracking.load_adapter_files(path)[1]
    assert info["source_checkpoint_sha256"] and info["validation_error"] == outcome.validation_error


def test_ray_actors_survive_a_killed_actor(tmp_path, source_checkpoint, domains, ray_session):
    ray = ray_session
    cfg = config(tmp_path, source_checkpoint, epochs=3)
    killed = []

    def kill_once(step, pool):
        if step == 2 and not killed:
            ray.kill(pool.actors[0], no_restart=False)  # a crash: Ray restarts it, the call is retried
            killed.append(step)

    outcome = train_mgg(cfg, use_ray=True, domains=domains, on_step=kill_once)
    assert killed == [2]
    assert outcome.steps == 3 * steps_per_epoch(split_domains(domains, cfg)[0], cfg)
    assert all(np.isfinite(h["meta_loss"]) for h in outcome.history)


# ---- options beyond the paper (issue #9) ------------------------------------------------------------
def test_long_unrolls_with_a_learned_step_scale_train_and_save_it(tmp_path, source_checkpoint, domains):
    from metatta.learned.mgg import load_mgg

    # 1 actor, 16 images per corruption = 8 batches: one to prime, then two truncations of K=3
    cfg = config(tmp_path, source_checkpoint, num_actors=1, train_images=32, unroll_steps=3, learned_step_size=True,
                 outer_reduction="sum", meta_lr=0.05)
    assert steps_per_epoch(split_domains(domains, cfg)[0], cfg) == 4
    outcome = train_mgg(cfg, use_ray=False, domains=domains)
    assert [h["trajectory_steps"] for h in outcome.history] == [3.0, 6.0, 3.0, 6.0]
    assert outcome.skipped == {"inner_updates": 0, "unrolls": 0, "meta_steps": 0}
    assert abs(outcome.mgg.log_step_scale.item()) > 1e-3  # moved from 0 (4 Adam steps of 0.05, noisy signs)
    assert outcome.history[-1]["step_scale"] != 1.0
    loaded = load_mgg(outcome.adapter_dir)
    assert loaded.learned_step_size and torch.equal(loaded.log_step_scale, outcome.mgg.log_step_scale)


def test_non_finite_updates_are_skipped_and_counted(tmp_path, source_checkpoint, domains):
    import json

    # an infinite step scale: every MGG update would be non-finite, so every one is skipped
    cfg = config(tmp_path, source_checkpoint, learned_step_size=True, init_log_step_scale=1000.0)
    outcome = train_mgg(cfg, use_ray=False, domains=domains)
    assert outcome.skipped["inner_updates"] == sum(h["skipped_inner_updates"] for h in outcome.history) > 0
    assert all(torch.isfinite(p).all() for p in outcome.mgg.parameters())
    info = json.loads((outcome.adapter_dir / "adapter.json").read_text())
    assert info["skipped"] == outcome.skipped


def test_supervised_outer_loss_reads_only_the_training_split(tmp_path, source_checkpoint, train_split_only):
    import json

    _, _, asked = train_split_only  # the test split raises
    cfg = config(tmp_path, source_checkpoint, train_data="train_split", outer_loss="supervised", unroll_steps=1)
    outcome = train_mgg(cfg, use_ray=False)  # no domains given: built from the clean training split
    assert set(asked) == {"train"}
    prov = outcome.data_provenance
    assert prov["split"] == "train" and list(prov["corruptions"]) == CORRUPTIONS
    assert all(len(rows) == 8 + 8 for rows in prov["corruptions"].values())  # 8 to train + 8 to validate
    assert json.loads((outcome.adapter_dir / "adapter.json").read_text())["train_data_provenance"] == prov
    assert 0.0 <= outcome.validation_error <= 100.0 and outcome.steps >= 1
    with pytest.raises(ValueError, match=r"train_mgg\.train_data 'train_split'"):
        config(tmp_path, source_checkpoint, outer_loss="supervised")


def test_image_counts_are_scaled_to_a_small_dataset_with_a_warning_before_training(tmp_path, source_checkpoint,
                                                                                  caplog, monkeypatch):
    """Issue #24.9: the config's counts (16 to train over 2 corruptions + 8 to validate = 16 per corruption)
    on domains of 12 images become the same split of 12 (6 + 6), with a warning, before any training."""
    small = [DomainData(c, 5, np.zeros((12, 28, 28, 1), np.uint8), np.zeros(12, np.int64)) for c in CORRUPTIONS]
    cfg = config(tmp_path, source_checkpoint, num_actors=1)
    assert fit_image_counts(cfg, 16) is cfg  # enough: unchanged
    with caplog.at_level("WARNING", logger="metatta.learned.meta_training"):
        fitted = fit_image_counts(cfg, images_per_corruption(cfg, small))
    assert (fitted.train_images, fitted.val_images) == (12, 6)
    assert "train_images 16 and val_images 8 need 16 images per corruption, but the data holds 12" in caplog.text
    shares, val = split_domains(small, fitted)
    assert [len(d) for d in shares[0]] == [6, 6] and [len(d) for d in val] == [6, 6]
    outcome = train_mgg(dataclasses.replace(cfg, name="small"), use_ray=False, domains=small)
    assert outcome.steps >= 1

    def no_source(*args):
        raise AssertionError("the source model was asked for before the sizes were checked")

    monkeypatch.setattr(meta_training, "source_checkpoint", no_source)
    tiny = [DomainData(c, 5, d.images[:5], d.labels[:5]) for c, d in zip(CORRUPTIONS, small)]
    with pytest.raises(ValueError, match=r"scaled down to 5 images per corruption.*needs at least 2 batches of 2; on this dataset lower"):
        train_mgg(cfg, use_ray=False, domains=tiny)


def test_images_per_corruption_of_the_training_split(tmp_path, source_checkpoint, train_split_only):
    cfg = config(tmp_path, source_checkpoint, train_data="train_split", train_images=400, val_images=100)
    assert images_per_corruption(cfg) == 150  # 300 clean training images, disjoint over 2 corruptions
    fitted = fit_image_counts(cfg, 150)
    assert (fitted.train_images, fitted.val_images) == (200, 50)


@pytest.mark.parametrize("gpus, actors, device, expected", [
    (0, 2, "auto", 0), (4, 2, "auto", 1), (2, 2, "cuda", 1), (4, 2, "cpu", 0),
    (1, 2, "auto", 0.5), (1, 3, "auto", 0.3333), (2, 8, "auto", 0.25),
])
def test_gpus_per_actor_shares_a_gpu_between_more_actors_than_gpus(gpus, actors, device, expected):
    share = gpus_per_actor(gpus, actors, device)
    assert share == expected
    assert share * actors <= max(gpus, 0) or share == 0  # every actor can start at once
