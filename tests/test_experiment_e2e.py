"""End to end on small real data: Fashion-MNIST-C subset, a briefly trained source model,
every baseline method, results JSON + table + plot + MLflow."""
import json

import mlflow
import pytest

from metatta.config import ConfigError
from metatta.data.benchmark_files import fashion_mnist_c
from metatta.experiment import experiment_config, run_experiment
from metatta.source import train_source

CORRUPTIONS = ["gaussian_noise", "contrast", "speckle_noise"]


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "resnet.pt"
    cfg = {"model": "resnet_fmnist", "dataset": "fashion_mnist", "num_classes": 10, "in_channels": 1, "epochs": 1,
           "batch_size": 128, "num_train_images": 3000, "num_test_images": 500, "feature_stats_images": 500,
           "device": "cpu", "output": str(out)}
    return train_source(cfg).checkpoint


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    return fashion_mnist_c(root=tmp_path_factory.mktemp("fmnist_c"), num_images=96, corruptions=CORRUPTIONS)


def config(tmp_path, checkpoint, root, **extra):
    data = {
        "name": "e2e",
        "benchmark": {"name": "fashion_mnist_c", "root": str(root), "corruptions": CORRUPTIONS[:2],
                      "severities": [5], "num_images": 96},
        "source": {"checkpoint": str(checkpoint)},
        "stream": {"setting": "continual", "batch_size": 32, "seed": 0},
        "methods": [{"name": "source"}, {"name": "bn"}, {"name": "tent"}, {"name": "eata"}, {"name": "sar"},
                    {"name": "cotta", "config": {"num_augmentations": 4}}],
        "fisher_images": 64, "device": "cpu", "output_dir": str(tmp_path / "out"), "progress": False,
    }
    data.update(extra)
    return experiment_config(data)


def test_all_baselines_end_to_end(tmp_path, tiny_source, tiny_benchmark, mlflow_uri):
    results = run_experiment(config(tmp_path, tiny_source, tiny_benchmark))
    assert [r.method for r in results] == ["source", "bn", "tent", "eata", "sar", "cotta"]
    by_name = {r.method: r for r in results}
    for r in results:
        assert list(r.domain_errors) == ["gaussian_noise-5", "contrast-5"]
        assert r.num_images == 192 and 0 <= r.mean_error <= 100 and r.images_per_second > 0
        assert r.protocol["source_checkpoint_sha256"] and r.protocol["batch_size"] == 32
    assert by_name["source"].adapted_parameters == 0 and by_name["tent"].adapted_parameters > 0
    assert by_name["bn"].domain_errors != by_name["source"].domain_errors
    out = tmp_path / "out" / "e2e"
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved] == [r.method for r in results]
    assert "| tent |" in (out / "table.md").read_text()
    assert (out / "errors.png").stat().st_size > 10_000
    runs = mlflow.search_runs(experiment_names=["metatta"])
    assert len(runs) == 1 and runs["metrics.tent/mean_error"].iloc[0] == pytest.approx(by_name["tent"].mean_error)


def test_episodic_batch_one_and_label_shift(tmp_path, tiny_source, tiny_benchmark):
    for stream in ({"setting": "episodic", "batch_size": 1}, {"setting": "label_shift", "batch_size": 16}):
        cfg = config(tmp_path, tiny_source, tiny_benchmark, stream=stream, mlflow=False,
                     methods=[{"name": "bn"}, {"name": "tent"}])
        cfg.benchmark.num_images = 24
        results = run_experiment(cfg)
        assert all(r.num_images == 48 for r in results)


def test_a_ccc_stream_from_the_config(tmp_path, tiny_source, tiny_benchmark):
    """`stream.setting: ccc` runs from a config: the generated lifelong stream over the clean test images,
    calibrated against the experiment's source model; its options are recorded with the result."""
    options = {"difficulty": "medium", "tolerance": 30, "num_images": 256, "transition_images": 128,
               "calibration_images": 64, "cache": False}
    cfg = config(tmp_path, tiny_source, tiny_benchmark, mlflow=False, methods=[{"name": "source"}, {"name": "bn"}],
                 stream={"setting": "ccc", "batch_size": 32, "ccc": options})
    source, bn = run_experiment(cfg)
    for r in (source, bn):
        assert r.num_images == 256 and list(r.domain_errors) == ["ccc-medium"]
        assert r.protocol["ccc"] == options and r.protocol["domains"] == ["clean-0"]
    assert bn.mean_error != source.mean_error


@pytest.mark.parametrize("change, match", [
    ({"stream": {"setting": "ccc", "ccc": {"difficulty": "brutal"}}}, "stream.ccc: .*difficulty"),
    ({"stream": {"setting": "ccc", "ccc": {"model": "x"}}}, r"stream.ccc: unknown option\(s\) \['model'\]"),
    ({"stream": {"setting": "ccc", "ccc": {"num_images": 0}}}, "stream.ccc: .*num_images"),
    ({"stream": {"setting": "continual", "ccc": {"difficulty": "hard"}}}, "stream.ccc: options of the ccc setting"),
    ({"methods": [{"name": "tnet"}]}, "unknown method"),
    ({"methods": []}, "methods"),
    ({"stream": {"setting": "sideways"}}, "unknown stream setting"),
    ({"benchmark": {"name": "mnist_c"}}, "unknown benchmark"),
    ({"benchmark": {"corruptions": ["fogg"]}}, "unknown corruption"),
    ({"stream": {"batch_size": "big"}}, "batch_size"),
])
def test_config_errors_before_any_work(tmp_path, change, match):
    data = {"methods": [{"name": "bn"}], **change}
    with pytest.raises((ValueError, ConfigError), match=match):
        experiment_config(data)


def test_a_registered_adapter_is_recorded_by_version_and_sha256(tmp_path, tiny_source, tiny_benchmark, mlflow_uri):
    """`models:/...@champion` in a row: the Result protocol says which version and which weights ran."""
    from metatta import tracking
    from metatta.learned.mgg import MGG, save_mgg
    from metatta.safe_files import sha256_file

    directory = save_mgg(MGG(), tmp_path / "mgg")
    with tracking.start_run("train", experiment="e2e_refs") as run:
        version = tracking.register_adapter("mgg_e2e", directory, run.info.run_id)
        tracking.promote_if_better("mgg_e2e", version, 20.0)
    cfg = config(tmp_path, tiny_source, tiny_benchmark, mlflow=False,
                 methods=[{"name": "bn"}, {"name": "mgtta", "adapter": "models:/mgg_e2e@champion"}])
    cfg.benchmark.num_images = 32
    bn, mgtta = run_experiment(cfg)
    assert "adapter" not in bn.protocol
    recorded = mgtta.protocol["adapter"]
    assert (recorded["ref"], recorded["version"], recorded["uri"]) == ("models:/mgg_e2e@champion", "1",
                                                                       "models:/mgg_e2e/1")
    assert recorded["sha256"] == sha256_file(directory / tracking.ADAPTER_WEIGHTS)
    saved = json.loads((tmp_path / "out" / "e2e" / "results.json").read_text())
    assert saved[1]["protocol"]["adapter"]["sha256"] == recorded["sha256"]
