"""The methods added for breadth (DeYO, LAME, T3A, RPL, TTAug, MEMO, BN-alpha, BN-EMA, RoTTA, RMT) through the
experiment path on a tiny Fashion-MNIST-C stream (the source model and data of test_experiment_e2e)."""
import pytest

from metatta.experiment import run_experiment
from test_experiment_e2e import config, tiny_benchmark, tiny_source  # noqa: F401  (fixtures)

NEW_METHODS = [
    {"name": "deyo"}, {"name": "lame"}, {"name": "t3a"}, {"name": "rpl"},
    {"name": "ttaug", "config": {"num_augmentations": 2}},
    {"name": "memo", "config": {"num_augmentations": 2}},
    {"name": "bn", "label": "bn-alpha", "config": {"statistics": "alpha"}},
    {"name": "bn", "label": "bn-ema", "config": {"statistics": "ema"}},
    {"name": "rotta", "config": {"memory_size": 16, "update_frequency": 16}},
    {"name": "rmt", "config": {"warmup_samples": 64, "projection_dim": 16}},  # labelled source batches: source_images
]


@pytest.mark.slow
def test_new_methods_end_to_end(tmp_path, tiny_source, tiny_benchmark):  # noqa: F811
    cfg = config(tmp_path, tiny_source, tiny_benchmark, methods=NEW_METHODS, mlflow=False, source_images=200)
    cfg.benchmark.num_images = 32
    results = run_experiment(cfg)
    labels = [m.get("label", m["name"]) for m in NEW_METHODS]
    assert [r.method for r in results] == labels
    for r in results:
        assert r.num_images == 64 and 0 <= r.mean_error <= 100 and r.images_per_second > 0
    adapted = {label: r.adapted_parameters for label, r in zip(labels, results)}
    assert adapted["lame"] == adapted["t3a"] == adapted["ttaug"] == adapted["bn-ema"] == 0
    assert 0 < adapted["deyo"] < adapted["rpl"] == adapted["rotta"] < adapted["memo"] < adapted["rmt"]
