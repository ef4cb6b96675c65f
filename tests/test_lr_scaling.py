"""Learning rate by batch size (MethodConfig.lr_batch_size, base.scaled_to_batch): linear
below the batch the lr was published for, unchanged at and above it, self-consistent,
recorded for the protocol, and the published batch sizes in the method configs."""
from __future__ import annotations

import dataclasses

import pytest

from metatta.methods import build_method, method_class
from metatta.methods.base import scaled_to_batch

from test_methods import TinyBNNet


@pytest.mark.parametrize("batch, lr", [(200, 1e-3), (400, 1e-3), (16, 8e-5), (1, 5e-6)])
def test_tent_lr_is_linear_below_its_published_batch_only(batch, lr):
    method = build_method("tent", TinyBNNet(), batch_size=batch)
    assert method.config.lr == pytest.approx(lr)
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    record = method.lr_scaling
    assert record["published_lr"] == 1e-3 and record["lr_batch_size"] == 200 and record["batch_size"] == batch
    assert record["lr"] == pytest.approx(lr) and record["factor"] == pytest.approx(min(1.0, batch / 200))


def test_scaled_config_is_self_consistent_and_scaling_twice_changes_nothing():
    cfg = method_class("tent").Config()
    once, _ = scaled_to_batch(cfg, 16)
    assert (once.lr_batch_size, once.batch_size) == (16, 16)
    twice, record = scaled_to_batch(once, 16)
    assert twice == once and record["factor"] == 1.0


def test_off_switch_and_no_published_batch_leave_lr_alone():
    off = build_method("tent", TinyBNNet(), {"scale_lr": False}, batch_size=16)
    assert off.config.lr == 1e-3 and off.lr_scaling["rule"].startswith("none (scale_lr false)")
    unknown = build_method("tent", TinyBNNet(), {"lr_batch_size": None}, batch_size=16)
    assert unknown.config.lr == 1e-3 and unknown.lr_scaling["rule"].startswith("none (no lr_batch_size)")
    assert build_method("tent", TinyBNNet()).lr_scaling is None  # no batch size given: not asked


def test_methods_that_read_lr_in_their_constructor_get_the_scaled_one():
    palm = build_method("palm", TinyBNNet(), batch_size=20)
    assert palm.config.lr == pytest.approx(5e-5)
    eata = build_method("eta", TinyBNNet(), batch_size=16)
    assert eata.optimizer.param_groups[0]["lr"] == pytest.approx(0.005 / 4)


def test_sar_reproduces_its_authors_rule():
    for batch in (1, 8, 16, 32, 64, 200):
        lr = build_method("sar", TinyBNNet(), batch_size=batch).config.lr
        assert lr == pytest.approx((0.00025 / 64) * batch * 2 if batch < 32 else 0.00025)


def test_published_batch_sizes():
    expected = {"tent": 200, "cotta": 200, "palm": 200, "law": 200, "eata": 64, "eta": 64, "sar": 32}
    for name, batch in expected.items():
        assert method_class(name).Config().lr_batch_size == batch, name


@pytest.mark.parametrize("field, value, match", [
    ("batch", 0, "batch_size must be an integer >= 1"),
    ("lr_batch_size", 0, r"config\.lr_batch_size must be an integer >= 1"),
])
def test_bad_values_are_refused_naming_the_field(field, value, match):
    cfg = method_class("tent").Config()
    if field == "batch":
        with pytest.raises(ValueError, match=match):
            scaled_to_batch(cfg, value)
    else:
        with pytest.raises(ValueError, match=match):
            scaled_to_batch(dataclasses.replace(cfg, lr_batch_size=value), 16)


def test_an_experiment_records_the_scaled_lr_and_the_rule(tmp_path):
    from metatta.experiment import experiment_config, run_experiment
    from metatta.paths import cache_root

    checkpoint = cache_root() / "models" / "resnet_fmnist.pt"
    root = cache_root() / "fashion_mnist_c-n10000-s0-v2"
    if not checkpoint.is_file() or not (root / "contrast.npy").is_file():
        pytest.skip("the cached Fashion-MNIST-C source model / benchmark files are not built here")
    cfg = experiment_config({
        "name": "lr_scaling", "benchmark": {"root": str(root), "corruptions": ["contrast"], "num_images": 32},
        "source": {"checkpoint": str(checkpoint)}, "stream": {"batch_size": 16},
        "methods": [{"name": "tent"}], "device": "cpu", "output_dir": str(tmp_path), "mlflow": False,
        "progress": False})
    (result,) = run_experiment(cfg)
    assert result.protocol["lr_scaling"]["lr"] == pytest.approx(8e-5)
    assert result.protocol["lr_scaling"]["rule"] == "lr * min(1, batch_size / lr_batch_size)"
    assert result.protocol["method_config"]["lr"] == pytest.approx(8e-5)
