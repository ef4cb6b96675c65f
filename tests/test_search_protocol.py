"""The search protocol without Ray (metatta/search_protocol.py, metatta/search.py): validation data
from clean training images only, the windowed objective, divergence, the default-or-searched rule,
and one search config per method family whose default is a point of its space."""
from pathlib import Path

import numpy as np
import pytest
import torch

from metatta.config import ConfigError, load_config
from metatta.data.benchmark_files import image_seeds
from metatta.evaluation import Progress
from metatta.learned.heldout import STEP_SEED_OFFSET, corrupt_uint8
from metatta.lifelong import window_errors
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.models.feature_stats import compute_feature_stats
from metatta.search import (default_params, grace_reports, in_space, run_trial, search_config, validation_data,
                            validation_images)
from metatta.search_protocol import (AcceptanceConfig, DivergenceConfig, DivergenceWatch, TrialDiverged,
                                     check_provenance, choose_setting, seed_noise)

from fake_data import serve_train_split_only

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("palm", "tent", "eata", "sar", "law", "deyo")


@pytest.fixture
def train_split_only(monkeypatch):
    """Clean Fashion-MNIST whose test split cannot be read; returns the list of splits asked for."""
    return serve_train_split_only(monkeypatch, 200)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet_fmnist", num_classes=10, in_channels=1)
    stats = compute_feature_stats(model, torch.rand(32, 1, 28, 28))
    return save_checkpoint(tmp_path_factory.mktemp("src") / "resnet.pt", model, model_name="resnet_fmnist",
                           num_classes=10, in_channels=1, feature_stats=stats)


def search(**extra):
    data = {"name": "t", "method": "tent", "space": {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}},
            "benchmark": {"num_images": 20}, "stream": {"batch_size": 10}, "device": "cpu",
            "validation": {"corruptions": ["speckle_noise", "saturate"], "severities": [4, 5], "seeds": [0, 1]},
            "divergence": {"max_window_error": None, "on_collapse": False}}  # an untrained model, near chance
    data.update(extra)
    return search_config(data)


# ---- validation data: clean training images only ---------------------------------------------------
def test_validation_data_never_includes_a_test_image(train_split_only, checkpoint):
    images, labels, asked = train_split_only
    held = validation_data(search(), seed=0)
    assert set(asked) == {"train"}
    prov = held.provenance
    assert (prov["split"], prov["severities"], prov["num_clean_images"]) == ("train", [4, 5], 200)
    other = validation_data(search(), seed=1).provenance  # each stream seed draws its own images ...
    assert other["seed"] == 1 and other["corruptions"] != prov["corruptions"]
    same = validation_data(search(validation={"corruptions": ["speckle_noise", "saturate"], "severities": [4, 5],
                                              "seeds": [0, 1], "resample_images": False}), seed=1).provenance
    assert same["corruptions"] == prov["corruptions"]  # ... unless told not to
    assert [d.name for d in held.domains] == ["speckle_noise-4", "speckle_noise-5", "saturate-4", "saturate-5"]
    for domain in held.domains:  # every row: its clean training image under that corruption and severity
        idx = np.array(prov["corruptions"][domain.corruption])
        seeds = image_seeds(0, domain.corruption, domain.severity, 200)[idx]
        assert np.array_equal(domain.images, corrupt_uint8(images[idx], domain.corruption, domain.severity, seeds))
        assert np.array_equal(domain.labels, labels[idx])
    assert not set(prov["corruptions"]["speckle_noise"]) & set(prov["corruptions"]["saturate"])
    # a whole trial (and the Fisher batches of methods that take them) reads the training split only
    out = run_trial(search(), {"lr": 1e-3}, checkpoint)
    assert out["images"] == 2 * 4 * 20 and set(asked) == {"train"}
    with pytest.raises(ValueError, match="never a test image"):
        check_provenance({**prov, "split": "test"})
    with pytest.raises(ValueError, match="benchmark corruptions"):
        check_provenance({**prov, "corruptions": {"fog": [1]}})


COMPOSED = {"corruptions": ["speckle_noise", "saturate"], "severities": [4, 5], "seeds": [0, 1],
            "compositions": ["gaussian_blur-5+speckle_noise-4", "spatter-3+spatter-3"]}


def test_compositions_are_held_out_corruptions_in_turn_on_training_images(train_split_only):
    images, labels, asked = train_split_only
    held = validation_data(search(validation=COMPOSED), seed=0)
    plain = validation_data(search(), seed=0)
    assert set(asked) == {"train"}
    prov = held.provenance
    assert [d.name for d in held.domains] == ["speckle_noise-4", "speckle_noise-5", "saturate-4", "saturate-5",
                                              "gaussian_blur-5+speckle_noise-4", "spatter-3+spatter-3"]
    assert prov["corruptions"] == plain.provenance["corruptions"]  # compositions add blocks, move none
    blocks = [set(v) for key in ("corruptions", "compositions") for v in prov[key].values()]
    assert all(len(b) == 20 for b in blocks) and len(set.union(*blocks)) == 20 * 4  # disjoint
    for domain, name in zip(held.domains[4:], COMPOSED["compositions"]):
        idx = np.array(prov["compositions"][name])
        expected = images[idx]
        for k, step in enumerate(name.split("+")):  # step k: the -C seed of its corruption, + k offsets
            corruption, severity = step.rsplit("-", 1)
            seeds = (image_seeds(0, corruption, int(severity), 200)[idx] + k * STEP_SEED_OFFSET) % 2 ** 62
            expected = corrupt_uint8(expected, corruption, int(severity), seeds)
        assert np.array_equal(domain.images, expected) and np.array_equal(domain.labels, labels[idx])
    twice = held.domains[5].images  # a repeated step draws new noise: spatter twice is not spatter once
    idx = np.array(prov["compositions"]["spatter-3+spatter-3"])
    once = corrupt_uint8(images[idx], "spatter", 3, image_seeds(0, "spatter", 3, 200)[idx])
    assert not np.array_equal(twice, corrupt_uint8(once, "spatter", 3, image_seeds(0, "spatter", 3, 200)[idx]))
    again = validation_data(search(validation=COMPOSED), seed=0)  # deterministic per seed ...
    assert all(np.array_equal(a.images, b.images) for a, b in zip(held.domains, again.domains))
    other = validation_data(search(validation=COMPOSED), seed=1)  # ... and each seed draws its own
    assert other.provenance["compositions"] != prov["compositions"]
    only = validation_data(search(validation={**COMPOSED, "corruptions": []}), seed=0)
    assert [d.name for d in only.domains] == COMPOSED["compositions"]
    check_provenance(prov)
    with pytest.raises(ValueError, match="benchmark corruptions"):
        check_provenance({**prov, "compositions": {"fog-5+spatter-3": [1]}})
    with pytest.raises(ValueError, match="share clean images"):
        check_provenance({**prov, "compositions": {"spatter-3+spatter-3": prov["corruptions"]["saturate"][:1]}})


@pytest.mark.parametrize("compositions, match", [
    (["fog-5+speckle_noise-5"], r"validation\.compositions: .*'fog-5\+speckle_noise-5'.*benchmark corruptions"),
    (["speckle_noise-5"], r"validation\.compositions: .*at least two steps"),
    (["speckle_noise-7+saturate-5"], r"validation\.compositions: .*severity"),
    (["speckle_noise+saturate-5"], r"validation\.compositions: .*<corruption>-<severity>"),
    (["spatter-3+spatter-3", "spatter-3+spatter-3"], r"validation\.compositions: repeats"),
    ("spatter-3+spatter-3", r"validation\.compositions: expected a list"),
])
def test_composition_errors_name_the_field(compositions, match):
    with pytest.raises(ConfigError, match=match):
        search(validation={**COMPOSED, "compositions": compositions})


def test_compositions_are_refused_in_the_gradual_setting():
    with pytest.raises(ConfigError, match=r"validation\.compositions: the gradual setting"):
        search(stream={"setting": "gradual"}, validation={**COMPOSED, "severities": [1, 2, 3, 4, 5]})


def test_validation_needs_a_corruption_or_a_composition():
    with pytest.raises(ConfigError, match=r"validation: no corruptions and no compositions"):
        search(validation={**COMPOSED, "corruptions": [], "compositions": []})


@pytest.mark.parametrize("change, match", [
    ({"validation": {"corruptions": ["fog"]}}, r"validation\.corruptions: .* held-out"),
    ({"validation": {"seeds": [0]}}, r"validation\.seeds: measuring the seed noise needs at least 2"),
    ({"validation": {"seeds": [0, 0]}}, r"validation\.seeds"),
    ({"validation": {"severities": [6]}}, r"validation\.severities"),
    ({"stream": {"setting": "gradual"}}, r"validation\.severities: the gradual setting needs severities 1-5"),
    ({"stream": {"setting": "gradual"}, "validation": {"corruptions": ["spatter"], "compositions": [],
                                                        "severities": [1, 2, 3, 4, 5]}},
     r"benchmark\.severities: the gradual run .* severities 1-5, got \[5\]"),
    ({"benchmark": {"num_images": None}}, r"validation\.num_images: give the images per domain"),
    ({"objective": {"worst_window_weight": 1.5}}, r"objective\.worst_window_weight"),
    ({"acceptance": {"noise": "mad"}}, r"acceptance\.noise"),
    ({"divergence": {"max_window_error": 120}}, r"divergence\.max_window_error"),
    ({"default": {"momentum": 0.5}}, r"search\.default: \['momentum'\] are not searched"),
    ({"default": {"lr": -1.0}}, r"search\.default: "),
    ({"metric": "accuracy"}, r"search\.metric"),
    ({"mode": "max"}, r"search\.mode"),
])
def test_protocol_errors_name_the_field(change, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        search(**change)


def test_one_seed_is_allowed_without_a_noise_margin():
    assert search(validation={"seeds": [3]}, acceptance={"k": 0}).validation.seeds == [3]


def test_validation_images_per_domain_follow_the_run():
    assert search().validation.num_images is None  # the run's, benchmark.num_images
    assert validation_images(search()) == 20
    assert validation_images(search(validation={"num_images": 7, "seeds": [0, 1]})) == 7


# ---- the objective ---------------------------------------------------------------------------------
def test_window_errors_weigh_images_and_fold_a_short_last_window():
    assert window_errors([10, 20, 30, 40], [2, 2, 2, 2], 4) == [15.0, 35.0]
    assert window_errors([10, 20, 30], [2, 2, 1], 4) == pytest.approx([(20 + 40 + 30) / 5])  # 1 < 4 / 2: folded
    assert window_errors([10, 20, 30], [2, 2, 2], 4) == [15.0, 30.0]  # 2 >= 4 / 2: its own window
    with pytest.raises(ValueError, match="window must be"):
        window_errors([1.0], [1], 0)


def test_the_objective_weighs_the_mean_error_and_the_worst_window(checkpoint):
    flat = search(objective={"worst_window_weight": 0.0})
    worst = search(objective={"worst_window_weight": 1.0, "window": 20})
    a, b = run_trial(flat, {"lr": 1e-3}, checkpoint), run_trial(worst, {"lr": 1e-3}, checkpoint)
    assert a["objective"] == pytest.approx(a["mean_error"])
    assert b["objective"] == pytest.approx(b["worst_window"]) and b["worst_window"] >= b["mean_error"]


# ---- divergence ------------------------------------------------------------------------------------
def test_a_diverged_trial_is_stopped_and_recorded(checkpoint):
    cfg = search(divergence={"max_window_error": 0.0, "on_collapse": False, "penalty": 100.0})
    reports = []
    out = run_trial(cfg, {"lr": 1e-3}, checkpoint, report=reports.append)
    assert out["diverged"] == 1.0 and out["final"] == 1.0 and out["objective"] == 100.0
    assert "window error" in out["diverged_reason"] and out["batches"] == 2  # the first window: 20 images
    assert reports[-1] is not None and reports[-1]["diverged"] == 1.0


def test_the_watch_stops_on_non_finite_logits_and_on_the_collapse_guard():
    class Method:
        collapse_events = 0

    def batch(i, finite=True):
        return Progress(batches=i, total_batches=9, images=10 * i, domain="d", domain_errors={"d": 10.0},
                        batch_error=10.0, batch_images=10, finite_logits=finite)

    method = Method()
    watch = DivergenceWatch(DivergenceConfig(max_window_error=50.0), 20, method)
    watch(batch(1))
    with pytest.raises(TrialDiverged, match="non-finite logits at batch 2"):
        watch(batch(2, finite=False))
    method.collapse_events = 1
    with pytest.raises(TrialDiverged, match="collapse guard"):
        watch(batch(3))
    calm = DivergenceWatch(DivergenceConfig(on_collapse=False, on_nonfinite=False, max_window_error=None), 20, method)
    calm(batch(1, finite=False))
    assert calm.windows() == [10.0]


# ---- the default or the searched setting -------------------------------------------------------------
def trial(trial_id, objective, diverged=False, completed=True, seeds=None):
    metrics = {"objective": objective, **{f"seed{s}/objective": v for s, v in enumerate(seeds or [])}}
    return {"trial_id": trial_id, "config": {}, "metrics": metrics, "completed": completed, "diverged": diverged}


DEFAULT = trial("default", 20.0, seeds=[19.8, 20.0, 20.2])  # std 0.2, range 0.4


def test_a_search_whose_trials_are_all_worse_returns_the_default():
    decision = choose_setting(DEFAULT, [trial("a", 21.0), trial("b", 20.5)], AcceptanceConfig(k=1.0))
    assert decision["chosen"] == "default" and decision["trial_id"] == "default"
    assert decision["best_objective"] == 20.5 and decision["default_objective"] == 20.0
    assert decision["seed_noise"] == pytest.approx(0.2) and decision["margin"] == pytest.approx(0.2)


def test_the_winner_must_beat_the_default_by_more_than_the_seed_noise():
    close = [trial("a", 19.7)]  # 0.3 better
    assert choose_setting(DEFAULT, close, AcceptanceConfig(k=1.0))["chosen"] == "searched"
    assert choose_setting(DEFAULT, close, AcceptanceConfig(k=2.0))["chosen"] == "default"  # margin 0.4
    assert choose_setting(DEFAULT, close, AcceptanceConfig(noise="range", k=1.0))["chosen"] == "default"
    assert choose_setting(DEFAULT, close, AcceptanceConfig(k=0.0, min_margin=0.5))["chosen"] == "default"
    assert seed_noise([1.0, 2.0, 4.0], "range") == 3.0 and seed_noise([5.0], "std") == 0.0


def test_the_paired_noise_is_the_spread_of_the_per_seed_differences_to_the_default():
    # the image draw moves every setting together: a trial better on every seed by about 0.3 wins
    # although the default's own per-seed spread (std 0.2, k 2: margin 0.4) would keep the default
    steady = trial("steady", 19.7, seeds=[19.5, 19.7, 19.9])  # differences -0.3, -0.3, -0.3: std 0
    decision = choose_setting(DEFAULT, [steady], AcceptanceConfig(noise="paired_std", k=2.0))
    assert decision["chosen"] == "searched" and decision["seed_noise"] == pytest.approx(0.0)
    assert choose_setting(DEFAULT, [steady], AcceptanceConfig(k=2.0))["chosen"] == "default"
    shaky = trial("shaky", 19.7, seeds=[18.8, 20.1, 20.2])  # differences -1.0, +0.1, 0.0: std 0.61
    decision = choose_setting(DEFAULT, [shaky], AcceptanceConfig(noise="paired_std", k=2.0))
    assert decision["chosen"] == "default" and decision["margin"] == pytest.approx(2 * 0.6083, abs=1e-3)
    assert choose_setting(DEFAULT, [], AcceptanceConfig(noise="paired_std"))["chosen"] == "default"
    with pytest.raises(ValueError, match="paired_std: trial a has no"):
        choose_setting(DEFAULT, [trial("a", 19.0)], AcceptanceConfig(noise="paired_std"))


def test_a_diverged_or_unfinished_trial_is_never_chosen():
    trials = [trial("wild", 1.0, diverged=True), trial("asha", 2.0, completed=False), trial("ok", 19.0)]
    decision = choose_setting(DEFAULT, trials, AcceptanceConfig(k=1.0))
    assert decision["chosen"] == "searched" and decision["trial_id"] == "ok" and decision["diverged_trials"] == 1
    only_wild = choose_setting(DEFAULT, trials[:2], AcceptanceConfig(k=1.0))
    assert only_wild["chosen"] == "default" and "no searched trial completed" in only_wild["why"]
    broken_default = trial("default", 100.0, diverged=True, seeds=[100.0, 100.0])
    assert choose_setting(broken_default, trials, AcceptanceConfig())["trial_id"] == "ok"


# ---- one search config per method family --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_config_parses_and_its_default_is_a_point_of_its_space(family):
    cfg = search_config(load_config(ROOT / "configs" / "fmnist_c" / f"tune_{family}.yaml"))
    # compositions of the held-out corruptions (docs/searches.md: the held-out corruptions alone did not transfer)
    assert cfg.validation.corruptions == [] and len(cfg.validation.compositions) == 12
    assert len(cfg.validation.seeds) >= 2
    assert (cfg.stream.setting, cfg.stream.batch_size, cfg.benchmark.num_images) == ("continual", 200, 1000)
    assert in_space(cfg, default_params(cfg)), default_params(cfg)  # Optuna is told the default's result


def test_the_deyo_default_is_the_published_cifar_setting():
    cfg = search_config(load_config(ROOT / "configs" / "fmnist_c" / "tune_deyo.yaml"))
    published = load_config(ROOT / "configs" / "methods" / "deyo_cifar.yaml")
    params = default_params(cfg)
    assert params["lr"] == published["lr"] and cfg.method_config["optimizer"] == published["optimizer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_its_default_through_one_trial(family, train_split_only, checkpoint):
    data = load_config(ROOT / "configs" / "fmnist_c" / f"tune_{family}.yaml")
    data.update(benchmark={"num_images": 10}, stream={"setting": "continual", "batch_size": 10}, device="cpu",
                validation={"corruptions": ["speckle_noise", "saturate"], "severities": [5], "seeds": [0, 1]},
                divergence={"max_window_error": None, "on_collapse": False}, fisher_images=20)
    cfg = search_config(data)
    out = run_trial(cfg, default_params(cfg), checkpoint)
    assert out["diverged"] == 0 and out["images"] == 2 * 2 * 10 and 0 <= out["objective"] <= 100
    assert set(train_split_only[2]) == {"train"}


def test_a_null_asha_grace_period_covers_one_seeds_whole_stream(train_split_only):
    cfg = search(asha={"grace_period": None}, report_every=3)  # 4 domains x 20 images at batch 10: 8 batches a seed
    held = validation_data(cfg, seed=0)
    assert grace_reports(cfg, held) == 3  # reports at batches 3, 6, 9: the third covers seed 0's 8 batches
    assert grace_reports(search(asha={"grace_period": 2}), held) == 2
    with pytest.raises(ConfigError, match=r"search\.asha: grace_period must be >= 1 \(or null"):
        search(asha={"grace_period": 0})
