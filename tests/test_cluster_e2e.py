"""End to end with real components, as a team runs it on a cluster (issue #23):

- an `mlflow server` subprocess on 127.0.0.1 (SQLite backend, artifacts served over HTTP): a tiny
  MGG is trained and registered through it, and an evaluation worker process pulls the version
  over HTTP and logs its result back;
- a two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): the rollout actors land
  on both nodes, one node is removed mid-training, and training still completes every step and
  registers its MGG.

Both start real servers and processes: slow tests."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from metatta import tracking
from metatta.adapter_eval import STATUS_TAG
from metatta.data.benchmark_files import fashion_mnist_c
from metatta.learned.meta_training import mgg_train_config, split_domains, steps_per_epoch
from test_mgg_training import CORRUPTIONS, domains, source_checkpoint  # noqa: F401 (fixtures)
from trainers.mgg import train_mgg

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no answer from {url} after {timeout_s:.0f} s")


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts, as docs/guide.md runs it."""
    port = free_port()
    artifacts = tmp_path / "mlartifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--serve-artifacts", "--artifacts-destination", str(artifacts)]
    log = open(tmp_path / "mlflow_server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", proc)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri, artifacts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def mgg_config(tmp_path, checkpoint, **overrides):
    data = dict(name="e2e", source_checkpoint=str(checkpoint), corruptions=CORRUPTIONS, train_images=16,
                val_images=8, batch_size=2, epochs=1, num_actors=2, checkpoint_dir=str(tmp_path / "ckpt"),
                checkpoint_every=1, log_every=1, device="cpu", val_batch_size=8, mlflow=True)
    data.update(overrides)
    return mgg_train_config(data)


def test_mlflow_server_train_register_and_a_worker_evaluates_over_http(tmp_path, mlflow_server, source_checkpoint,
                                                                       domains):
    uri, artifacts = mlflow_server
    outcome = train_mgg(mgg_config(tmp_path, source_checkpoint, register_as="mgg_http"), use_ray=False,
                        domains=domains)
    assert outcome.registered_version == "1" and outcome.promoted
    assert tracking.resolve_version("models:/mgg_http@champion") == "1"
    assert list(artifacts.rglob(tracking.ADAPTER_WEIGHTS)), "the MGG's weights went to the served artifact store"

    # an evaluation worker, a separate process that knows only the server's URI
    bench = fashion_mnist_c(root=tmp_path / "fmnist_c", num_images=16, corruptions=CORRUPTIONS[:1], progress=False)
    experiment = {
        "name": "http_eval", "device": "cpu", "progress": False, "output_dir": str(tmp_path / "eval_out"),
        "benchmark": {"name": "fashion_mnist_c", "root": str(bench), "corruptions": CORRUPTIONS[:1],
                      "severities": [5], "num_images": 16},
        "source": {"checkpoint": str(source_checkpoint)},
        "stream": {"setting": "episodic", "batch_size": 8, "seed": 0},
        "methods": [{"name": "mgtta", "config": {"loss": "entropy+stats"}}],
    }
    config_path = tmp_path / "eval.yaml"
    config_path.write_text(yaml.safe_dump(experiment))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "launch/eval_worker.py"), "--config", str(config_path),
                           "--model", "mgg_http", "--once", "--claims-dir", str(tmp_path / "claims")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mgg_http v1: benchmark mean error" in done.stderr + done.stdout

    client = tracking.client()
    version = client.get_model_version("mgg_http", "1")
    assert version.tags[STATUS_TAG] == "done" and 0 <= float(version.tags["benchmark_mean_error"]) <= 100
    history = client.get_metric_history(version.run_id, "eval/mgtta/mean_error")
    assert len(history) == 1 and history[0].value == pytest.approx(float(version.tags["benchmark_mean_error"]),
                                                                     abs=1e-3)
    # the worker's results file went back through the server into the served artifact store
    assert list(artifacts.rglob("evaluation_v1/results.json"))


def test_two_node_cluster_survives_a_removed_node(tmp_path, mlflow_uri, source_checkpoint, domains):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local instance: this test needs its own cluster
        ray.shutdown()
    # Each node has room for both actors, so the one on a removed node can restart on the other.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        cfg = mgg_config(tmp_path, source_checkpoint, epochs=3, register_as="mgg_two_nodes")
        nodes_seen, removed = [], []

        def remove_a_node(step, pool):
            if step == 1:
                nodes_seen.extend(actor_nodes(ray, pool.actors))
                cluster.remove_node(worker_node)  # that node's actor restarts on the head; its call is retried
                removed.append(step)

        outcome = train_mgg(cfg, use_ray=True, domains=domains, on_step=remove_a_node)
        assert removed == [1]
        assert set(nodes_seen) == {cluster.head_node.node_id, worker_node.node_id}
        assert outcome.steps == 3 * steps_per_epoch(split_domains(domains, cfg)[0], cfg)
        assert all(np.isfinite(h["meta_loss"]) for h in outcome.history)
        assert outcome.registered_version == "1"
        assert tracking.resolve_version("models:/mgg_two_nodes@champion") == "1"
    finally:
        ray.shutdown()
        cluster.shutdown()


def actor_nodes(ray, actors) -> list[str]:
    """The node id each actor runs on (asked of the actors' own records in the GCS)."""
    from ray._private import state

    ids = {a._actor_id.hex() for a in actors}
    return [info["Address"]["NodeID"] for actor_id, info in state.actors().items() if actor_id in ids
            and info["State"] == "ALIVE"]
