"""benchmarks/methods.py: the method list it runs and the summary table, on fake Results (no run)."""
from __future__ import annotations

import json

import pytest

from metatta.evaluation import Result
from metatta.methods import available_methods
from repo_scripts import load_script

methods_benchmark = load_script("benchmarks/methods.py")


def result(method: str, mean: float, *, ece=5.0, speed=100.0, memory=10.0, params=1000) -> Result:
    return Result(method=method, domain_errors={"fog-5": mean}, mean_error=mean, ece=ece, images_per_second=speed,
                  peak_memory_mb=memory, num_images=10, adapted_parameters=params, error_over_stream=[mean],
                  batch_domains=["fog-5"], protocol={})


def test_every_registered_method_is_run_or_skipped_with_a_reason():
    rows, skipped = methods_benchmark.method_rows(available_methods(), adapters={})
    run = {row["name"] for row in rows}
    assert run | set(skipped) == set(available_methods())
    assert not run & set(skipped)
    assert set(skipped) == {"mgtta", "cta", "ttt"}
    assert all("adapter" in why for why in skipped.values())


def test_adapter_methods_run_when_given_an_adapter_and_plugins_run_over_tent():
    rows, skipped = methods_benchmark.method_rows(["cta", "delta", "nanoadapt", "tent"],
                                                  adapters={"cta": "models:/cta@champion"})
    assert skipped == {}
    by_name = {row["name"]: row for row in rows}
    assert by_name["cta"]["adapter"] == "models:/cta@champion"
    assert by_name["delta"] == {"name": "delta", "label": "tent+delta", "config": {"base": "tent"}}
    assert by_name["nanoadapt"]["label"] == "tent+nanoadapt"


def test_continual_family_is_registered():
    assert set(methods_benchmark.CONTINUAL_FAMILY) <= set(available_methods())


def test_summary_table_sorts_by_first_run_and_fills_missing_runs():
    runs = {"continual b200, n100": [result("tent", 22.0, speed=400.0, params=2000), result("memo", 40.0)],
            "episodic b64, n100": [result("tent", 25.0, memory=30.0, params=2000), result("memo", 24.0)],
            "continual b200, n10000": [result("tent", 18.0)]}
    lines = methods_benchmark.summary_table(runs).splitlines()
    assert lines[0] == ("| method | error continual b200, n100 | error episodic b64, n100 | error continual b200, n10000 "
                        "| ECE continual b200, n100 | img/s continual b200, n100 | peak MB | params adapted |")
    # best per run in bold; peak memory and parameters: the largest over runs
    assert lines[2] == "| tent | **22.0** | 25.0 | 18.0 | 5.0 | 400 | 30 | 2,000 |"
    assert lines[3] == "| memo | 40.0 | **24.0** | – | 5.0 | 100 | 10 | 1,000 |"


def test_summary_table_refuses_no_runs():
    with pytest.raises(ValueError, match="no runs"):
        methods_benchmark.summary_table({})


def test_run_spec_parsing():
    assert methods_benchmark.parse_run("episodic:16") == ("episodic", 16, None)
    assert methods_benchmark.parse_run("continual:200:10000") == ("continual", 200, 10000)
    with pytest.raises(ValueError, match="--runs"):
        methods_benchmark.parse_run("episodic")


def record(setting: str, results: list[Result], seconds: float = 10.0) -> dict:
    return {"command": [], "skipped": {}, "tables": [{"setting": setting, "batch_size": 200, "num_images": 100,
                                                      "seconds": seconds, "results": [r.to_dict() for r in results]}]}


def test_combine_joins_the_runs_of_separate_processes(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(record("continual", [result("tent", 22.0)], seconds=5.0)))
    (tmp_path / "b.json").write_text(json.dumps(record("continual", [result("rmt", 19.0)], seconds=7.0)))
    methods_benchmark.main(["--out", str(tmp_path), "--combine", "a", "b", "--name", "joined"])
    joined = json.loads((tmp_path / "joined.json").read_text())
    (table,) = joined["tables"]
    assert [r["method"] for r in table["results"]] == ["tent", "rmt"]
    assert table["seconds"] == 12.0
    summary = (tmp_path / "joined.md").read_text()
    assert summary.index("| rmt | **19.0**") < summary.index("| tent | 22.0")
    assert "(12 s, summed over 2 processes)" in summary


def test_combine_refuses_a_method_measured_twice_and_missing_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(record("continual", [result("tent", 22.0)])))
    with pytest.raises(ValueError, match=r"\['tent'\] measured twice"):
        methods_benchmark.main(["--out", str(tmp_path), "--combine", "a", "a", "--name", "joined"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        methods_benchmark.main(["--out", str(tmp_path), "--combine", "a", "nope", "--name", "joined"])
