"""benchmarks/reproduce.py: pairing results, the tolerance, and the exit status."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from metatta.reporting import benchmark_command
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
reproduce = load_script("benchmarks/reproduce.py")


def result(method: str, mean: float, setting="continual", batch=200, images=1000, sha="abc") -> dict:
    return {"method": method, "mean_error": mean, "images_per_second": 100.0,
            "protocol": {"setting": setting, "batch_size": batch, "num_images_per_domain": images,
                         "source_checkpoint_sha256": sha}}


def table(**means) -> dict:
    return {"command": ["benchmarks/palm.py", "--num-images", "1000"],
            "tables": [{"setting": "continual", "results": [result(m, v) for m, v in means.items()]},
                       {"setting": "episodic", "results": [result("bn", 20.0, setting="episodic")]}]}


def test_within_tolerance_passes_and_beyond_fails():
    recorded = table(bn=22.49, tent=22.5)
    lines, failures = reproduce.compare(recorded, table(bn=22.55, tent=22.41), tolerance=0.1)
    assert failures == [] and len(lines) == 2 + 3
    _, failures = reproduce.compare(recorded, table(bn=22.49, tent=22.75), tolerance=0.1)
    assert len(failures) == 1 and "tent" in failures[0] and "22.75" in failures[0]


def test_missing_rows_and_another_checkpoint_fail():
    recorded = table(bn=22.5, tent=22.5)
    _, failures = reproduce.compare(recorded, table(bn=22.5), tolerance=0.1)
    assert any("only in the recorded table" in f for f in failures)
    other = copy.deepcopy(recorded)
    for r in reproduce.iter_results(other):
        r["protocol"]["source_checkpoint_sha256"] = "def"
    _, failures = reproduce.compare(recorded, other, tolerance=0.1)
    assert failures and failures[0].startswith("source checkpoint differs")


def test_duplicate_rows_are_refused():
    twice = {"results": [result("bn", 1.0), result("bn", 2.0)]}
    with pytest.raises(ValueError, match="two results"):
        reproduce.indexed(twice)


def test_main_exit_status(tmp_path, monkeypatch, capsys):
    recorded = tmp_path / "palm.json"
    recorded.write_text(json.dumps(table(bn=22.5, tent=22.5)))

    def fake_rerun(means):
        def run(command, out):
            assert command == ["benchmarks/palm.py", "--num-images", "1000"]
            path = out / "palm.json"
            path.write_text(json.dumps(table(**means)))
            return path
        return run

    monkeypatch.setattr(reproduce, "rerun", fake_rerun({"bn": 22.52, "tent": 22.5}))
    assert reproduce.main([str(recorded)]) == 0
    monkeypatch.setattr(reproduce, "rerun", fake_rerun({"bn": 23.0, "tent": 22.5}))
    assert reproduce.main([str(recorded)]) == 1
    assert "FAILED" in capsys.readouterr().err
    no_command = tmp_path / "old.json"
    no_command.write_text(json.dumps([{"results": [result("bn", 1.0)]}]))
    assert reproduce.main([str(no_command)]) == 2


def test_recorded_command_drops_the_output_folder():
    assert benchmark_command("/x/benchmarks/palm.py", ["--num-images", "10", "--out", "/tmp/o", "--out=/y"]) == \
        ["benchmarks/palm.py", "--num-images", "10"]
    with pytest.raises(ValueError, match="not a benchmarks/ script"):
        reproduce.rerun(["rm", "-rf", "/"], Path("."))


@pytest.mark.slow
def test_a_real_table_reproduces(tmp_path):
    """A small PALM-benchmark table (cached source model and benchmark files) re-runs within 0.1."""
    from metatta.paths import cache_root

    if not (cache_root() / "models" / "resnet_fmnist.pt").exists():
        pytest.skip("the cached source model is not trained here")
    import subprocess
    import sys

    subprocess.run([sys.executable, "benchmarks/palm.py", "--num-images", "40", "--settings", "continual",
                    "--methods", "bn", "tent", "palm", "--out", str(tmp_path)], cwd=ROOT, check=True)
    assert reproduce.main([str(tmp_path / "palm_n40_continual.json")]) == 0


def test_results_of_different_stream_seeds_are_paired_by_seed():
    def seeded(seed: int, mean: float) -> dict:
        r = result("palm", mean)
        r["protocol"]["seed"] = seed
        return r

    recorded = {"tables": [{"results": [seeded(0, 21.0), seeded(1, 21.4)]}]}
    assert len(reproduce.indexed(recorded)) == 2
    _, failures = reproduce.compare(recorded, {"tables": [{"results": [seeded(1, 21.4), seeded(0, 21.0)]}]}, 0.1)
    assert failures == []
    _, failures = reproduce.compare(recorded, {"tables": [{"results": [seeded(0, 21.4), seeded(1, 21.0)]}]}, 0.1)
    assert len(failures) == 2
