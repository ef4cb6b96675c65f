"""Evaluation workers evaluate each registered version exactly once."""
import dataclasses
import json
import logging
import os
import threading
import time

import pytest
import torch

from metatta import tracking
from metatta.adapter_eval import ERROR_TAG, STATUS_TAG, EvalWorker
from metatta.evaluation import Result
from metatta.experiment import ExperimentConfig, MethodSpec


@pytest.fixture
def mlflow_uri(module_mlflow_uri):  # one store for the module: each test registers its own model names
    return module_mlflow_uri


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
        return fake_result(cfg) if cfg.methods[-1].adapter else []

    experiment = ExperimentConfig(name="e", methods=[MethodSpec("source")], output_dir=str(tmp_path / "out"))
    v1, run1 = register_version(tmp_path, "mgg_w", 1)
    workers = [EvalWorker("mgg_w", experiment, claims_dir=tmp_path / "claims", worker_id=f"w{i}",
                          evaluate_fn=evaluate) for i in range(3)]
    threads = [threading.Thread(target=w.poll_once) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [None, "models:/mgg_w/1"]  # the source row (no adapter), then the adapter's row
    v2, _ = register_version(tmp_path, "mgg_w", 2)
    for w in workers:
        w.poll_once()
    adapter_calls = [c for c in calls if c is not None]
    assert adapter_calls == ["models:/mgg_w/1", "models:/mgg_w/2"]
    assert calls.count(None) <= 2  # the rows without the adapter: once per worker that evaluated a version
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
    from metatta.claims import ClaimLedger

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
    # the rows without the adapter once (for every version), then the adapter's row
    assert seen == [[("mgg-free source", None), ("tent", None)], [("ours", "models:/mgg_t/1")]]
    tags = tracking.client().get_model_version("mgg_t", "1").tags
    assert (tags["benchmark_mean_error"], tags["benchmark_method"]) == ("12.5000", "ours")
    assert ledger.list("mgg_t")["1"]["state"] == "done"
    assert worker.poll_once() == []


def test_a_failing_version_is_marked_failed_and_the_worker_goes_on(tmp_path, mlflow_uri):
    from metatta.claims import ClaimLedger

    def evaluate(cfg):
        return [dataclasses.replace(fake_result(cfg)[0], method="something else")]

    experiment = ExperimentConfig(name="e", methods=[MethodSpec("source")], output_dir=str(tmp_path / "out"))
    register_version(tmp_path, "mgg_m", 1)
    ledger = ClaimLedger()
    worker = EvalWorker("mgg_m", experiment, worker_id="w", evaluate_fn=evaluate, claims=ledger)
    assert worker.poll_once() == ["1"]
    tags = tracking.client().get_model_version("mgg_m", "1").tags
    assert tags[STATUS_TAG] == "failed"
    assert "no result for the adapter's row(s) ['mgtta']" in tags[ERROR_TAG]
    assert ledger.list("mgg_m")["1"]["state"] == "failed"
    assert worker.poll_once() == []  # failed is final until released


def test_truncated_registered_weights_fail_that_version_only(tmp_path, mlflow_uri, caplog):
    """A damaged weights.pt: one error line naming the artifact, the version tagged failed with
    the reason, and the worker evaluates the next version."""
    from metatta.claims import ClaimLedger

    evaluated = []

    def evaluate(cfg):
        if cfg.methods[-1].adapter is None:
            return []  # the rows without the adapter (evaluated once per worker)
        evaluated.append(cfg.methods[-1].adapter)
        return fake_result(cfg)

    directory = tmp_path / "broken"
    directory.mkdir()
    torch.save({"w": torch.zeros(1000)}, directory / tracking.ADAPTER_WEIGHTS)
    weights = (directory / tracking.ADAPTER_WEIGHTS).read_bytes()
    (directory / tracking.ADAPTER_WEIGHTS).write_bytes(weights[: len(weights) // 2])
    (directory / tracking.ADAPTER_CONFIG).write_text(json.dumps({"kind": "mgg"}))
    with tracking.start_run("broken", experiment="w") as run:
        tracking.register_adapter("mgg_b", directory, run.info.run_id)
    register_version(tmp_path, "mgg_b", 2)
    experiment = ExperimentConfig(name="e", methods=[MethodSpec("source")], output_dir=str(tmp_path / "out"))
    worker = EvalWorker("mgg_b", experiment, worker_id="w", evaluate_fn=evaluate, claims=ClaimLedger())
    with caplog.at_level(logging.INFO, logger="metatta.adapter_eval"):
        assert worker.poll_once() == ["1", "2"]
    assert evaluated == ["models:/mgg_b/2"]
    c = tracking.client()
    tags = c.get_model_version("mgg_b", "1").tags
    assert tags[STATUS_TAG] == "failed"
    assert "registered adapter mgg_b version 1" in tags[ERROR_TAG] and "not a readable weights file" in tags[ERROR_TAG]
    assert c.get_model_version("mgg_b", "2").tags[STATUS_TAG] == "done"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("error: mgg_b v1 failed: registered adapter mgg_b version 1")
    assert "\n" not in errors[0] and not any(r.exc_info for r in caplog.records)
    messages = [r.getMessage() for r in caplog.records]
    assert any("mgg_b v2: claimed by w" in m for m in messages)
    with caplog.at_level(logging.INFO, logger="metatta.adapter_eval"):
        worker.poll_once()
    assert any("mgg_b: idle, no version to evaluate" in r.getMessage() for r in caplog.records)


def test_a_working_worker_renews_its_claim_and_a_dead_ones_expires(tmp_path, mlflow_uri):
    from metatta.claims import FileClaims

    claims = FileClaims(tmp_path / "claims")
    experiment = ExperimentConfig(name="e", methods=[MethodSpec("source")], output_dir=str(tmp_path / "out"))
    register_version(tmp_path, "mgg_l", 1)
    register_version(tmp_path, "mgg_l", 2)
    rival = EvalWorker("mgg_l", experiment, worker_id="rival", evaluate_fn=fake_result, claims=claims, lease_s=0.4)
    rival_polls = []

    def slow_evaluate(cfg):  # 1.2 s of work, three leases: the claim must be renewed meanwhile
        if cfg.methods[-1].adapter is None:
            return []  # the rows without the adapter (evaluated once per worker)
        for _ in range(4):
            time.sleep(0.3)
            rival_polls.append(rival.claim("1"))
        return fake_result(cfg)

    assert claims.claim("mgg_l", "2", "dead-worker", lease_s=60)  # a worker killed right after claiming
    worker = EvalWorker("mgg_l", experiment, worker_id="w", evaluate_fn=slow_evaluate, claims=claims, lease_s=0.4)
    assert worker.poll_once() == ["1"]  # v2 is held by the dead worker until its lease runs out
    assert rival_polls == [False] * 4  # renewed every 0.1 s: never expired while w worked
    long_ago = time.time() - 120
    os.utime(claims.root / "mgg_l" / "v2", (long_ago, long_ago))  # two minutes without a renewal
    assert rival.poll_once() == ["2"]
    listing = claims.list("mgg_l")
    assert {v: (e["worker"], e["state"]) for v, e in listing.items()} == {"1": ("w", "done"), "2": ("rival", "done")}


def test_claims_launcher_lists_and_releases(tmp_path, mlflow_uri, capsys):
    from launch import claims as claims_launcher
    from metatta.claims import FileClaims

    claims_dir = tmp_path / "claims"
    claims = FileClaims(claims_dir)
    experiment = ExperimentConfig(name="e", methods=[MethodSpec("source")], output_dir=str(tmp_path / "out"))
    for value in (1, 2, 3):
        register_version(tmp_path, "mgg_c", value)
    assert claims.claim("mgg_c", "1", "dead-worker", lease_s=60)
    long_ago = time.time() - 120
    os.utime(claims_dir / "mgg_c" / "v1", (long_ago, long_ago))
    failing = EvalWorker("mgg_c", experiment, worker_id="w", claims=claims,
                         evaluate_fn=lambda cfg: [dataclasses.replace(fake_result(cfg)[0], method="other")])
    assert failing.poll_once() == ["1", "2", "3"]  # takes v1 over (expired); every evaluation fails

    args = ["--model", "mgg_c", "--claims-dir", str(claims_dir)]
    claims_launcher.main(["list", *args])
    table = capsys.readouterr().out
    assert "| 2 | failed | failed | w |" in table and "no result for the adapter's row" in table
    claims_launcher.main(["release", "2", *args])
    assert "v2: re-queued (claim released, evaluation=failed)" in capsys.readouterr().out
    assert failing.pending_versions() == ["2"]
    claims_launcher.main(["release", "--failed", *args])
    out = capsys.readouterr().out
    assert "v1: re-queued" in out and "v3: re-queued" in out
    assert failing.pending_versions() == ["1", "2", "3"]
    assert claims.list("mgg_c") == {}
    assert claims.claim("mgg_c", "3", "dead-worker", lease_s=60)
    os.utime(claims_dir / "mgg_c" / "v3", (long_ago, long_ago))
    claims_launcher.main(["release", "--expired", *args])
    assert capsys.readouterr().out.strip() == "v3: re-queued (claim released, evaluation=pending)"


def test_rows_without_the_adapter_run_once_for_every_version(tmp_path, mlflow_uri):
    from metatta.claims import ClaimLedger

    seen = []

    def evaluate(cfg):
        seen.append([s.label or s.name for s in cfg.methods])
        return [dataclasses.replace(fake_result(cfg)[0], method=s.label or s.name) for s in cfg.methods]

    experiment = ExperimentConfig(name="e", output_dir=str(tmp_path / "out"),
                                  methods=[MethodSpec("source"), MethodSpec("tent")])
    register_version(tmp_path, "mgg_s", 1)
    register_version(tmp_path, "mgg_s", 2)
    worker = EvalWorker("mgg_s", experiment, worker_id="w", evaluate_fn=evaluate, claims=ClaimLedger())
    assert worker.poll_once() == ["1", "2"]
    assert seen == [["source", "tent"], ["mgtta"], ["mgtta"]]  # the baselines once, then one row per version
    for version in (1, 2):
        saved = json.loads((tmp_path / "out" / f"e_mgg_s_v{version}" / "results.json").read_text())
        assert [r["method"] for r in saved] == ["source", "tent", "mgtta"]  # every version's file has them all
