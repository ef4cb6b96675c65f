"""benchmarks/guard_cost.py: the timing loop and the ratio table, on a fake method and fake rounds (no run)."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from repo_scripts import load_script

guard_cost = load_script("benchmarks/guard_cost.py")


def test_timed_run_skips_the_warm_up_batch():
    seen = []
    batches = [SimpleNamespace(x=torch.full((2, 1), float(i))) for i in range(4)]
    wall, cpu = guard_cost.timed_run(lambda x: seen.append(int(x[0, 0])), batches)
    assert seen == [0, 1, 2, 3] and wall >= 0 and cpu >= 0


def test_report_gives_median_and_range_of_the_ratio_to_no_guard():
    rounds = {"none": [{"wall_img_s": 100.0, "cpu_img_s": 100.0}] * 3,
              "watch (default)": [{"wall_img_s": 100.0, "cpu_img_s": v} for v in (99.0, 100.0, 101.0)],
              "guard (reset)": [{"wall_img_s": 90.0, "cpu_img_s": v, "guard_share": g}
                                for v, g in ((88.0, 0.05), (92.0, 0.06), (95.0, 0.08))]}
    ratios = {v: {clock: [r[clock] / b[clock] for r, b in zip(runs, rounds["none"])]
                  for clock in ("wall_img_s", "cpu_img_s")} for v, runs in rounds.items() if v != "none"}
    args = argparse.Namespace(seed=0, batch_size=64, batches=30, rounds=3)
    text = guard_cost.report({"tent": {"rounds": rounds, "ratios": ratios}}, args, ["--rounds", "3"])
    row = [line for line in text.splitlines() if line.startswith("| tent")][0]
    assert row == "| tent | 100 | 6.0% (8.0%) | 1.000 (0.990-1.010) | 0.920 (0.880-0.950) | 1.000 | 0.900 |"
    assert "benchmarks/guard_cost.py --rounds 3" in text


def test_guard_timer_counts_the_time_inside_the_guard_only():
    calls = []
    method = SimpleNamespace(guard=SimpleNamespace(observe=lambda x, logits: calls.append(1) or False))
    timer = guard_cost.GuardTimer(method)
    assert method.guard.observe(None, None) is False and calls == [1] and timer.seconds >= 0.0
