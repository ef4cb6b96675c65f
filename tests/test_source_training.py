"""Source training on real Fashion-MNIST (tiny runs), the cached `ensure_source_model`, the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metatta.source as source
from metatta.config import ConfigError, load_config
from metatta.models import build_model, load_source_model
from metatta.models.checkpoint import CheckpointError, checkpoint_hash, load_feature_stats, read_header
from metatta.models.feature_stats import compute_feature_stats, feature_taps
from metatta.paths import cache_root


@pytest.fixture(scope="module")
def fmnist():
    """{split: (images, labels)} of real Fashion-MNIST."""
    from metatta.data.fashion_mnist import load_fashion_mnist

    try:
        return {s: load_fashion_mnist(s) for s in ("train", "test")}
    except FileNotFoundError as e:
        pytest.skip(f"clean Fashion-MNIST not available: {e}")


@pytest.fixture
def loader(fmnist):
    def load(dataset: str, split: str):
        assert dataset == "fashion_mnist"
        return fmnist[split]

    return load


def tiny_config(tmp_path, **overrides):
    # 2 short epochs of batch 16: enough steps for BN running statistics and the one-cycle schedule (under 1 s)
    cfg = {"epochs": 2, "num_train_images": 512, "num_test_images": 500, "batch_size": 16, "lr": 0.1,
           "feature_stats_images": 256, "device": "cpu", "progress": False, "output": str(tmp_path / "src.pt")}
    cfg.update(overrides)
    return cfg


def _eval_loss(model, images, labels):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), torch.from_numpy(labels)).item()


def test_tiny_training_learns_and_writes_a_loadable_checkpoint(tmp_path, fmnist, loader):
    cfg = source.source_train_config(tiny_config(tmp_path))
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, cfg.num_classes, cfg.in_channels)
    images, labels = fmnist["train"][0][:512], fmnist["train"][1][:512]
    loss_before = _eval_loss(initial, images, labels)

    result = source.train_source(cfg, loader)

    assert result.checkpoint == Path(cfg.output) and result.checkpoint.is_file()
    assert result.train_images == 512 and result.test_images == 500
    assert result.clean_test_error < 75.0  # chance is 90%
    model = load_source_model(result.checkpoint)
    assert _eval_loss(model, images, labels) < min(loss_before, math.log(10)) - 0.3
    header = read_header(result.checkpoint)
    assert header["clean_test_error"] == pytest.approx(result.clean_test_error)
    assert header["train_time_s"] == pytest.approx(result.train_time_s)
    assert header["dataset"] == "fashion_mnist" and header["model"] == "resnet_fmnist"
    assert header["extra"]["train_config"]["num_train_images"] == 512
    assert header["weights_sha256"] == checkpoint_hash(result.checkpoint)

    # the stored feature statistics are those of the saved model on the first 256 clean training images
    stats = load_feature_stats(result.checkpoint)
    assert len(stats) == 2 * len(feature_taps(model))
    x = torch.from_numpy(fmnist["train"][0][:256]).permute(0, 3, 1, 2).float() / 255
    recomputed = compute_feature_stats(model, x, batch_size=100)
    outs = []
    handles = [t.register_forward_hook(lambda m, i, o: outs.append(o)) for t in feature_taps(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    for i, o in enumerate(outs):
        std, mean = torch.std_mean(o.permute(0, 2, 3, 1).reshape(-1, o.shape[1]).double(), dim=0)
        for key, ref in ((f"mean.{i}", mean), (f"std.{i}", std)):
            torch.testing.assert_close(stats[key].double(), ref, rtol=1e-4, atol=1e-5, msg=key)
            torch.testing.assert_close(stats[key], recomputed[key], msg=key)


def test_training_is_reproducible_for_a_seed(tmp_path, loader):
    cfg = tiny_config(tmp_path, num_train_images=128, num_test_images=100, feature_stats_images=64, epochs=1)
    a = source.train_source({**cfg, "output": str(tmp_path / "a.pt")}, loader)
    b = source.train_source({**cfg, "output": str(tmp_path / "b.pt")}, loader)
    c = source.train_source({**cfg, "seed": 1, "output": str(tmp_path / "c.pt")}, loader)
    assert a.epoch_losses == b.epoch_losses and a.clean_test_error == b.clean_test_error
    weights = [load_source_model(r.checkpoint).state_dict() for r in (a, b, c)]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), f"{key} differs between two runs of one seed"
    assert not all(torch.equal(v, weights[2][k]) for k, v in weights[0].items()), "seed 1 trained the same weights"
    assert not torch.are_deterministic_algorithms_enabled(), "train_source must restore the global flag"


def test_ensure_source_model_trains_once_then_reuses(tmp_path, loader, monkeypatch):
    cfg = tiny_config(tmp_path, num_train_images=128, num_test_images=100, feature_stats_images=64, epochs=1)
    path = source.ensure_source_model(cfg, loader)
    digest = checkpoint_hash(path)

    def must_not_train(*args, **kwargs):
        raise AssertionError("ensure_source_model retrained a cached model")

    monkeypatch.setattr(source, "train_source", must_not_train)
    assert source.ensure_source_model(cfg, loader) == path
    assert checkpoint_hash(path) == digest
    with pytest.raises(ValueError, match="trained as"):
        source.ensure_source_model({**cfg, "model_kwargs": {"widths": [8, 16, 32]}}, loader)
    path.write_bytes(path.read_bytes()[:100])  # a damaged cache is an error, not a silent retrain
    with pytest.raises(CheckpointError, match="src.pt"):
        source.ensure_source_model(cfg, loader)


def test_config_and_data_errors(tmp_path, loader):
    with pytest.raises(ConfigError, match="unknown field"):
        source.source_train_config({"epoch": 3})
    with pytest.raises(ConfigError, match="train_source.lr"):
        source.source_train_config({"lr": "fast"})
    with pytest.raises(ValueError, match="epochs"):
        source.source_train_config({"epochs": 0})
    with pytest.raises(ValueError, match="in_channels is 3"):
        source.train_source(tiny_config(tmp_path, in_channels=3), loader)
    with pytest.raises(ValueError, match="num_classes = 5"):
        source.train_source(tiny_config(tmp_path, num_classes=5), loader)

    def mismatched(dataset, split):
        x, y = loader(dataset, split)
        return x, y[:-1]

    with pytest.raises(ValueError, match="labels of shape"):
        source.train_source(tiny_config(tmp_path), mismatched)

    def floats(dataset, split):
        x, y = loader(dataset, split)
        return x.astype(np.float32), y

    with pytest.raises(ValueError, match="uint8"):
        source.train_source(tiny_config(tmp_path), floats)
    with pytest.raises(ValueError, match="unknown dataset"):
        source.load_clean_split("not_a_dataset", "train")
    assert not Path(tiny_config(tmp_path)["output"]).exists()  # nothing half-written


def test_augment_batch_crops_and_flips_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 6, 6, generator=g)
    assert torch.equal(source.augment_batch(x, 0, False, g), x)
    flipped = source.augment_batch(x, 0, True, g)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))
    cropped = source.augment_batch(x, 2, False, g)
    padded = F.pad(x, (2, 2, 2, 2))
    shifts = set()
    for c, p in zip(cropped, padded):
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(c, p[:, dy:dy + 6, dx:dx + 6])]
        assert found, "every crop is a 6x6 window of the padded image"
        shifts.add(found[0])
    assert len(shifts) > 1  # per-image offsets, not one for the batch


def test_cli_trains_from_the_yaml_with_overrides(tmp_path, fmnist):  # fmnist: skip without data
    from repo_scripts import load_script

    cli = load_script("launch/train_source.py")
    out = tmp_path / "cli.pt"
    config = Path(__file__).parents[1] / "configs" / "fmnist_c" / "source.yaml"
    cli.main(["--config", str(config), "--device", "cpu", "epochs=1", "num_train_images=128", "num_test_images=100",
              "feature_stats_images=64", "progress=false", f"output={out}"])
    header = read_header(out)
    assert header["extra"]["train_config"]["epochs"] == 1 and header["extra"]["train_config"]["device"] == "cpu"


def test_default_source_config_is_valid():
    cfg = source.source_train_config(load_config(Path(__file__).parents[1] / "configs" / "fmnist_c" / "source.yaml"))
    assert cfg.model == "resnet_fmnist" and cfg.output == str(cache_root() / "models" / "resnet_fmnist.pt")


@pytest.mark.slow
def test_full_default_training_reaches_the_target(tmp_path, loader):
    """The default recipe: <= 10% clean test error (and a few minutes on 2 CPU cores)."""
    from metatta.config import load_config

    data = load_config(Path(__file__).parents[1] / "configs" / "fmnist_c" / "source.yaml")
    result = source.train_source({**data, "output": str(tmp_path / "full.pt"), "progress": False, "device": "cpu"}, loader)
    assert result.clean_test_error <= 10.0
    assert result.train_time_s < 900  # 5 minutes on an idle 2-core machine; loose for a shared one


def test_a_small_dataset_gets_the_epochs_that_make_min_steps(tmp_path, fmnist, caplog):
    """Issue #24.9: the default recipe's 6 epochs are 2,808 steps on Fashion-MNIST but 60 on a
    digits-sized dataset; with min_steps the small dataset trains as many steps."""
    def small(dataset, split):  # a whole training split of 96 images
        images, labels = fmnist[split]
        n = 96 if split == "train" else 100
        return images[:n], labels[:n]

    cfg = tiny_config(tmp_path, epochs=1, num_train_images=None, min_steps=20, feature_stats_images=64)
    with caplog.at_level("WARNING", logger="metatta.source"):
        result = source.train_source(cfg, small)
    assert read_header(result.checkpoint)["extra"]["train_config"]["epochs"] == 4  # 96 // 16 = 6 steps an epoch
    assert "fewer than min_steps 20; training 4 epochs" in caplog.text
    quick = source.epochs_for_min_steps(source.source_train_config({**cfg, "num_train_images": 96}), 6, 96)
    assert quick.epochs == 1  # a deliberately small run stays as asked
    with pytest.raises(ValueError, match="min_steps must be >= 0"):
        source.source_train_config({**cfg, "min_steps": -1})


VIT = {"model": "vit_tiny_fmnist", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "channels_last": False,
       "model_kwargs": {"patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}}


def test_a_vit_trains_with_adamw_saves_its_cls_statistics_and_is_deterministic(tmp_path, loader):
    first = source.train_source(tiny_config(tmp_path / "a", **VIT), loader)
    second = source.train_source(tiny_config(tmp_path / "b", **VIT), loader)
    assert first.epoch_losses[-1] < first.epoch_losses[0] and first.clean_test_error < 85.0  # learns (chance: 90%)
    a, b = load_source_model(first.checkpoint), load_source_model(second.checkpoint)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in a.modules())
    stats = load_feature_stats(first.checkpoint)
    assert sorted(stats) == sorted(f"{k}.{i}" for i in range(2) for k in ("mean", "std"))  # CLS token, every block
    assert stats["mean.0"].shape == (32,)
    assert read_header(first.checkpoint)["extra"]["train_config"]["optimizer"] == "adamw"


def test_the_shipped_vit_source_config_is_valid():
    cfg = source.source_train_config(load_config(Path(__file__).parents[1] / "configs" / "fmnist_c" / "source_vit.yaml"))
    assert cfg.optimizer == "adamw" and cfg.model == "vit_tiny_fmnist"
    model = build_model(cfg.model, cfg.num_classes, cfg.in_channels, **cfg.model_kwargs)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_hflip_auto_never_flips_digits(caplog):
    """Issue #24.9: a mirrored 2, 3 or 7 is no digit; Fashion-MNIST's classes are mirror-symmetric."""
    assert source.source_train_config({"dataset": "digits"}).hflip is False
    assert source.source_train_config({"dataset": "fashion_mnist"}).hflip is True
    shipped = load_config(Path(__file__).parents[1] / "configs" / "fmnist_c" / "source.yaml")
    assert shipped["hflip"] == "auto" and source.source_train_config(shipped).hflip is True
    with caplog.at_level("WARNING", logger="metatta.source"):
        assert source.source_train_config({"dataset": "digits", "hflip": True}).hflip is True  # asked for: kept
    assert "hflip is true on digits" in caplog.text
    with pytest.raises(ConfigError, match="hflip"):
        source.source_train_config({"hflip": "sometimes"})
