"""Relative output paths under `ray job submit` (issue #23.4): resolved against $METATTA_OUTPUT_ROOT,
or refused naming the field; a plain run keeps them relative to the current directory."""
import pytest

from launch import evaluate, train_cta, train_mgg, tune, tune_nanoadapt, tune_palm
from metatta import tracking
from metatta.cli import UserError, run_main
from metatta.output_paths import OUTPUT_ROOT_ENV, RAY_JOB_ENV, in_ray_job, resolve_output_path


@pytest.fixture
def ray_job(monkeypatch):
    """The environment Ray's job supervisor gives a submitted entrypoint."""
    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}')
    monkeypatch.delenv(OUTPUT_ROOT_ENV, raising=False)


def test_plain_runs_keep_relative_paths(monkeypatch, tmp_path):
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.delenv(OUTPUT_ROOT_ENV, raising=False)
    assert not in_ray_job()
    assert resolve_output_path("outputs/cta", "checkpoint_dir") == "outputs/cta"
    assert resolve_output_path(tmp_path / "x", "output_dir") == str(tmp_path / "x")
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(tmp_path))
    assert resolve_output_path("outputs", "output_dir") == str(tmp_path / "outputs")


def test_a_ray_job_refuses_relative_paths_or_resolves_them_against_the_output_root(ray_job, monkeypatch, tmp_path):
    assert in_ray_job()
    with pytest.raises(UserError, match=r"checkpoint_dir: relative path 'outputs/cta' under `ray job submit`.*"
                                        r"METATTA_OUTPUT_ROOT"):
        resolve_output_path("outputs/cta", "checkpoint_dir")
    assert resolve_output_path(str(tmp_path / "abs"), "checkpoint_dir") == str(tmp_path / "abs")
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(tmp_path))
    assert resolve_output_path("outputs/cta", "checkpoint_dir") == str(tmp_path / "outputs" / "cta")
    monkeypatch.setenv(OUTPUT_ROOT_ENV, "relative/root")
    with pytest.raises(UserError, match="METATTA_OUTPUT_ROOT must be an absolute directory"):
        resolve_output_path("outputs", "output_dir")


def test_the_default_tracking_store_follows_the_same_rule(ray_job, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match=r"MLFLOW_TRACKING_URI \(default: ./mlflow.db\): relative path"):
        tracking.tracking_uri()
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize("launcher, argv, field", [
    (evaluate, [], "output_dir"),
    (train_mgg, ["--no-ray"], "checkpoint_dir"),
    (train_cta, ["--no-ray"], "checkpoint_dir"),
    (tune, [], "output_dir"),
    (tune_palm, [], "output_dir"),
    (tune_nanoadapt, [], "output_dir"),
])
def test_launchers_refuse_before_any_work(ray_job, monkeypatch, tmp_path, capsys, launcher, argv, field):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run_main(launcher.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {field}: relative path") and "ray job submit" in err, err
