import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from metatta.data.types import Batch
from metatta.evaluation import Result, evaluate, expected_calibration_error, load_results, save_results
from metatta.reporting import error_table, plot_results


class ListStream:
    def __init__(self, batches, setting="continual", resets_per_domain=False):
        self.batches, self.setting, self.resets_per_domain = batches, setting, resets_per_domain

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Oracle(torch.nn.Module):
    """Predicts the label stored in pixel 0, counts resets."""

    name = "oracle"

    def __init__(self):
        super().__init__()
        self.resets = 0

    def forward(self, x):
        labels = x[:, 0, 0, 0].long()
        return torch.nn.functional.one_hot(labels, 3).float() * 10

    def reset(self):
        self.resets += 1


def make_batch(labels, true_labels, domain):
    x = torch.zeros(len(labels), 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float)
    return Batch(x, torch.tensor(true_labels), domain)


def test_errors_per_domain_and_resets():
    batches = [
        make_batch([0, 1], [0, 1], "a-5"),
        make_batch([0, 0], [0, 1], "a-5"),
        make_batch([2, 2], [1, 1], "b-5"),
    ]
    method = Oracle()
    result = evaluate(method, ListStream(batches, "episodic", True), progress=False, protocol={"seed": 3})
    assert result.domain_errors == {"a-5": 25.0, "b-5": 100.0}
    assert result.mean_error == 62.5
    assert result.error_over_stream == [0.0, 50.0, 100.0]
    assert result.batch_domains == ["a-5", "a-5", "b-5"]
    assert result.num_images == 6
    assert method.resets == 1  # once, at the a -> b boundary
    assert result.protocol["seed"] == 3 and result.protocol["setting"] == "episodic"
    assert "torch" in result.protocol["library_versions"]
    assert result.images_per_second > 0


def test_no_reset_in_continual_stream():
    method = Oracle()
    evaluate(method, ListStream([make_batch([0], [0], "a"), make_batch([0], [0], "b")]), progress=False)
    assert method.resets == 0


def test_empty_stream_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        evaluate(Oracle(), ListStream([]), progress=False)


def test_ece_of_perfectly_calibrated_and_overconfident():
    conf = np.array([0.5, 0.5, 1.0, 1.0])
    assert expected_calibration_error(conf, np.array([1, 0, 1, 1.0])) == pytest.approx(0.0)
    assert expected_calibration_error(np.ones(4), np.zeros(4)) == pytest.approx(100.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=1, max_size=200))
def test_ece_bounded(pairs):
    conf = np.array([p[0] for p in pairs])
    correct = np.array([float(p[1]) for p in pairs])
    ece = expected_calibration_error(conf, correct)
    assert 0.0 <= ece <= 100.0 + 1e-9


def fake_result(method, errors, setting="continual"):
    return Result(
        method=method, domain_errors=errors, mean_error=float(np.mean(list(errors.values()))), ece=1.0,
        images_per_second=10.0, peak_memory_mb=1.0, num_images=10, adapted_parameters=0,
        error_over_stream=list(errors.values()) * 3, batch_domains=list(errors) * 3,
        protocol={"setting": setting, "batch_size": 2},
    )


def test_results_json_round_trip(tmp_path):
    results = [fake_result("a", {"fog-5": 10.0}), fake_result("b", {"fog-5": 5.0})]
    path = save_results(results, tmp_path / "r" / "results.json")
    assert load_results(path) == results
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_results(tmp_path / "missing.json")


def test_table_and_plot(tmp_path):
    results = [fake_result("source", {"gaussian_noise-5": 80.0, "fog-5": 40.0}),
               fake_result("tent", {"gaussian_noise-5": 30.0, "fog-5": 20.0})]
    table = error_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| method | gaussi-5 | fog-5 | mean")
    assert "| tent | 30.0 | 20.0 | **25.0** |" in table
    for setting in ("continual", "episodic"):
        path = plot_results([fake_result("x", {"fog-5": 1.0}, setting)], tmp_path / f"{setting}.png")
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="different domains"):
        error_table([fake_result("a", {"fog-5": 1.0}), fake_result("b", {"snow-5": 1.0})])


def test_on_batch_sees_the_running_errors_after_every_batch():
    batches = [make_batch([0, 1], [0, 1], "a-5"), make_batch([0, 0], [0, 1], "a-5"), make_batch([2, 2], [1, 1], "b-5")]
    seen = []
    result = evaluate(Oracle(), ListStream(batches), progress=False, on_batch=seen.append)
    assert [p.batches for p in seen] == [1, 2, 3] and all(p.total_batches == 3 for p in seen)
    assert [p.images for p in seen] == [2, 4, 6] and [p.domain for p in seen] == ["a-5", "a-5", "b-5"]
    assert [p.domain_errors for p in seen] == [{"a-5": 0.0}, {"a-5": 25.0}, {"a-5": 25.0, "b-5": 100.0}]
    assert [p.mean_error for p in seen] == [0.0, 25.0, 62.5] and seen[-1].mean_error == result.mean_error
