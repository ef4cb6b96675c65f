"""Issue #24.8: a SIGKILLed driver leaves no worker of its job behind (trainers/cluster.py).

(a) a driver that started its own local Ray: Ray's processes and workers all end with it;
(b) a driver attached to a running cluster (`ray start --head`): the cluster stays, the job's
actors end, the unnamed detached one too (Ray Train's PlacementGroupCleaner is one, and without
a dashboard it never exits by itself); a named detached actor is a cluster service and stays.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from repo_scripts import ROOT

pytest.importorskip("ray")
RAY = str(Path(sys.executable).parent / "ray")
EXIT_WITHIN_S = 30  # the workers poll every second; Ray's own job cleanup takes a few more

DRIVER = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from trainers.cluster import connect
ray = connect()

class Sleeper:
    def pid(self):
        return os.getpid()

Actor = ray.remote(num_cpus=0)(Sleeper)
actors = {"plain": Actor.remote(),
          "detached": Actor.options(lifetime="detached").remote(),
          "named_detached": Actor.options(lifetime="detached", name="service", namespace="fate_test").remote()}
print(json.dumps({role: ray.get(a.pid.remote()) for role, a in actors.items()}), flush=True)
time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_and_kill_driver(tmp_path: Path, env: dict) -> dict:
    """Start the driver, wait for its actors' pids, SIGKILL it; the pids by role."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(ROOT)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line, driver.stderr.read()[-3000:]
        pids = json.loads(line)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    return pids


def alive_after(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def processes_in_env(key: str, value: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(key) == value:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def base_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow  # a Ray instance and four actors: tens of seconds on a shared 2-core machine
def test_a_killed_driver_with_its_own_ray_leaves_no_process(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="fate", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**base_env(), "RAY_TMPDIR": ray_tmp}  # its own Ray, never another one running on this machine
    pids = run_and_kill_driver(tmp_path, env)
    assert alive_after(pids.values(), EXIT_WITHIN_S) == []
    left = alive_after([p.pid for p in processes_in_env("RAY_TMPDIR", ray_tmp)], EXIT_WITHIN_S)
    assert left == [], [psutil.Process(pid).cmdline() for pid in left]
    shutil.rmtree(ray_tmp, ignore_errors=True)  # kept for a look when the test failed


@pytest.mark.slow  # a `ray start` cluster and four actors: tens of seconds on a shared 2-core machine
def test_a_killed_driver_on_a_running_cluster_leaves_no_worker_of_its_job(tmp_path):
    work = tempfile.mkdtemp(prefix="fate", dir="/tmp")
    port = free_port()
    env = base_env()
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", work,
                    "--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        pids = run_and_kill_driver(tmp_path, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        assert alive_after([pids["plain"], pids["detached"]], EXIT_WITHIN_S) == []
        assert psutil.pid_exists(pids["named_detached"])  # a cluster service: stays with the cluster
    finally:
        subprocess.run([sys.executable, str(ROOT / "scripts/cluster_procs.py"), "stop", work], check=True, timeout=120)
    shutil.rmtree(work, ignore_errors=True)  # kept for a look when the test failed
