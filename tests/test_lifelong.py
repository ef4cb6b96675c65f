"""Windowed evaluation: error per window, the summary table, incremental JSONL results, and a
killed run that resumes without redoing finished windows and ends with the same windows."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from metatta.data.streams import build_stream
from metatta.data.types import DomainData
from metatta.evaluation import evaluate
from metatta.lifelong import (choose_guard_quantile, choose_guard_thresholds, evaluate_windowed, guard_signals,
                              guard_targets, guarded_score, read_windows, summarize, summary_table, targets_table)
from metatta.methods.guard import reference_model
from metatta.methods import build_method


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3))


def stream(batch_size=16):
    rng = np.random.default_rng(0)
    domains = [DomainData(c, 5, rng.integers(0, 256, (96, 8, 8, 1), dtype=np.uint8),
                          rng.integers(0, 3, 96).astype(np.int64)) for c in ("fog", "snow", "frost")]
    return build_stream(domains, "continual", batch_size, seed=0)


def tent():
    return build_method("tent", tiny_model(), {"lr": 0.05}, batch_size=16)


class Killed(Exception):
    pass


class KillAt:
    """The stream with random access (as the ccc stream), dying when batch `at` is requested
    (a kill mid-window); records the batches served."""

    def __init__(self, inner, at=None):
        self.batches, self.at, self.served = list(inner), at, []
        self.setting, self.resets_per_domain, self.batch_size = inner.setting, False, inner.batch_size
        self.seed = inner.seed

    def __len__(self):
        return len(self.batches)

    def batch(self, i):
        if i == self.at:
            raise Killed(i)
        self.served.append(i)
        return self.batches[i]


def test_windows_cover_the_stream_and_match_a_plain_evaluation(tmp_path):
    s = stream()
    windows = evaluate_windowed(tent(), s, tmp_path / "tent.jsonl", window=64)
    assert [w["window"] for w in windows] == [0, 1, 2, 3, 4] and sum(w["num_images"] for w in windows) == 288
    assert [w["num_images"] for w in windows] == [64, 64, 64, 64, 32]  # the last window holds the rest
    header, stored = read_windows(tmp_path / "tent.jsonl")
    assert stored == windows and header["window"] == 64 and header["method"] == "tent"
    plain = evaluate(tent(), stream(), progress=False)  # one pass, per-batch errors
    errors = np.asarray(plain.error_over_stream)
    assert [w["error"] for w in windows] == pytest.approx([errors[i:i + 4].mean() for i in range(0, 18, 4)])
    assert len(list(tmp_path.glob("tent.jsonl.state-*.pt"))) == 1  # only the last window's state is kept


def test_killed_run_resumes_without_redoing_windows_and_gives_the_same_windows(tmp_path):
    reference = evaluate_windowed(tent(), stream(), tmp_path / "reference.jsonl", window=64)
    path = tmp_path / "run.jsonl"
    dying = KillAt(stream(), at=9)  # in window 2 (batches 8-11)
    with pytest.raises(Killed):
        evaluate_windowed(tent(), dying, path, window=64)
    assert [w["window"] for w in read_windows(path)[1]] == [0, 1]
    with path.open("a") as f:
        f.write('{"window": 2, "err')  # a line torn by the kill
    resumed = KillAt(stream())
    windows = evaluate_windowed(tent(), resumed, path, window=64)  # a fresh method: its state comes from disk
    assert min(resumed.served) == 8  # windows 0 and 1 were not redone
    assert [w["error"] for w in windows] == [w["error"] for w in reference]
    assert read_windows(path)[1] == windows
    again = KillAt(stream())
    assert evaluate_windowed(tent(), again, path, window=64) == windows and again.served == []  # all done


def test_another_run_in_the_same_file_is_refused(tmp_path):
    path = tmp_path / "run.jsonl"
    evaluate_windowed(tent(), stream(), path, window=64)
    with pytest.raises(ValueError, match="holds another run"):
        evaluate_windowed(tent(), stream(), path, window=32)
    path.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(ValueError, match="not a windowed-evaluation results file"):
        evaluate_windowed(tent(), stream(), path, window=64)


@pytest.mark.parametrize("window, message", [(0, "window must be an integer >= 1"), (24, "multiple of the batch"),
                                             (True, "window must be an integer")])
def test_bad_windows_refused(tmp_path, window, message):
    with pytest.raises(ValueError, match=message):
        evaluate_windowed(tent(), stream(), tmp_path / "x.jsonl", window=window)


def test_summary_counts_windows_above_bn_and_source():
    rows = summarize({"source": [30, 40, 50], "bn": [20, 25, 30], "tent": [19, 26, 60]})
    tent_row = rows[2]
    assert tent_row["mean_error"] == pytest.approx(35) and tent_row["worst_window"] == 60
    assert tent_row["windows_above_bn"] == 2 and tent_row["windows_above_source"] == 1
    assert rows[0]["windows_above_source"] == 0
    table = summary_table(rows)
    assert "| tent | 3 | 35.00 | 60.00 | 2/3 | 1/3 |" in table
    assert summarize({"tent": [1, 2]})[0]["windows_above_bn"] is None
    short = summarize({"bn": [1, 2, 3], "sar": [2, 1]})[1]  # a slow method's shorter stream: its own windows
    assert short["windows"] == 2 and short["windows_above_bn"] == 1 and short["mean_error"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="reference 'bn' has 1 windows"):
        summarize({"bn": [1], "tent": [1, 2]})


def test_guard_targets_per_window_against_bn_plus_margin_source_and_the_unguarded_mean():
    errors = {"source": [30, 30, 30], "bn": [20, 20, 20], "tent": [20, 25, 40], "tent+guard": [20.5, 20.4, 21],
              "eata": [20, 20, 20], "eata+guard": [20, 21], "rdumb": [25, 31, 29], "sar": [50, 50, 50]}
    targets = {t["method"]: t for t in guard_targets(errors)}
    assert set(targets) == {"tent+guard", "eata+guard", "rdumb"}  # unguarded rows other than RDumb: no target
    tent = targets["tent+guard"]
    assert tent["windows_above_bn_plus_margin"] == 1 and tent["windows_not_below_source"] == 0
    assert tent["mean_minus_unguarded"] == pytest.approx((61.9 - 85) / 3) and tent["met"] is False
    eata = targets["eata+guard"]  # mean over its 2 windows vs EATA's first 2: +0.5, so not met
    assert eata["windows"] == 2 and eata["mean_minus_unguarded"] == pytest.approx(0.5) and eata["met"] is False
    assert targets["rdumb"]["windows_not_below_source"] == 1 and targets["rdumb"]["met"] is False
    assert guard_targets({"tent+guard": [1.0], "tent": [2.0]})[0]["met"] is None  # no BN, no Source: unknown
    ok = guard_targets({"source": [30], "bn": [20], "tent": [21], "tent+guard": [20.5]})[0]
    assert ok["met"] is True
    table = targets_table(list(targets.values()))
    assert "| tent+guard | 1/3 | 0/3 | -7.70 | no |" in table and "| rdumb | (not guarded) | 1/3 | - | no |" in table


def test_a_resumed_run_keeps_the_guard_and_the_reset_schedule_where_they_were(tmp_path):
    config = {"lr": 0.05, "reset_every": 5,
              "guard": {"action": "reset", "min_marginal_entropy": 0.99, "min_agreement": 0.95, "window": 2,
                        "check_every": 1}}

    def worn():
        return build_method("tent", tiny_model(), config, batch_size=16)

    def comparable(windows):
        return [{k: v for k, v in w.items() if k != "images_per_second"} for w in windows]

    reference = evaluate_windowed(worn(), stream(), tmp_path / "reference.jsonl", window=64)
    assert reference[-1]["scheduled_resets"] > 0 and reference[-1]["collapse_events"] > 0  # both act
    path = tmp_path / "run.jsonl"
    with pytest.raises(Killed):
        evaluate_windowed(worn(), KillAt(stream(), at=13), path, window=64)
    assert comparable(evaluate_windowed(worn(), KillAt(stream()), path, window=64)) == comparable(reference)


def test_guard_thresholds_never_fire_on_a_healthy_stretch_and_do_on_a_collapse():

    healthy = {"agreement": np.array([0.9, 0.8, 0.95, 0.9, 0.85, 0.9]),
               "marginal_entropy": np.array([0.9, 0.95, 0.9, 0.92, 0.9, 0.94]),
               "error": np.array([20.0, 22, 21, 20, 19, 20]), "reference_error": np.array([21.0, 22, 21, 20, 20, 20])}
    drifting = {"agreement": np.array([0.9, 0.9, 0.3, 0.2, 0.1, 0.1]),
                "marginal_entropy": np.array([0.9, 0.9, 0.4, 0.2, 0.1, 0.1]),
                "error": np.array([20.0, 20, 60, 70, 80, 90]), "reference_error": np.full(6, 20.0)}
    t = choose_guard_thresholds([healthy, drifting], window=2, margin=0.02)
    assert t["min_agreement"] == pytest.approx(0.85 - 0.02)  # lowest healthy 2-batch mean: (0.8 + 0.9) / 2
    assert t["min_marginal_entropy"] == pytest.approx(0.90 - 0.02)  # the drifting run's healthy start
    assert t["healthy_stretches"] == 6 and t["stretches"] == 10  # drifting: only its first stretch is healthy
    with pytest.raises(ValueError, match="no healthy stretch"):
        choose_guard_thresholds([drifting], window=4)


def test_a_higher_quantile_tightens_the_thresholds_and_is_checked():

    run = {"agreement": np.linspace(0.8, 1.0, 11), "marginal_entropy": np.linspace(0.9, 1.0, 11),
           "error": np.full(11, 10.0), "reference_error": np.full(11, 10.0)}  # every stretch healthy
    lowest = choose_guard_thresholds([run], window=1, margin=0.0)
    assert lowest["min_agreement"] == pytest.approx(0.8) and lowest["quantile"] == 0.0
    tenth = choose_guard_thresholds([run], window=1, margin=0.0, quantile=0.1)
    assert tenth["min_agreement"] == pytest.approx(0.82) and tenth["min_marginal_entropy"] == pytest.approx(0.91)
    with pytest.raises(ValueError, match="quantile"):
        choose_guard_thresholds([run], quantile=1.0)


def test_the_guard_quantile_is_chosen_by_windows_above_the_reference_then_mean_error():

    sizes = [10] * 8
    reference = [10.0] * 8
    # windows of 20 images (2 batches): 4 windows
    drifts = guarded_score([10, 10, 12, 12, 14, 14, 16, 16], reference, sizes, window=20)
    assert drifts == {"windows_above_reference": 3, "windows": 4, "mean_error": 13.0}
    resets = guarded_score([10, 10, 10.4, 10.4, 11, 10, 10, 10], reference, sizes, window=20)
    assert resets["windows_above_reference"] == 0  # 10.5 and 10.4 are within 0.5 of 10
    assert choose_guard_quantile({0.0: drifts, 0.1: resets}) == 0.1
    tie = dict(resets)
    assert choose_guard_quantile({0.25: tie, 0.1: resets}) == 0.1  # equal scores: the guard that fires least
    better_mean = dict(resets, mean_error=9.0)
    assert choose_guard_quantile({0.1: resets, 0.25: better_mean}) == 0.25
    with pytest.raises(ValueError, match="no candidate"):
        choose_guard_quantile({})


def test_guard_signals_of_a_method_against_itself_agree_fully():

    model = tiny_model()
    signals = guard_signals(build_method("bn", tiny_model(), {"guard": None}), stream(), reference_model(model))
    assert len(signals["agreement"]) == 18 and np.all(signals["agreement"] == 1.0)
    assert np.array_equal(signals["error"], signals["reference_error"])


def test_guard_signals_with_reference_confidence_count_only_confident_images():
    other = reference_model(tiny_model(seed=3))  # another network: disagrees on some images

    def signals(confidence):
        return guard_signals(build_method("bn", tiny_model(), {"guard": None}), stream(), other,
                             reference_confidence=confidence)["agreement"]

    plain = signals(None)
    assert plain.min() < 1.0
    assert np.array_equal(signals(0.0), plain)  # every image counts
    assert np.all(signals(1.0) == 1.0)  # no image is that confident: the first batch's default, repeated


def test_guard_signals_with_relative_marginal_divide_by_the_references_marginal():
    other = reference_model(tiny_model(seed=3))
    plain = guard_signals(build_method("bn", tiny_model(), {"guard": None}), stream(), other)
    relative = guard_signals(build_method("bn", tiny_model(), {"guard": None}), stream(), other, relative_marginal=True)
    itself = guard_signals(build_method("bn", tiny_model(), {"guard": None}), stream(), reference_model(tiny_model()),
                           relative_marginal=True)
    assert np.allclose(itself["marginal_entropy"], 1.0)  # a method against itself: ratio 1
    assert not np.allclose(relative["marginal_entropy"], plain["marginal_entropy"])
    assert np.array_equal(relative["agreement"], plain["agreement"])
