"""Registered models that do not exist, and damaged or hostile adapter/settings files, stop the
launchers with one `error: ...` line on stderr and exit status 2, before any work, and a hostile
file never runs code."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import evaluate
from metatta import tracking
from metatta.cli import run_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def mlflow_uri(module_mlflow_uri):  # one (empty) store for the module
    return module_mlflow_uri


class Payload:
    """Pickles as a call of os.system: what a malicious weights file carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_registered_model_as_adapter(mlflow_uri, capsys):
    assert run_main(evaluate.main, ["--adapter", "models:/nope@champion"]) == 2
    line = one_error_line(capsys)
    assert "models:/nope@champion: no registered model 'nope'" in line


def test_missing_registered_model_in_a_config_row(mlflow_uri, capsys):
    """configs/fmnist_c/cta_eval.yaml before TTT and CTA were trained: refused before any data or model work."""
    assert run_main(evaluate.main, ["--config", str(REPO / "configs/fmnist_c/cta_eval.yaml")]) == 2
    assert "models:/ttt@champion: no registered model 'ttt'" in one_error_line(capsys)


def test_hostile_adapter_weights_never_run(tmp_path, mlflow_uri, capsys):
    marker = tmp_path / "pwned"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    torch.save({"w": Payload(marker)}, adapter / tracking.ADAPTER_WEIGHTS)
    (adapter / tracking.ADAPTER_CONFIG).write_text('{"kind": "mgg"}')
    assert run_main(evaluate.main, ["--adapter", str(adapter), f"output_dir={tmp_path / 'out'}"]) == 2
    line = one_error_line(capsys)
    assert f"{adapter / tracking.ADAPTER_WEIGHTS}: not a readable weights file" in line
    assert not marker.exists()


def test_truncated_adapter_weights(tmp_path, mlflow_uri, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    torch.save({"w": torch.zeros(1000)}, adapter / tracking.ADAPTER_WEIGHTS)
    data = (adapter / tracking.ADAPTER_WEIGHTS).read_bytes()
    (adapter / tracking.ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    (adapter / tracking.ADAPTER_CONFIG).write_text('{"kind": "mgg"}')
    assert run_main(evaluate.main, ["--adapter", str(adapter), f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"{adapter / tracking.ADAPTER_WEIGHTS}: not a readable weights file" in one_error_line(capsys)


def test_hostile_settings_yaml_never_runs(tmp_path, mlflow_uri, capsys):
    marker = tmp_path / "pwned"
    settings = tmp_path / "tent.yaml"
    settings.write_text(f'lr: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert run_main(evaluate.main, ["--settings", f"tent={settings}"]) == 2
    line = one_error_line(capsys)
    assert str(settings) in line and "not a plain YAML file" in line
    assert not marker.exists()


@pytest.mark.slow  # a fresh interpreter importing torch and mlflow: ~20 s on a loaded 2-core machine
def test_the_launcher_process_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), "--adapter", "models:/nope@champion",
                           "--config", str(REPO / "configs/fmnist_c/baselines.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: models:/nope@champion: no registered model")
    assert "Traceback" not in proc.stderr
