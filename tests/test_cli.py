"""Launcher error handling: a user error is one `error: ...` line on stderr and exit
status 2 (no traceback unless --debug), and dotted overrides go anywhere.

Only paths that fail before any data or training are exercised. Scripts are run
as subprocesses where that is cheap (no torch import before the error); errors
found after the config is checked against torch-importing modules run in-process
through `run_main`, so torch is imported once.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metatta.cli import USER_ERROR_STATUS, UserError, experiment_parser, parse_experiment, run_main
from metatta.config import ConfigError, load_config
from repo_scripts import load_script

ROOT = Path(__file__).parents[1]
SCRIPTS = ["evaluate", "train_source", "train_mgg", "eval_worker", "demo"]


def _env(tmp_path):
    env = dict(os.environ, METATTA_CACHE=str(tmp_path / "cache"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("METATTA_DEBUG", None)
    return env


def run_script(name, *args, tmp_path, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "launch" / f"{name}.py"), *map(str, args)], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *fragments):
    assert proc.returncode == USER_ERROR_STATUS, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run_in_process(name, argv, capsys, monkeypatch, tmp_path):
    for key, value in _env(tmp_path).items():
        if key in ("METATTA_CACHE", "MLFLOW_TRACKING_URI"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("METATTA_DEBUG", raising=False)
    status = run_main(load_script(f"launch/{name}.py").main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("error: ")]
    return status, err


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstream:\n  batch_size: [1, 2\n  seed: 0\n")
    return path


# ---- config loading ----------------------------------------------------------------------
def test_yaml_syntax_error_names_file_line_and_column(bad_yaml, tmp_path):
    with pytest.raises(ConfigError, match=rf"{bad_yaml.name}:4:\d+: YAML syntax error") as info:
        load_config(bad_yaml)
    assert "line 3" in str(info.value)  # where the unclosed list began
    (tmp_path / "indent.yaml").write_text("a: 1\n  b: 2\n")
    with pytest.raises(ConfigError, match=r"indent.yaml:2:4: YAML syntax error: mapping values"):
        load_config(tmp_path / "indent.yaml")


def test_override_errors_name_the_override(tmp_path):
    with pytest.raises(ConfigError, match="stream.batch_size.x.*not a mapping"):
        load_config(None, ["stream.batch_size=4", "stream.batch_size.x=1"])
    with pytest.raises(ConfigError, match=r"override 'x=\[1,': value is not valid YAML"):
        load_config(None, ["x=[1,"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["a..b=1"])


# ---- run_main ----------------------------------------------------------------------------
@pytest.mark.parametrize("exc, fragment", [
    (ConfigError("stream.batch_size: expected an integer"), "stream.batch_size"),
    (ValueError("benchmark.name: unknown benchmark 'x'"), "benchmark.name"),
    (UserError("--adapter: no such file"), "--adapter"),
    (FileNotFoundError(2, "No such file or directory", "/nope.pt"), "/nope.pt: No such file or directory"),
    (PermissionError(13, "Permission denied", "/root/out"), "/root/out: Permission denied"),
])
def test_run_main_turns_user_errors_into_one_line(exc, fragment, capsys, monkeypatch):
    monkeypatch.delenv("METATTA_DEBUG", raising=False)

    def main(argv=None):
        raise exc

    assert run_main(main, []) == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err


def test_run_main_keeps_tracebacks_for_bugs_and_with_debug(monkeypatch):
    monkeypatch.delenv("METATTA_DEBUG", raising=False)

    def bug(argv=None):
        raise RuntimeError("a bug")

    def user(argv=None):
        raise ConfigError("bad")

    with pytest.raises(RuntimeError):
        run_main(bug, [])
    with pytest.raises(ConfigError):
        run_main(user, ["--debug"])
    monkeypatch.setenv("METATTA_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_main(user, [])
    assert run_main(lambda argv=None: None, []) == 0


def test_overrides_go_before_between_and_after_options(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("a: 1\nb: {c: 2}\n")
    parser = experiment_parser("t")
    parser.add_argument("--adapter")
    for argv in (["--config", config, "--adapter", "models:/mgg@champion", "a=5", "b.c=6"],
                 ["a=5", "--config", config, "b.c=6", "--adapter", "models:/mgg@champion"],
                 ["--adapter", "models:/mgg@champion", "a=5", "--config", config, "b.c=6", "--device", "cpu"]):
        args, data = parse_experiment(parser, [str(a) for a in argv])
        assert args.adapter == "models:/mgg@champion"
        assert data["a"] == 5 and data["b"] == {"c": 6}


# ---- the launch scripts as subprocesses (errors before torch is imported) ----------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_config_file(name, tmp_path):
    proc = run_script(name, "--config", tmp_path / "nope.yaml", "stream.batch_size=8", tmp_path=tmp_path)
    assert_user_error(proc, "config file not found", "nope.yaml")


def test_yaml_syntax_error_and_bad_override_from_the_command_line(bad_yaml, tmp_path):
    assert_user_error(run_script("train_mgg", "--config", bad_yaml, tmp_path=tmp_path), "bad.yaml:4:", "YAML syntax")
    assert_user_error(run_script("evaluate", "seed", tmp_path=tmp_path), "override 'seed'")
    assert_user_error(run_script("train_source", "--log-level", "loud", tmp_path=tmp_path), "--log-level")
    assert_user_error(run_script("eval_worker", "--once", "--bogus", tmp_path=tmp_path), "--bogus")


def test_debug_shows_the_traceback(tmp_path):
    proc = run_script("evaluate", "--debug", "--config", tmp_path / "nope.yaml", tmp_path=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_evaluate_overrides_after_an_option(tmp_path):
    # The example: overrides after `--adapter` used to be "unrecognized arguments".
    # A missing adapter directory stops the run right after the config is parsed and checked.
    proc = run_script("evaluate", "--config", "configs/fmnist_c/mgtta.yaml", "--adapter", tmp_path / "no_adapter",
                      "benchmark.num_images=397", "stream.batch_size=8", tmp_path=tmp_path, timeout=300)
    assert_user_error(proc, "--adapter", "no_adapter")


# ---- checked configs, in-process (torch imported once) -----------------------------------
@pytest.mark.parametrize("name, argv, fragments", [
    ("evaluate", ["--config", "configs/fmnist_c/baselines.yaml", "methods.0.name=nosuch"], ["nosuch"]),
    ("evaluate", ["--config", "configs/fmnist_c/baselines.yaml", "stream.bogus=1", "--device", "cpu"],
     ["experiment.stream", "bogus"]),
    ("evaluate", ["--device", "cpu", "source.checkpoint=/nope/source.pt"], ["source.checkpoint", "/nope/source.pt"]),
    ("evaluate", ["output_dir=/proc/metatta_out"], ["output_dir", "/proc/metatta_out"]),
    ("train_source", ["bogus=1"], ["train_source", "bogus"]),
    ("train_source", ["output=/proc/nope/s.pt", "--device", "cpu"], ["output", "/proc/nope"]),
    ("train_mgg", ["--no-ray", "source_checkpoint=/nope/source.pt"], ["source_checkpoint", "/nope/source.pt"]),
    ("train_mgg", ["epochs=0", "--no-ray"], ["epochs"]),
    ("eval_worker", ["--once", "stream.batch_size=x"], ["stream.batch_size"]),
])
def test_checked_config_errors(name, argv, fragments, capsys, monkeypatch, tmp_path):
    status, err = run_in_process(name, argv, capsys, monkeypatch, tmp_path)
    assert status == USER_ERROR_STATUS and len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
