"""Tables and plots: markdown tables; the per-domain plot carries a methods x domains heatmap; the heatmap
alone is a PNG too."""
import numpy as np
import pytest

from metatta.evaluation import Result
from metatta.reporting import error_table, markdown_table, plot_heatmap, plot_results


def result(method, errors, setting="continual"):
    return Result(
        method=method, domain_errors=errors, mean_error=float(np.mean(list(errors.values()))), ece=1.0,
        images_per_second=10.0, peak_memory_mb=1.0, num_images=10, adapted_parameters=0,
        error_over_stream=list(errors.values()) * 3, batch_domains=list(errors) * 3,
        protocol={"setting": setting, "batch_size": 2},
    )


def test_heatmap_png(tmp_path):
    results = [result("source", {"gaussian_noise-5": 80.0, "fog-5": 40.0, "snow-5": 55.0}),
               result("tent", {"gaussian_noise-5": 30.0, "fog-5": 20.0, "snow-5": 25.0})]
    path = plot_heatmap(results, tmp_path / "sub" / "heatmap.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    for setting in ("continual", "episodic"):
        combined = plot_results([result(r.method, r.domain_errors, setting) for r in results],
                                tmp_path / f"{setting}.png")
        assert combined.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no results"):
        plot_heatmap([], tmp_path / "empty.png")


def test_markdown_table_aligns_names_left_and_numbers_right():
    assert markdown_table(["method", "error"], [["bn", "22.5"], ["tent", 22.4]]).splitlines() == [
        "| method | error |", "|---|---:|", "| bn | 22.5 |", "| tent | 22.4 |"]


def test_error_table_bolds_the_best_mean():
    table = error_table([result("source", {"fog-5": 40.0, "snow-5": 60.0}), result("bn", {"fog-5": 20.0, "snow-5": 30.0})])
    lines = table.splitlines()
    assert lines[0] == "| method | fog-5 | snow-5 | mean | ECE | img/s |"
    assert lines[2].startswith("| source | 40.0 | 60.0 | 50.0 |") and "| **25.0** |" in lines[3]
