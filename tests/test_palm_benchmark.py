"""benchmarks/palm.py: the table over stream seeds."""
from __future__ import annotations

import statistics

import pytest

from metatta.evaluation import Result
from repo_scripts import load_script

palm_benchmark = load_script("benchmarks/palm.py")


def result(method: str, mean: float) -> Result:
    return Result(method=method, domain_errors={"fog-5": mean}, mean_error=mean, ece=0.0, images_per_second=1.0,
                  peak_memory_mb=0.0, num_images=10, adapted_parameters=0, error_over_stream=[mean],
                  batch_domains=["fog-5"], protocol={})


def test_seeds_table_gives_each_seed_then_mean_and_sample_std():
    runs = {0: [result("law", 21.0), result("palm", 20.0)], 3: [result("law", 22.0), result("palm", 20.5)]}
    lines = palm_benchmark.seeds_table(runs).splitlines()
    assert lines[0] == "| method | seed 0 | seed 3 | mean | std |"
    assert lines[2] == f"| law | 21.00 | 22.00 | 21.50 | {statistics.stdev([21.0, 22.0]):.2f} |"
    assert lines[3].startswith("| palm | 20.00 | 20.50 | 20.25 | 0.35 |")


def test_seeds_must_be_integers():
    with pytest.raises(SystemExit):
        palm_benchmark.main(["--seeds", "one"])


def test_palm_row_parses_fields_as_yaml_and_refuses_a_field_without_a_value():
    import argparse

    parser = argparse.ArgumentParser()
    row = palm_benchmark.palm_row("palm (x)", ["lr=1e-3", "entropy_margin_scale=absolute", "betas=[0.8, 0.9]"], parser)
    assert row == {"name": "palm", "label": "palm (x)",
                   "config": {"lr": 1e-3, "entropy_margin_scale": "absolute", "betas": [0.8, 0.9]}}
    with pytest.raises(SystemExit):
        palm_benchmark.palm_row("palm (x)", ["lr"], parser)
