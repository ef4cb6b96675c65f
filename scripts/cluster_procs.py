"""The processes of one smoke-test cluster (scripts/cluster_smoke.sh): those whose command line
names its work directory (Ray's head and worker node processes all carry its --temp-dir), plus
the mlflow server and its children.

    python scripts/cluster_procs.py ports WORK_DIR [MLFLOW_PID]   # JSON: the TCP ports they listen on
    python scripts/cluster_procs.py stop WORK_DIR                 # end them (never `ray stop`: that
                                                                  # ends every Ray on the machine)
"""
import json
import os
import sys

import psutil


def cluster_processes(work: str, extra_pids=()) -> list[psutil.Process]:
    """Those processes and their descendants (Ray's workers and agents retitle themselves
    `ray::...`, which hides the work directory from their command line)."""
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}  # not the script running us
    roots = [p for p in psutil.process_iter(["pid", "cmdline"])
             if p.pid not in own and any(work in part for part in (p.info["cmdline"] or []))]
    roots += [psutil.Process(pid) for pid in extra_pids if psutil.pid_exists(pid)]
    procs = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                if p.pid not in own:
                    procs[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def role(p: psutil.Process) -> str:
    """What a process is: its executable, or for Python the script it runs (dashboard.py, agent.py, ...)."""
    cmdline = p.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):  # a Ray worker: its task or actor
        return cmdline[0].split()[0]
    if "mlflow" in " ".join(cmdline[:4]) or any("uvicorn" in part for part in cmdline[:3]):
        return "mlflow server"
    scripts = [os.path.basename(part) for part in cmdline if part.endswith(".py")]
    return scripts[0] if scripts else p.name()


def listening(procs) -> list[dict]:
    names = {}
    for p in procs:
        try:
            names[p.pid] = role(p)
        except psutil.NoSuchProcess:
            continue
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in names:
            out.append({"address": c.laddr.ip, "port": c.laddr.port, "process": names[c.pid]})
    return sorted(out, key=lambda r: (r["process"], r["port"]))


def stop(procs) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


if __name__ == "__main__":
    action, work, *pids = sys.argv[1:]
    procs = cluster_processes(work, [int(p) for p in pids])
    if action == "ports":
        print(json.dumps(listening(procs), indent=1))
    elif action == "stop":
        stop(procs)
    else:
        raise SystemExit(f"unknown action {action!r}: ports | stop")
