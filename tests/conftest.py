import os

import pytest

# Ray's token auth would need a login step; tests run an unauthenticated local cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """An isolated SQLite tracking store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def module_mlflow_uri(tmp_path_factory):
    """One SQLite tracking store for a whole test module (creating one costs seconds of
    migrations); its tests must use distinct experiment and model names."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": a fresh local instance even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
