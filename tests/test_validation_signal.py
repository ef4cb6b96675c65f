"""benchmarks/validation_signal.py: the aggregates of per-domain validation errors and their rank
correlation with the benchmark, on hand-made numbers, and one tiny run on a fake train-only split
(validation never reads a test image)."""
import json

import numpy as np
import pytest
import torch
import yaml

from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.models.feature_stats import compute_feature_stats
from repo_scripts import load_script

from fake_data import serve_train_split_only

signal = load_script("benchmarks/validation_signal.py")


def measured(errors: dict[str, list[list[float]]], domains: list[str]) -> dict:
    trials = {k: {"objective": float(np.mean(e)), "mean_error": float(np.mean(e)), "errors": e} for k, e in errors.items()}
    return {"domains": domains, "seeds": [0, 1], "trials": trials}


def test_aggregates_and_their_rank_correlation_with_the_benchmark():
    # domain "easy" (BN 10) ranks the trials backwards, domain "hard" (BN 40) as the benchmark does
    errors = {"bn": [[10, 40], [10, 40]], "default": [[11, 30], [11, 30]], "a": [[12, 25], [12, 25]],
              "b": [[10, 38], [10, 38]]}
    benchmark = {"default": 21.0, "a": 20.0, "b": 22.0}
    summary = signal.summarize_variant(measured(errors, ["easy", "hard"]), benchmark)
    rho = summary["spearman"]
    assert summary["trials"] == 3 and rho["mean"] == pytest.approx(1.0)  # a 18.5 < default 20.5 < b 24
    assert rho["mean_bn>=20"] == pytest.approx(1.0)  # the hard domain only: 25 < 30 < 38
    assert rho["worst_gain_over_bn"] == pytest.approx(-1.0)  # max(error - BN): 2, 1, 0
    easy, hard = summary["per_domain"]
    assert (easy["bn"], easy["default"], easy["trial_min"], easy["trial_max"]) == (10, 11, 10, 12)
    assert easy["spearman_vs_benchmark"] == pytest.approx(-1.0) and hard["spearman_vs_benchmark"] == pytest.approx(1.0)
    bn = np.array(errors["bn"], dtype=float)
    assert signal.AGGREGATES["ratio_to_bn"](np.array(errors["a"], dtype=float), bn) == pytest.approx((1.2 + 25 / 40) / 2)
    assert signal.AGGREGATES["objective_0.25"](bn, bn) == pytest.approx(0.75 * 25 + 0.25 * 40)


def test_a_tiny_run_reads_the_training_split_only(monkeypatch, tmp_path):
    asked = serve_train_split_only(monkeypatch, 300)[2]
    torch.manual_seed(0)
    model = build_model("resnet_fmnist", num_classes=10, in_channels=1)
    checkpoint = save_checkpoint(tmp_path / "resnet.pt", model, model_name="resnet_fmnist", num_classes=10,
                                 in_channels=1, feature_stats=compute_feature_stats(model, torch.rand(16, 1, 28, 28)))
    config = {"name": "t", "method": "tent", "space": {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}},
              "benchmark": {"num_images": 20}, "stream": {"batch_size": 10}, "device": "cpu",
              "source": {"checkpoint": str(checkpoint)},
              "validation": {"corruptions": ["speckle_noise"], "severities": [5], "seeds": [0, 1]},
              "divergence": {"max_window_error": None, "on_collapse": False}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    trials = [{"trial_id": t, "params": {"lr": lr}, "validation_diverged": False, "benchmark_mean_error": e}
              for t, lr, e in (("default", 1e-3, 30.0), ("a", 1e-4, 31.0), ("b", 1e-2, 29.0))]
    (tmp_path / "transfer.json").write_text(json.dumps({"trials": trials}))
    results = signal.main([str(tmp_path / "transfer.json"), "--config", str(tmp_path / "search.yaml"),
                           "--variant", "composed={compositions: [gaussian_blur-5+spatter-3]}",
                           "--name", "signal", "--out", str(tmp_path / "out")])
    assert set(asked) == {"train"}
    variant = results["variants"]["composed"]
    assert variant["measured"]["domains"] == ["speckle_noise-5", "gaussian_blur-5+spatter-3"]
    assert set(variant["measured"]["trials"]) == {"bn", "default", "a", "b"}
    assert np.array(variant["measured"]["trials"]["a"]["errors"]).shape == (2, 2)  # seeds x domains
    assert variant["summary"]["trials"] == 3 and (tmp_path / "out" / "signal.md").is_file()
