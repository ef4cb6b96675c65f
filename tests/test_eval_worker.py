"""Evaluation workers evaluate each registered version exactly once."""
import dataclasses
import json
import threading

import pytest
import torch

from metatta import tracking
from metatta.adapter_eval import STATUS_TAG, EvalWorker
from metatta.evaluation import Result
from metatta.experiment import ExperimentConfig, MethodSpec


def register_version(tmp_path, name, value):
    directory = tmp_path / f"adapter{value}"
    directory.mkdir()
    torch.save({"w": torch.tensor([float(value)])}, directory / tracking.ADAPTER_WEIGHTS)
    (directory / tracking.ADAPTER_CONFIG).write_text(json.dumps({"kind": "test"}))
    with tracking.start_run(f"train{value}", experiment="w") as run:
        return tracking.register_adapter(name, directory, run.info.run_id), run.info.run_id


def fake_result(cfg):
    return [Result(method="mgtta", domain_errors={"fog-5": 12.5}, mean_error=12.5, ece=1.0, images_per_second=1.0,
                   peak_memory_mb=0.0, num_images=1, adapted_parameters=0, error_over_stream=[12.5],
                   batch_domains=["fog-5"], protocol={"adapter": cfg.methods[-1].adapter})]


def test_each_version_evaluated_once_across_workers(tmp_path, mlflow_uri):
    calls, lock = [], threading.Lock()

    def evaluate(cfg):
        with lock:
            calls.append(cfg.methods[-1].adapter)
        return fake_result(cfg)

    experiment = ExperimentConfig(name="e", methods=[MethodSpec("source")], output_dir=str(tmp_path / "out"))
    v1, run1 = register_version(tmp_path, "mgg_w", 1)
    workers = [EvalWorker("mgg_w", experiment, claims_dir=tmp_path / "claims", worker_id=f"w{i}",
                          evaluate_fn=evaluate) for i in range(3)]
    threads = [threading.Thread(target=w.poll_once) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["models:/mgg_w/1"]
    v2, _ = register_version(tmp_path, "mgg_w", 2)
    for w in workers:
        w.poll_once()
    assert calls == ["models:/mgg_w/1", "models:/mgg_w/2"]
    for w in workers:
        assert w.poll_once() == []  # nothing left
    client = tracking.client()
    assert client.get_model_version("mgg_w", "1").tags[STATUS_TAG] == "done"
    history = client.get_metric_history(run1, "eval/mgtta/mean_error")
    assert [m.value for m in history] == [12.5]  # results land in the version's own run


def test_unknown_model_lists_nothing(tmp_path, mlflow_uri):
    worker = EvalWorker("absent", ExperimentConfig(methods=[MethodSpec("source")]), claims_dir=tmp_path)
    assert worker.pending_versions() == []


def test_mean_error_follows_the_row_with_adapter_points_at(tmp_path, mlflow_uri):
    """The tag is the row `with_adapter` gave the adapter, whatever the rows are called."""
    from metatta.adapter_eval import ClaimLedger

    seen = []

    def evaluate(cfg):
        seen.append([(s.label or s.name, s.adapter) for s in cfg.methods])
        errors = {"mgg-free source": 50.0, "ours": 12.5, "tent": 30.0}  # old rule: the first name with "mgg"
        return [dataclasses.replace(fake_result(cfg)[0], method=label, mean_error=error)
                for label, error in errors.items()]

    experiment = ExperimentConfig(name="e", output_dir=str(tmp_path / "out"), methods=[
        MethodSpec("source", label="mgg-free source"), MethodSpec("mgtta", label="ours"), MethodSpec("tent")])
    register_version(tmp_path, "mgg_t", 1)
    ledger = ClaimLedger()  # any object with claim/complete/release/list is a claim backend
    worker = EvalWorker("mgg_t", experiment, worker_id="w", evaluate_fn=evaluate, claims=ledger)
    assert worker.poll_once() == ["1"]
    assert seen == [[("mgg-free source", None), ("ours", "models:/mgg_t/1"), ("tent", None)]]
    tags = tracking.client().get_model_version("mgg_t", "1").tags
    assert (tags["benchmark_mean_error"], tags["benchmark_method"]) == ("12.5000", "ours")
    assert ledger.list("mgg_t")["1"]["state"] == "done"
    assert worker.poll_once() == []


def test_missing_adapter_row_is_an_error(tmp_path, mlflow_uri):
    from metatta.adapter_eval import ClaimLedger

    def evaluate(cfg):
        return [dataclasses.replace(fake_result(cfg)[0], method="something else")]

    experiment = ExperimentConfig(name="e", methods=[MethodSpec("source")], output_dir=str(tmp_path / "out"))
    register_version(tmp_path, "mgg_m", 1)
    worker = EvalWorker("mgg_m", experiment, worker_id="w", evaluate_fn=evaluate, claims=ClaimLedger())
    with pytest.raises(ValueError, match=r"no result for the adapter's row\(s\) \['mgtta'\]"):
        worker.poll_once()
    assert tracking.client().get_model_version("mgg_m", "1").tags[STATUS_TAG] == "claimed"
