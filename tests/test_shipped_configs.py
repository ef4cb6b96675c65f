"""Every shipped experiment config (configs/<benchmark>/*.yaml with `methods:`) builds: a broken field,
an unknown method or a bad stream option is found here, not by the user's first run."""
from pathlib import Path

import pytest

from metatta.config import load_config
from metatta.experiment import experiment_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if "methods" in load_config(p))


def test_there_are_experiment_configs():
    assert any(p.name == "baselines.yaml" for p in EXPERIMENTS)
    assert any(p.name == "lifelong_ccc.yaml" for p in EXPERIMENTS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_shipped_experiment_config_builds(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # settings files are named relative to the checkout, as the launchers run
    cfg = experiment_config(load_config(path))
    assert cfg.methods
