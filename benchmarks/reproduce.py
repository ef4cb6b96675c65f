"""Re-run the benchmark behind a README table and fail if its errors moved.

Every benchmark JSON in benchmarks/results records the script and arguments that
produced it (`"command"`). This re-runs that command into a temporary folder,
pairs each result with the one of the recorded JSON (same setting, batch size,
images per domain and method label), and exits with status 1 when a mean error
differs by more than `--tolerance` points (default 0.1) or a result is missing
on either side. Speeds are printed, never compared: they depend on the machine.

    python benchmarks/reproduce.py benchmarks/results/baselines.json [--tolerance 0.1]
    make reproduce TABLE=palm

A table only reproduces from the checkpoint it was measured with: the recorded
source-checkpoint sha256 is compared with the one of the rerun and a mismatch is
reported first (the usual reason for a failure).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def iter_results(data: Any) -> Iterator[dict[str, Any]]:
    """Every serialised `Result` (a dict with method, mean_error and protocol) anywhere in `data`."""
    if isinstance(data, dict):
        if {"method", "mean_error", "protocol"} <= data.keys():
            yield data
            return
        for value in data.values():
            yield from iter_results(value)
    elif isinstance(data, list):
        for value in data:
            yield from iter_results(value)


def result_key(result: dict[str, Any]) -> tuple:
    p = result["protocol"]
    return (p.get("setting"), p.get("batch_size"), p.get("num_images_per_domain"), p.get("seed"), result["method"])


def indexed(data: Any) -> dict[tuple, dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for result in iter_results(data):
        key = result_key(result)
        if key in out:
            raise ValueError(f"two results for {key}: a table must name its rows uniquely")
        out[key] = result
    return out


def compare(recorded: Any, rerun: Any, tolerance: float) -> tuple[list[str], list[str]]:
    """(report lines, failures) of the mean errors of `rerun` against `recorded`."""
    old, new = indexed(recorded), indexed(rerun)
    if not old:
        raise ValueError("the recorded JSON holds no results")
    lines, failures = [], []
    checkpoints = ({r["protocol"].get("source_checkpoint_sha256") for r in old.values()},
                   {r["protocol"].get("source_checkpoint_sha256") for r in new.values()})
    if new and checkpoints[0] != checkpoints[1]:
        failures.append(f"source checkpoint differs: recorded {sorted(map(str, checkpoints[0]))}, "
                        f"rerun {sorted(map(str, checkpoints[1]))}")
    lines.append("| setting | batch | images | method | recorded | rerun | diff | img/s recorded | img/s rerun |")
    lines.append("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for key in sorted(old.keys() | new.keys(), key=str):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            failures.append(f"{key}: only in the {'rerun' if a is None else 'recorded table'}")
            continue
        diff = b["mean_error"] - a["mean_error"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {a['mean_error']:.2f} | {b['mean_error']:.2f} "
                     f"| {diff:+.2f} | {a.get('images_per_second', 0):.0f} | {b.get('images_per_second', 0):.0f} |")
        if abs(diff) > tolerance:
            failures.append(f"{key}: mean error {b['mean_error']:.2f} vs recorded {a['mean_error']:.2f} "
                            f"(|{diff:+.2f}| > {tolerance})")
    return lines, failures


def rerun(command: list[str], out: Path) -> Path:
    """Run a recorded benchmark command with its output in `out`; the JSON it wrote."""
    if not command or not command[0].startswith("benchmarks/"):
        raise ValueError(f"recorded command {command!r} is not a benchmarks/ script")
    before = set(out.glob("*.json"))
    subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:], "--out", str(out)], cwd=ROOT, check=True)
    written = sorted(set(out.glob("*.json")) - before)
    if len(written) != 1:
        raise RuntimeError(f"{command[0]} wrote {len(written)} JSON files to {out}, expected 1")
    return written[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a benchmark JSON, e.g. benchmarks/results/palm.json")
    parser.add_argument("--tolerance", type=float, default=0.1, help="largest accepted |mean error difference|")
    args = parser.parse_args(argv)
    recorded = json.loads(Path(args.table).read_text())
    command = recorded.get("command") if isinstance(recorded, dict) else None
    if not command:
        print(f"error: {args.table} records no command; regenerate it with its benchmark script", file=sys.stderr)
        return 2
    print("re-running:", " ".join(command), flush=True)
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        new = json.loads(rerun(command, Path(tmp)).read_text())
    lines, failures = compare(recorded, new, args.tolerance)
    print("\n".join(lines))
    if failures:
        print(f"\nFAILED: {len(failures)} difference(s) beyond {args.tolerance} points", file=sys.stderr)
        for failure in failures:
            print("  " + failure, file=sys.stderr)
        return 1
    print(f"\nreproduced: every mean error within {args.tolerance} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
