"""Validation-benchmark transfer of a search (issue 22, item 5): Spearman's rank correlation
(metatta.search_protocol.spearman) against hand-computed values, and benchmarks/search_transfer.py
on a fake search record, a random source model and a tiny benchmark."""
import json

import numpy as np
import pytest
import torch
from scipy import stats

from metatta.config import ConfigError
from metatta.data.benchmark_files import fashion_mnist_c
from metatta.experiment import experiment_config, run_experiment
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.models.feature_stats import compute_feature_stats
from metatta.search import search_config, search_params, write_search_record
from metatta.search_protocol import average_ranks, spearman
from repo_scripts import load_script

transfer = load_script("benchmarks/search_transfer.py")
CORRUPTIONS = ["gaussian_noise", "contrast"]


# ---- Spearman ---------------------------------------------------------------------------------
def test_spearman_of_perfect_and_reversed_rankings():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_spearman_without_ties_is_one_minus_six_d_squared():
    # ranks differ by d = 0, -1, 1, 0: 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert spearman([0.1, 0.2, 0.3, 0.4], [5, 7, 6, 8]) == pytest.approx(0.8)
    # d = 0, 0, -1, 1, -1, 1 (sum d^2 = 4): 1 - 6 * 4 / (6 * 35)
    assert spearman([1, 2, 3, 4, 5, 6], [1, 2, 4, 3, 6, 5]) == pytest.approx(1 - 24 / 210)


def test_ties_share_the_mean_of_their_ranks():
    assert list(average_ranks([10, 20, 10, 30, 20])) == [1.5, 3.5, 1.5, 5.0, 3.5]
    # x ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4: centred (-1.5, 0, 0, 1.5) . (-1.5, -.5, .5, 1.5) = 4.5,
    # norms sqrt(4.5) and sqrt(5): rho = 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / np.sqrt(10))
    # ties on both sides: x ranks 1.5, 1.5, 3, 4 and y ranks 1, 2.5, 2.5, 4, centred (-1, -1, .5, 1.5) and
    # (-1.5, 0, 0, 1.5): dot 1.5 + 2.25 = 3.75, squared norms 4.5 and 4.5
    assert spearman([7, 7, 8, 9], [1, 2, 2, 3]) == pytest.approx(3.75 / 4.5)


def test_spearman_agrees_with_scipy_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(3, 12))
        x, y = rng.integers(0, 4, n).astype(float), rng.normal(size=n).round(1)
        if len(set(x)) == 1:
            continue
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_spearman_is_none_with_fewer_than_three_points_or_a_constant_side():
    assert spearman([], []) is None and spearman([1, 2], [2, 1]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="3 values against 2"):
        spearman([1, 2, 3], [1, 2])


# ---- the transfer -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet_fmnist", num_classes=10, in_channels=1)
    stats_ = compute_feature_stats(model, torch.rand(32, 1, 28, 28))
    path = tmp_path_factory.mktemp("src") / "resnet.pt"
    return save_checkpoint(path, model, model_name="resnet_fmnist", num_classes=10, in_channels=1,
                           feature_stats=stats_)


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    return fashion_mnist_c(root=tmp_path_factory.mktemp("fmnist_c"), num_images=64, corruptions=CORRUPTIONS)


def search_data(checkpoint, root):
    return {
        "name": "tune_tiny", "method": "tent", "method_config": {"optimizer": "adam"},
        "space": {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}},
        "benchmark": {"name": "fashion_mnist_c", "root": str(root), "corruptions": CORRUPTIONS, "num_images": 64},
        "validation": {"corruptions": ["speckle_noise"], "severities": [5], "seeds": [0, 1]},
        "source": {"checkpoint": str(checkpoint)}, "stream": {"setting": "continual", "batch_size": 32},
        "device": "cpu", "mlflow": False, "register_as": "",
    }


def trial(trial_id, lr, objective, mean_error, completed=True, diverged=False):
    return {"trial_id": trial_id, "params": {"lr": lr}, "completed": completed, "diverged": diverged,
            "error": None, "objective": objective, "mean_error": mean_error}


def record(config=None, chosen="t_low"):
    trials = [trial("default", 1e-3, 50.0, 45.0), trial("t_high", 5e-3, 48.0, 44.0), trial("t_low", 1e-4, 40.0, 38.0),
              trial("t_mid", 3e-4, 49.0, 46.0), trial("t_div", 9e-3, 100.0, None, diverged=True),
              trial("t_stopped", 2e-3, 30.0, 29.0, completed=False)]
    out = {"decision": {"chosen": "searched" if chosen != "default" else "default", "trial_id": chosen,
                        "why": "test"}, "trials": trials}
    if config is not None:
        out["config"] = config
    return out


def test_the_default_the_chosen_then_the_best_finished_trials_each_once():
    rows = transfer.select_trials(record(), "objective", top_k=2)
    assert [(r["trial"]["trial_id"], r["roles"]) for r in rows] == [
        ("default", ["default"]), ("t_low", ["chosen", "top"]), ("t_high", ["top"])]
    # diverged and stopped trials are never among the top ones
    rows = transfer.select_trials(record(chosen="default"), "mean_error", top_k=10)
    assert [(r["trial"]["trial_id"], r["roles"]) for r in rows] == [
        ("default", ["default", "chosen"]), ("t_low", ["top"]), ("t_high", ["top"]), ("t_mid", ["top"])]


def test_summary_compares_the_chosen_with_the_default_and_ranks_validation_against_benchmark():
    rec = record()
    rows = transfer.select_trials(rec, "objective", top_k=3)
    errors = {"default": {0: 22.0, 1: 23.0}, "t_low": {0: 21.0, 1: 22.5}, "t_high": {0: 25.0, 1: 25.0},
              "t_mid": {0: 24.0, 1: 24.0}}
    summary = transfer.summarize(rec, rows, errors, "objective")
    comp = summary["chosen_vs_default"]
    assert comp["difference"] == pytest.approx(-0.75) and comp["at_or_below"] and comp["strictly_below"]
    assert comp["per_seed_difference"] == {"0": -1.0, "1": -0.5}
    # validation objective 50, 40, 48, 49 -> ranks 4, 1, 2, 3; benchmark 22.5, 21.75, 25, 24 -> 2, 1, 4, 3
    assert summary["spearman"]["validation_objective_vs_benchmark"] == pytest.approx(1 - 6 * (4 + 0 + 4 + 0) / 60)
    assert summary["spearman"]["trials"] == 4
    assert summary["best_on_benchmark"]["trial_id"] == "t_low"
    # a search that kept the default: at or below, not strictly
    kept = transfer.summarize(record(chosen="default"), transfer.select_trials(record(chosen="default"), "objective", 3),
                              errors, "objective")["chosen_vs_default"]
    assert kept["difference"] == 0 and kept["at_or_below"] and not kept["strictly_below"]


def test_trials_stopped_after_the_first_seed_are_ranked_on_that_seed_alone():
    rec = record(chosen="default")
    for t in rec["trials"]:  # validation seed 0 values; t_stopped was stopped by ASHA after it
        t["seed0/objective"], t["seed0/mean_error"] = t["objective"] + 1.0, (t["mean_error"] or 0.0) + 1.0
    del rec["trials"][3]["seed0/objective"]  # t_mid: an older record without per-seed running values
    rows = transfer.select_trials(rec, "objective", top_k=1, stopped_seed=0)
    assert [(r["trial"]["trial_id"], r["roles"]) for r in rows] == [
        ("default", ["default", "chosen"]), ("t_low", ["top"]), ("t_stopped", ["stopped"])]
    assert transfer.select_trials(rec, "objective", top_k=1) == rows[:2]  # only when asked
    errors = {"default": {0: 22.0, 1: 23.0}, "t_low": {0: 21.0, 1: 22.5}, "t_stopped": {0: 20.0}}
    summary = transfer.summarize(rec, rows, errors, "objective", stopped_seed=0)
    # the completed-trials ranking leaves the stopped trial out; the one-seed ranking takes it, on
    # benchmark seed 0: validation 51, 41, 31 vs benchmark 22, 21, 20
    assert summary["spearman"]["trials"] == 2
    assert summary["spearman_one_seed"] == {"validation_seed": 0, "trials": 3,
                                            "validation_objective_vs_benchmark": pytest.approx(1.0),
                                            "validation_mean_error_vs_benchmark": pytest.approx(1.0)}


def test_transfer_end_to_end_matches_the_experiment_path(tmp_path, source_checkpoint, tiny_benchmark):
    search_dir = tmp_path / "tune_tiny"
    search_dir.mkdir()
    (search_dir / "search.json").write_text(json.dumps(record(search_data(source_checkpoint, tiny_benchmark))))
    report = transfer.main([str(search_dir), "--top-k", "1", "--seeds", "0", "1", "--name", "tiny",
                            "--out", str(tmp_path / "results")])
    assert [t["trial_id"] for t in report["trials"]] == ["default", "t_low"]
    assert report["protocol"]["domains"] == ["gaussian_noise-5", "contrast-5"]
    assert report["protocol"]["num_images_per_domain"] == 64 and report["protocol"]["batch_size"] == 32
    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert saved["chosen_vs_default"]["chosen_trial_id"] == "t_low" and saved["spearman"]["trials"] == 2
    assert saved["spearman"]["validation_objective_vs_benchmark"] is None  # two trials: no correlation
    assert "at or below" in (tmp_path / "results" / "tiny.md").read_text()
    # the default's benchmark error on seed 1 is what an experiment row of the same config gives
    exp = experiment_config({
        "name": "check", "benchmark": {"name": "fashion_mnist_c", "root": str(tiny_benchmark),
                                       "corruptions": CORRUPTIONS, "num_images": 64},
        "source": {"checkpoint": str(source_checkpoint)}, "stream": {"setting": "continual", "batch_size": 32, "seed": 1},
        "methods": [{"name": "tent", "config": {"optimizer": "adam", "lr": 1e-3}}], "device": "cpu",
        "output_dir": str(tmp_path / "exp"), "mlflow": False, "progress": False})
    [result] = run_experiment(exp)
    default = report["trials"][0]
    assert default["benchmark_per_seed"]["1"] == pytest.approx(result.mean_error)


def test_a_registered_setting_brings_its_record(tmp_path, monkeypatch):
    (tmp_path / "search.json").write_text(json.dumps(record({"name": "x"})))
    monkeypatch.setattr(transfer.tracking, "download_registered", lambda uri: ("3", tmp_path))
    loaded, where = transfer.load_record("models:/tent_settings@champion")
    assert where == "models:/tent_settings@champion (version 3)" and loaded["trials"][0]["trial_id"] == "default"
    (tmp_path / "search.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no search.json"):
        transfer.load_record("models:/tent_settings@champion")


def test_a_record_without_its_config_needs_one(tmp_path, source_checkpoint, tiny_benchmark):
    with pytest.raises(ConfigError, match="--config"):
        transfer.transfer_config(record(), None, [])
    path = tmp_path / "search.yaml"
    path.write_text(json.dumps(search_data(source_checkpoint, tiny_benchmark)))  # JSON is YAML
    cfg = transfer.transfer_config(record(), str(path), ["benchmark.num_images=32"])
    assert cfg.method == "tent" and cfg.benchmark.num_images == 32
    with pytest.raises(FileNotFoundError, match="no search.json"):
        transfer.load_record(str(tmp_path))


def test_the_search_record_keeps_the_config_and_the_validation_rank_correlation(tmp_path):
    def done(trial_id, objective, mean_error, diverged=False):
        return {"trial_id": trial_id, "config": {"lr": 1e-3}, "completed": True, "diverged": diverged, "error": None,
                "metrics": {"objective": objective, "mean_error": mean_error, "seed0/objective": objective}}

    trials = [done("default", 30.0, 25.0), done("a", 31.0, 24.0), done("b", 29.0, 26.0), done("c", 32.0, 27.0),
              done("d", 100.0, float("nan"), diverged=True)]
    path = write_search_record(tmp_path / "search.json", {"chosen": "default"}, trials, {"name": "x", "lr": np.float64(2)})
    saved = json.loads(path.read_text())
    assert saved["config"] == {"name": "x", "lr": 2.0} and [t["trial_id"] for t in saved["trials"]][0] == "default"
    # objective ranks 2, 3, 1, 4 against mean error ranks 2, 1, 3, 4 (the diverged trial left out): d = 0, 2, -2, 0
    assert saved["rank_correlation"] == {"objective_vs_mean_error": pytest.approx(1 - 6 * 8 / 60), "trials": 4}


def test_the_recorded_search_config_parses_back_to_the_same_config(source_checkpoint, tiny_benchmark):
    cfg = search_config(search_data(source_checkpoint, tiny_benchmark))
    assert search_config(json.loads(json.dumps(search_params(cfg)))) == cfg
