"""benchmarks/mgg_heldout.py: variant configs resolve and pass the trainer's checks, the
validation block is refused when it overlaps meta-training rows, and the table picks the best."""
from __future__ import annotations

import pytest

from repo_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/mgg_heldout.py")


def test_every_variant_is_a_valid_config_clear_of_the_validation_block(bench, tmp_path):
    for name in bench.VARIANTS:
        cfg = bench.variant_config(name, [], tmp_path)
        assert (cfg.register_as, cfg.mlflow) == (None, False)
        assert set(cfg.corruptions) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
        bench.check_disjoint(cfg, 2000)
    paper = bench.variant_config("paper", [], tmp_path)
    assert bench.rows_used(paper) == 128 // 4 + 256
    with pytest.raises(ValueError, match="--val-first 100"):
        bench.check_disjoint(paper, 100)
    assert bench.rows_used(bench.variant_config("supervised_k1", [], tmp_path)) == 0  # clean training split
    assert bench.variant_config("k4_learned_step", [], tmp_path).unroll_steps == 4
    assert bench.variant_config("paper", ["epochs=2"], tmp_path).epochs == 2


def test_the_validation_experiment_is_the_held_out_corruptions_only(bench, tmp_path):
    cfg = bench.experiment(tmp_path, 2000, 1000, bench.baseline_methods())
    assert cfg.benchmark.corruption_names() == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    assert (cfg.benchmark.first_image, cfg.benchmark.num_images) == (2000, 1000)
    assert (cfg.stream.setting, cfg.stream.batch_size) == ("episodic", 64)
    assert [m.name for m in cfg.methods] == list(bench.BASELINES)


def test_table_marks_the_lowest_held_out_error(bench):
    def row(name, error, seed=0):
        return {"variant": name, "config": {"seed": seed}, "K": 1, "learned_step_size": False, "outer_loss": "lookahead",
                "train_data": "benchmark", "train_images": 128, "epochs": 40, "learner_steps": 10, "seconds": 1.0,
                "step_scale": 1.0, "trainer_validation_error": 20.0, "heldout_error": error,
                "heldout_domain_errors": {"speckle_noise-5": error}}

    rows = [row("paper", 20.004), row("k16", 20.001), row("learned_step", 19.5), row("learned_step", 20.7, seed=1)]
    assert bench.best_variant(rows[:3]) == "learned_step"
    assert bench.best_variant(rows[:2]) == "paper"  # equal to 0.01: the first (simpler) one
    assert bench.best_variant(rows) == "paper"  # learned_step: 20.1 over its two seeds
    text = bench.markdown({"variants": rows, "val_first": 2000, "val_images": 1000, "command": ["x"],
                           "baselines": [{"method": "tent", "heldout_error": 21.0,
                                          "heldout_domain_errors": {"speckle_noise-5": 21.0}}]})
    assert "| learned_step | 2 | 20.10 | 19.50, 20.70 |" in text and "| paper | 1 | **20.00** | 20.00 |" in text
    assert "| tent | 21.0 | 21.00 |" in text


def test_results_are_named_by_tag(bench):
    assert bench.parse_args([]).tag == "mgg_heldout"  # the record configs/fmnist_c/mgg.yaml follows
    assert bench.parse_args(["--val-images", "8000", "--tag", "mgg_heldout_long"]).tag == "mgg_heldout_long"
