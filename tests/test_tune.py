"""Ray Tune searches (trainers/tune.py): config parsing and errors, one trial as a
plain function, and tiny real searches (Tent's lr on 2 held-out corruptions of clean training
images) with the default run first, MLflow parent/child runs, the chosen YAML, the registry and
loading the tuned settings back into an experiment. The protocol's own parts (validation data,
objective, divergence, the default-or-searched rule): tests/test_search_protocol.py."""
import dataclasses
import json
import logging
import math

import mlflow
import pytest
import torch
import yaml

from metatta import tracking
from metatta.config import ConfigError
from metatta.experiment import experiment_config, method_config, with_settings
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.models.feature_stats import compute_feature_stats
from metatta.search import run_trial, search_config
from trainers.tune import default_trial, logged_trial, optuna_space, run_search, seed_rungs
from trainers.tune_trials import TRIAL_TAG, close_stopped_runs, named_trainable

HELD_OUT = ["speckle_noise", "gaussian_blur"]


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet_fmnist", num_classes=10, in_channels=1)
    stats = compute_feature_stats(model, torch.rand(32, 1, 28, 28))
    path = tmp_path_factory.mktemp("src") / "resnet.pt"
    return save_checkpoint(path, model, model_name="resnet_fmnist", num_classes=10, in_channels=1,
                           feature_stats=stats)


def data(tmp_path=None, checkpoint=None, **extra):
    d = {
        "name": "tune_test", "method": "tent", "method_config": {"optimizer": "adam"},
        "space": {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}},
        "benchmark": {"name": "fashion_mnist_c", "num_images": 48},  # the run: 48 images per domain
        "validation": {"corruptions": HELD_OUT, "severities": [5], "seeds": [0, 1]},
        # the untrained test model sits near chance (about 85% error): no error bound, no guard
        "divergence": {"max_window_error": None, "on_collapse": False},
        "source": {"checkpoint": str(checkpoint)} if checkpoint else {},
        "stream": {"setting": "continual", "batch_size": 16, "seed": 0},
        "num_samples": 2, "max_concurrent": 2, "report_every": 2,
        "asha": {"grace_period": 1, "reduction_factor": 2}, "device": "cpu", "register_as": "tent_settings",
    }
    if tmp_path is not None:
        d["output_dir"] = str(tmp_path / "out")
    d.update(extra)
    return d


def test_trials_are_named_after_the_method_not_implicitfunc():
    cls = named_trainable(lambda config: None, "nanoadapt")
    assert cls.__name__ == "NanoadaptTrial"
    trial = cls.__new__(cls)  # __repr__ only: no Tune session needed
    trial.config, trial._trial_info = {"lr": 0.0012345, "optimizer": "adam"}, None
    cls.trial_id = "abc_00001"
    assert repr(trial) == "nanoadapt trial abc_00001 lr=0.00123 optimizer=adam"


# ---- parsing and errors ----------------------------------------------------------------------
def test_space_parsing():
    cfg = search_config(data(space={
        "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
        "momentum": {"type": "uniform", "low": 0.0, "high": 1.0},
        "steps": {"type": "int", "low": 1, "high": 3},
        "optimizer": {"type": "choice", "values": ["sgd", "adam"]},
    }, method_config={}))
    assert cfg.space["steps"].type == "int" and cfg.space["optimizer"].values == ["sgd", "adam"]
    space = optuna_space(cfg.space)
    assert math.isclose(space["lr"].low, 1e-5) and space["lr"].log and not space["momentum"].log
    assert (space["steps"].low, space["steps"].high) == (1, 3)  # both ends inclusive
    assert space["optimizer"].choices == ("sgd", "adam")


def test_default_palm_search_config_parses():
    from metatta.config import load_config

    cfg = search_config(load_config("configs/fmnist_c/tune_palm.yaml"))
    # compositions of the held-out corruptions only (docs/searches.md: the held-out ones alone did not transfer)
    assert cfg.method == "palm" and cfg.validation.corruptions == [] and len(cfg.validation.compositions) == 12
    assert {"eta", "alpha", "temperature", "lr"} <= set(cfg.space)


@pytest.mark.parametrize("change, match", [
    ({"space": {"lr": {"type": "gaussian", "low": 1, "high": 2}}}, r"search\.space\.lr\.type: unknown space type"),
    ({"space": {"lr": {"type": "uniform", "low": 2.0, "high": 1.0}}}, r"search\.space\.lr: low \(2\.0\) > high"),
    ({"space": {"lr": {"type": "loguniform", "low": 0.0, "high": 1.0}}}, "loguniform needs low > 0"),
    ({"space": {"lr": {"type": "choice", "values": []}}}, "non-empty"),
    ({"space": {"lr": {"type": "uniform", "low": 1e-4}}}, "needs `low` and `high`"),
    ({"space": {"lr": 0.1}}, r"search\.space\.lr: expected a mapping"),
    ({"space": {"lrr": {"type": "uniform", "low": 0, "high": 1}}}, "'lrr' is not a field of method tent"),
    ({"space": {}}, "space is empty"),
    ({"method_config": {"lr": 1e-3}}, "both fixed"),
    ({"method": "tnet"}, "unknown method"),
    ({"num_samples": 0}, "num_samples"),
])
def test_config_errors(change, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        search_config(data(**change))


@pytest.mark.parametrize("corruptions", [["speckle_noise", "fog"], ["gaussian_noise"]])
def test_benchmark_corruptions_refused_for_validation(corruptions):
    with pytest.raises(ConfigError, match=r"search\.validation\.corruptions: .* held-out"):
        search_config(data(validation={"corruptions": corruptions}))


# ---- one trial, no Ray -------------------------------------------------------------------------
def test_run_trial_reports_running_objective_over_every_seed(source_checkpoint):
    cfg = search_config(data(checkpoint=source_checkpoint))
    reports = []
    out = run_trial(cfg, {"lr": 1e-3}, source_checkpoint, report=reports.append)
    # 2 domains x 48 images at batch 16: 6 batches per seed, 2 seeds; a report every 2 batches
    assert [r["batches"] for r in reports] == [2, 4, 6, 8, 10, 12] and reports[-1]["final"] == 1.0
    assert not any(r["final"] for r in reports[:-1])
    assert out["images"] == 192 and out["diverged"] == 0
    for seed in (0, 1):  # window = 48 images (a domain): the worst window is the worse domain
        errors = [out[f"seed{seed}/error/{d}"] for d in ("speckle_noise-5", "gaussian_blur-5")]
        assert out[f"seed{seed}/worst_window"] == pytest.approx(max(errors))
        assert out[f"seed{seed}/objective"] == pytest.approx(0.75 * out[f"seed{seed}/mean_error"] + 0.25 * max(errors))
    assert out["objective"] == pytest.approx((out["seed0/objective"] + out["seed1/objective"]) / 2)
    # a running report carries the seeds finished so far (a trial ASHA stops keeps them), not their domains
    assert not any(k.startswith("seed") for r in reports[:2] for k in r)
    assert all(r["seed0/objective"] == out["seed0/objective"] and "seed1/objective" not in r for r in reports[2:5])
    assert not any("/error/" in k for r in reports[:-1] for k in r)


def test_the_default_keeps_its_running_values_for_asha(source_checkpoint):
    cfg = search_config(data(checkpoint=source_checkpoint))
    metrics, running = default_trial(dataclasses.asdict(cfg), {"lr": 1e-3}, str(source_checkpoint), None, None, None)
    reports = []
    run_trial(cfg, {"lr": 1e-3}, source_checkpoint, report=reports.append)
    assert running == [r["objective"] for r in reports[:-1]] and len(running) == 5  # every report before the last
    assert metrics["objective"] == reports[-1]["objective"]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_asha_stops_a_trial_behind_the_default_at_the_first_rung(mode):
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    def asha():
        return ASHAScheduler(time_attr="training_iteration", metric="objective", mode=mode, max_t=12, grace_period=3,
                             reduction_factor=2)

    better, worse = (25.0, 36.0) if mode == "min" else (36.0, 25.0)
    default_running = [30.0] * 11  # the default's value at reports 1..11
    for seeded, value, expected in [(False, worse, "CONTINUE"), (True, worse, "STOP"), (True, better, "CONTINUE")]:
        scheduler, trial = asha(), SimpleNamespace(trial_id="t1")
        if seeded:
            seed_rungs(scheduler, default_running, mode)
        scheduler.on_trial_add(None, trial)
        assert scheduler.on_trial_result(None, trial, {"training_iteration": 3, "objective": value}) == expected
    # a default that ran fewer reports than a rung's milestone is not put in that rung
    scheduler = asha()
    seed_rungs(scheduler, [30.0, 30.0], mode)
    assert all("default" not in recorded for bracket in scheduler._brackets for _, recorded in bracket._rungs)


def test_a_trial_logs_the_errors_of_composed_domains_to_mlflow(mlflow_uri, source_checkpoint):
    # "+" is not allowed in an MLflow metric name: a composition's domain error is logged with "_"
    cfg = search_config(data(checkpoint=source_checkpoint, validation={
        "corruptions": ["speckle_noise"], "severities": [5], "seeds": [0, 1],
        "compositions": ["speckle_noise-5+gaussian_blur-5"]}))
    client = tracking.client()
    experiment_id = client.create_experiment("composed")
    parent = client.create_run(experiment_id).info.run_id
    out = logged_trial(dataclasses.asdict(cfg), {"lr": 1e-3}, str(source_checkpoint), "t1", mlflow_uri, parent,
                       experiment_id)
    child = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")[0]
    assert child.data.metrics["seed1_error_speckle_noise-5_gaussian_blur-5"] == pytest.approx(
        out["seed1/error/speckle_noise-5+gaussian_blur-5"])


def test_every_trial_has_a_closed_run_even_one_killed_before_it_opened_it(mlflow_uri):
    """Issue #24.8: a trial whose process was killed before `create_run` still gets a child run, FAILED."""
    cfg = search_config(data(source={"checkpoint": "unused.pt"}))
    c = tracking.client()
    experiment_id = c.create_experiment("trials")
    parent = c.create_run(experiment_id).info.run_id
    for trial_id in ("done", "raised"):
        c.create_run(experiment_id, tags={"mlflow.parentRunId": parent, TRIAL_TAG: trial_id})
    trials = [{"trial_id": "done", "config": {"lr": 1e-3}, "completed": True, "error": None},
              {"trial_id": "raised", "config": {"lr": 1e-3}, "completed": False, "error": "ValueError: x"},
              {"trial_id": "killed", "config": {"lr": 2e-3}, "completed": False, "error": "ActorDiedError: died"}]
    close_stopped_runs(parent, experiment_id, trials, cfg)
    runs = {r.data.tags[TRIAL_TAG]: r for r in c.search_runs([experiment_id],
                                                             filter_string=f"tags.mlflow.parentRunId = '{parent}'")}
    assert {k: r.info.status for k, r in runs.items()} == {"done": "FINISHED", "raised": "FAILED", "killed": "FAILED"}
    killed = runs["killed"].data
    assert killed.tags["stopped_by"] == "error" and "ActorDiedError" in killed.tags["error"]
    assert killed.params == {"lr": "0.002"}


# ---- a tiny real search on Ray -------------------------------------------------------------------
def test_search_end_to_end(tmp_path, ray_session, mlflow_uri, source_checkpoint, caplog):
    cfg = search_config(data(tmp_path, source_checkpoint))
    with caplog.at_level(logging.INFO, logger="trainers.tune"):
        outcome = run_search(cfg)
    # the published default is the first trial, run to the end on the same seeds as every trial
    default = outcome.trials[0]
    assert default["trial_id"] == "default" and default["config"] == {"lr": 1e-3} and default["completed"]
    assert {"seed0/objective", "seed1/objective"} <= set(default["metrics"])
    assert len(outcome.trials) == 3 and all("diverged" in t for t in outcome.trials)
    assert all(1e-5 <= t["config"]["lr"] <= 1e-2 for t in outcome.trials)
    decision = outcome.decision
    assert decision["chosen"] in ("default", "searched") and decision["seeds"] == 2
    assert decision["default_objective"] == pytest.approx(default["metrics"]["objective"])
    chosen = next(t for t in outcome.trials if t["trial_id"] == decision["trial_id"])
    assert outcome.best_params == chosen["config"] and outcome.best_error == pytest.approx(
        chosen["metrics"]["objective"])
    assert (decision["chosen"] == "searched") == (
        decision["best_objective"] is not None
        and decision["default_objective"] - decision["best_objective"] > decision["margin"])
    provenance = json.loads((outcome.settings_path.parent / "validation_provenance.json").read_text())
    assert sorted(provenance) == ["seed0", "seed1"] and {p["split"] for p in provenance.values()} == {"train"}
    assert provenance["seed0"]["seed"] == 0 and provenance["seed1"]["seed"] == 1  # each seed draws its images
    record = json.loads((outcome.settings_path.parent / "search.json").read_text())
    assert [t["trial_id"] for t in record["trials"]] == [t["trial_id"] for t in outcome.trials]
    assert record["decision"] == json.loads(json.dumps(decision)) and "seed1/objective" in record["trials"][0]
    # the record carries the search config (benchmarks/search_transfer.py re-runs its trials by it)
    assert search_config(record["config"]).validation.seeds == [0, 1]
    assert record["rank_correlation"]["trials"] == sum(t["completed"] and not t["diverged"] for t in outcome.trials)

    # MLflow: one parent run, a child per trial and one for the default, nothing left RUNNING
    runs = mlflow.search_runs(experiment_names=["metatta"])
    parent = runs[runs["run_id"] == outcome.parent_run_id]
    children = runs[runs["tags.mlflow.parentRunId"] == outcome.parent_run_id]
    assert len(parent) == 1 and parent["metrics.best_objective"].iloc[0] == pytest.approx(outcome.best_error)
    assert parent["tags.chosen"].iloc[0] == decision["chosen"]
    assert len(children) == 3 and "params.lr" in children
    assert list(children.loc[children["tags.default"] == "true", "tags.tune_trial_id"]) == ["default"]
    # a trial that completed is FINISHED (even when ASHA stops it at its last report); one that
    # ASHA stopped early is KILLED with stopped_by=asha
    completed = {t["trial_id"] for t in outcome.trials if t["completed"]}
    for _, child in children.iterrows():
        if child["tags.tune_trial_id"] in completed:
            assert child["status"] == "FINISHED"
        else:
            assert child["status"] == "KILLED" and child["tags.stopped_by"] == "asha"
    # the job log has a line per trial that ended, and the default's and the decision's
    ended = [r.getMessage() for r in caplog.records if "ended)" in r.getMessage()]
    assert len(ended) == 2 and all("objective" in line for line in ended)
    assert any("the default {'lr': 0.001} -> objective" in r.getMessage() for r in caplog.records)
    assert any(f"chose the {decision['chosen']} setting" in r.getMessage() for r in caplog.records)

    # the registry says which was chosen, with the numbers
    info = json.loads((outcome.settings_path.parent / "settings" / "settings.json").read_text())
    assert info["chosen"] == decision["chosen"] and info["decision"]["margin"] == decision["margin"]
    assert info["validation"]["seed1"]["split"] == "train" and info["images_per_domain"] == 48
    assert (outcome.settings_path.parent / "settings" / "search.json").is_file()  # registered with the setting

    # best YAML: a full Tent config with the best lr
    saved = yaml.safe_load(outcome.settings_path.read_text())
    assert outcome.settings_path.name == "best_tent.yaml"
    assert saved["lr"] == pytest.approx(outcome.best_params["lr"]) and saved["optimizer"] == "adam"

    # registry: version 1 is champion; a worse second registration does not move the alias
    assert outcome.registered_version == "1" and outcome.promoted
    assert tracking.resolve_version("models:/tent_settings@champion") == "1"
    worse = tracking.register_settings("tent_settings", outcome.settings_path.parent / "settings", outcome.parent_run_id)
    assert worse == "2" and not tracking.promote_if_better("tent_settings", worse, outcome.best_error + 1)
    assert tracking.resolve_version("models:/tent_settings@champion") == "1"

    # the experiment loads the tuned settings, by path and by models:/ URI; explicit config wins
    exp = experiment_config({"methods": [{"name": "tent", "settings": str(outcome.settings_path)}]})
    assert method_config(exp.methods[0])["lr"] == pytest.approx(saved["lr"])
    exp = with_settings(experiment_config({"methods": [{"name": "bn"}]}), "tent", "models:/tent_settings@champion")
    spec = exp.methods[-1]
    assert spec.name == "tent" and method_config(spec)["lr"] == pytest.approx(saved["lr"])
    spec.config = {"lr": 0.5}
    assert method_config(spec)["lr"] == 0.5
    spec.name = "sar"
    with pytest.raises(ValueError, match="tuned for method 'tent'"):
        method_config(spec)
    with pytest.raises(ValueError, match="settings: no such file"):
        experiment_config({"methods": [{"name": "tent", "settings": str(tmp_path / "missing.yaml")}]})


def test_a_search_whose_trials_do_not_beat_the_default_by_the_margin_returns_the_default(
        tmp_path, ray_session, source_checkpoint):
    # no trial can beat the default by more than 100 points: the default is returned and says so
    cfg = search_config(data(tmp_path, source_checkpoint, num_samples=1, mlflow=False, register_as="",
                             acceptance={"k": 1.0, "min_margin": 100.0}))
    outcome = run_search(cfg)
    assert [t["trial_id"] for t in outcome.trials][0] == "default" and len(outcome.trials) == 2
    assert outcome.decision["chosen"] == "default" and outcome.decision["margin"] == 100.0
    assert outcome.best_params == {"lr": 1e-3} and outcome.registered_version is None
    text = outcome.settings_path.read_text()
    assert "the published default" in text and yaml.safe_load(text)["lr"] == 1e-3


def test_settings_that_do_not_fit_the_method_fail_before_any_work(tmp_path):
    path = tmp_path / "best_palm.yaml"
    path.write_text("eta: 0.5\nlr: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"tent\.settings .*best_palm\.yaml.*unknown field"):
        experiment_config({"methods": [{"name": "tent", "settings": str(path)}]})
    with pytest.raises(ValueError, match=r"--settings tent=.*unknown field"):
        with_settings(experiment_config({"methods": [{"name": "bn"}]}), "tent", str(path))
    path.write_text("lr: 2.0e-4\n")
    exp = experiment_config({"methods": [{"name": "tent", "settings": str(path), "config": {"steps": 2}}]})
    assert method_config(exp.methods[0]) == {"lr": 2e-4, "steps": 2}


# ---- any method can be tuned: trials build methods as experiment rows do ------------------------
@pytest.fixture
def fisher_calls(monkeypatch):
    """Every call of EATA's Fisher estimate (the regularizer ETA lacks), with the batches it got."""
    from metatta.methods import eata

    calls, real = [], eata.compute_fisher

    def spy(model, params, batches):
        batches = list(batches)
        calls.append(batches)
        return real(model, params, batches)

    monkeypatch.setattr(eata, "compute_fisher", spy)
    return calls


@pytest.mark.parametrize("method, fixed", [
    ("eata", {}),
    ("nanoadapt", {"base": "eata", "accumulation_steps": 1, "num_views": 1}),
])
def test_an_eata_trial_runs_eata_with_its_fisher(method, fixed, source_checkpoint, fisher_calls, caplog):
    space = {"d_margin": {"type": "uniform", "low": 0.1, "high": 0.5}} if method == "eata" else \
        {"dbc_momentum": {"type": "uniform", "low": 0.9, "high": 0.99}}
    cfg = search_config(data(checkpoint=source_checkpoint, method=method, method_config=fixed, space=space,
                             benchmark={"num_images": 16}, fisher_images=32,
                             validation={"corruptions": HELD_OUT, "severities": [5], "seeds": [0]},
                             acceptance={"k": 0}))
    params = {"d_margin": 0.4} if method == "eata" else {"dbc_momentum": 0.98}
    out = run_trial(cfg, params, source_checkpoint)
    assert len(fisher_calls) == 1 and sum(len(b) for b in fisher_calls[0]) == 32  # 32 clean images, batch 16
    assert "this is ETA" not in caplog.text
    assert out["final"] == 1.0 and out["images"] == 32 and 0 <= out["mean_error"] <= 100
