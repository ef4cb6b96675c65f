"""docs/guide.md's multi-host setup: every command in it is run by scripts/cluster_smoke.sh (a
fast check that they match), and the slow test runs the script: an mlflow server, a Ray head and
worker node with token auth, one `ray job submit` per job, and which ports listen where."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/cluster_smoke.sh"
LOOPBACK = {"127.0.0.1", "::1"}
WILDCARD = {"0.0.0.0", "::"}


def guide_commands() -> list[str]:
    """The commands of the guide's multi-host section, continuation lines joined."""
    text = (REPO / "docs/guide.md").read_text()
    section = text.split("## Multi-host setup", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("#", 1)[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line.startswith(("mlflow server", "ray ", "export RAY_AUTH_MODE"))]


def program_and_config(command: str) -> str:
    """What a command runs, without the values that differ on one machine (addresses, ports, paths)."""
    words = command.split()
    if words[:3] == ["ray", "job", "submit"]:
        return " ".join(w for w in words if w.startswith(("launch/", "configs/")))
    return " ".join(w for w in words if w.startswith("-") or not re.search(r"[<$/:]|\d", w))


def test_every_command_of_the_guide_section_is_run_by_the_smoke_script():
    commands = guide_commands()
    assert len([c for c in commands if c.startswith("ray job submit")]) == 5  # MGG, CTA, 2 searches, eval worker
    script = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())
    script_lines = [line.strip() for line in script.splitlines()]
    for command in commands:
        head, wanted = " ".join(command.split()[:2]), program_and_config(command).split()
        assert any(head in line and all(w in line.split() for w in wanted) for line in script_lines), \
            f"not run by scripts/cluster_smoke.sh: {command}"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_cluster_smoke_script_runs_every_job_and_ports_listen_as_documented():
    mlflow_port, ray_port, dashboard_port = free_ports(3)
    bin_dir = str(Path(sys.executable).parent)  # mlflow, ray of this environment
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "MLFLOW_PORT": str(mlflow_port), "RAY_PORT": str(ray_port), "DASHBOARD_PORT": str(dashboard_port)}
    env.pop("RAY_AUTH_MODE", None)  # the script turns token auth on
    env.pop("RAY_ADDRESS", None)
    # a short path: Ray's socket paths under --temp-dir must stay within 107 bytes
    work = Path(tempfile.mkdtemp(prefix="smoke", dir="/tmp"))
    done = subprocess.run(["bash", str(SCRIPT), str(work)], env=env, capture_output=True, text=True, timeout=1800)
    check_smoke_run(done, work, mlflow_port, ray_port, dashboard_port)
    shutil.rmtree(work, ignore_errors=True)  # kept for a look when the run failed


def check_smoke_run(done, work: Path, mlflow_port: int, ray_port: int, dashboard_port: int) -> None:
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "smoke: all commands ran" in done.stdout
    assert "mgg v1 evaluation: done" in done.stdout

    for name in ("ports_started.json", "ports_after_jobs.json"):
        listeners = json.loads((work / name).read_text())
        by_port = {}
        for r in listeners:
            by_port.setdefault(r["port"], set()).add(r["address"])
        assert by_port[mlflow_port] <= LOOPBACK and by_port[dashboard_port] <= LOOPBACK
        assert by_port[ray_port] & WILDCARD, "the GCS now binds an address: update the guide's table"
        beyond = {r["process"] for r in listeners if r["address"] not in LOOPBACK}
        assert "mlflow server" not in beyond
        assert {"gcs_server", "raylet"} <= beyond
