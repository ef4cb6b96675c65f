import json
import os
import subprocess
import sys

import pytest
import torch

from metatta import tracking


def write_adapter(directory, value):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.full((3,), float(value))}, directory / tracking.ADAPTER_WEIGHTS)
    (directory / tracking.ADAPTER_CONFIG).write_text(json.dumps({"kind": "test", "value": value}))
    return directory


def test_register_alias_download_round_trip(tmp_path, mlflow_uri):
    versions = []
    for value in (1, 2, 3):
        with tracking.start_run(f"train-{value}", experiment="t") as run:
            versions.append(tracking.register_adapter("toy", write_adapter(tmp_path / f"a{value}", value), run.info.run_id))
    assert versions == ["1", "2", "3"]
    assert tracking.promote_if_better("toy", "1", validation_error=20.0)
    assert not tracking.promote_if_better("toy", "2", validation_error=25.0)  # worse: alias stays
    assert tracking.resolve_version("models:/toy@champion") == "1"
    assert tracking.promote_if_better("toy", "3", validation_error=10.0)
    path = tracking.download_adapter("models:/toy@champion", tmp_path / "dl")
    state, config = tracking.load_adapter_files(path)
    assert config["value"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))
    state2, _ = tracking.load_adapter_files(tracking.download_adapter("models:/toy/2", tmp_path / "dl2"))
    assert torch.equal(state2["w"], torch.full((3,), 2.0))


def test_artifacts_live_beside_the_database(tmp_path, mlflow_uri, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # Tune changes the working directory of each trial
    with tracking.start_run("r", experiment="t2") as run:
        tracking.register_adapter("toy2", write_adapter(tmp_path / "a", 1), run.info.run_id)
    assert not (elsewhere / "mlruns").exists()
    assert (tmp_path / "mlartifacts").is_dir()


def test_uri_and_adapter_errors(tmp_path, mlflow_uri):
    with pytest.raises(ValueError, match="models:/"):
        tracking.parse_model_uri("runs:/abc")
    with pytest.raises(ValueError, match="version must be a number"):
        tracking.parse_model_uri("models:/x/latest")
    assert tracking.parse_model_uri("models:/mgg@champion") == ("mgg", None, "champion")
    with pytest.raises(LookupError, match="no registered model 'nothing'"):
        tracking.resolve_version("models:/nothing@champion")
    (tmp_path / "empty").mkdir()
    with tracking.start_run("r", experiment="t3") as run:
        with pytest.raises(FileNotFoundError, match="weights.pt"):
            tracking.register_adapter("toy3", tmp_path / "empty", run.info.run_id)
        tracking.register_adapter("toy3", write_adapter(tmp_path / "a3", 1), run.info.run_id)
    with pytest.raises(tracking.NotRegistered, match="no version of model 'toy3' has alias 'champion'"):
        tracking.resolve_version("models:/toy3@champion")
    with pytest.raises(tracking.NotRegistered, match="has no version 7"):
        tracking.resolve_version("models:/toy3/7")


def test_flatten_nested_params():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_promotion_ties_keep_the_incumbent(tmp_path, mlflow_uri):
    """Lower validation error wins at the recorded precision (6 decimals); a tie keeps the
    version that holds the alias; a non-finite error never wins; each decision is tagged."""
    errors = [23.828125, 23.828125, 23.82812549, float("nan"), 23.828124]
    with tracking.start_run("train", experiment="ties") as run:
        versions = [tracking.register_adapter("tie", write_adapter(tmp_path / f"a{i}", i), run.info.run_id)
                    for i in range(len(errors))]
    moved = [tracking.promote_if_better("tie", v, e) for v, e in zip(versions, errors)]
    assert moved == [True, False, False, False, True]
    assert tracking.resolve_version("models:/tie@champion") == "5"
    tags = {v: tracking.client().get_model_version("tie", v).tags[tracking.PROMOTION_TAG] for v in versions}
    assert tags["2"] == "not promoted: ties champion v1 at 23.828125 (a tie keeps the incumbent)"
    assert tags["3"].startswith("not promoted: ties champion v1")  # equal once recorded at 6 decimals
    assert tags["4"] == "not promoted: validation error nan is not finite"
    assert tags["5"] == "champion: 23.828124 beats v1 (23.828125)"
    assert tags["1"] == "champion: first version with a validation error"


def test_a_run_left_running_by_a_dead_driver_is_closed_by_the_next_start(mlflow_uri):
    # a driver that opens a run and dies without ending it (as a SIGKILLed one does)
    code = ("import os; from metatta import tracking; cm = tracking.start_run('dies'); run = cm.__enter__(); "
            "print(run.info.run_id, flush=True); os._exit(0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri})
    orphan = done.stdout.split()[-1]
    c = tracking.client()
    assert c.get_run(orphan).info.status == "RUNNING"
    with tracking.start_run("alive") as alive:
        with tracking.start_run("next-in-this-process", nested=True):
            pass
        assert c.get_run(alive.info.run_id).info.status == "RUNNING"  # its owner (this process) lives
    run = c.get_run(orphan)
    assert run.info.status == "KILLED" and "pid" in run.data.tags["metatta.closed_by"]
    with tracking.start_run("again"):
        pass  # nothing left to close; the finished runs stay FINISHED
    assert c.get_run(alive.info.run_id).info.status == "FINISHED"
