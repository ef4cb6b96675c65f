"""See and release evaluation-worker claims (`launch/eval_worker.py`).

    python launch/claims.py list --model mgg                   # every version: registry status, claim, worker
    python launch/claims.py release --model mgg 3 5            # re-queue versions 3 and 5 (claimed or failed)
    python launch/claims.py release --model mgg --expired      # re-queue every claim whose lease ran out
    python launch/claims.py release --model mgg --failed       # re-queue every failed version
    python launch/claims.py list --model mgg --claims ray      # claims held by the cluster's Ray actor

A worker that dies leaves its claim until its lease runs out (then another
worker takes the version over by itself); `release` re-queues at once. A
version already evaluated (evaluation=done) is re-evaluated only with --redo.
Use the same --claims / --claims-dir and MLFLOW_TRACKING_URI as the workers.
"""
import argparse
import sys

from metatta.adapter_eval import claim_status, requeue
from metatta.claims import make_claims
from metatta.cli import ArgumentParser, run_main, setup_logging
from metatta.reporting import markdown_table


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no versions and no claims")
        return
    header = ["version", "registry", "claim", "worker", "renewed (s ago)", "lease (s)", "error"]
    body = [[r["version"], r["registry"], r["claim"], r["worker"],
             "-" if r["renewed_s_ago"] is None else str(r["renewed_s_ago"]),
             "-" if r["lease_s"] is None else f"{r['lease_s']:.0f}", r["error"][:80]] for r in rows]
    print(markdown_table(header, body))


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("list", "release"))
    parser.add_argument("versions", nargs="*", help="versions to release")
    parser.add_argument("--model", default="mgg", help="registered model name (default: %(default)s)")
    parser.add_argument("--claims", choices=("file", "ray"), default="file", help="claim backend of the workers")
    parser.add_argument("--claims-dir", default=None, help="the workers' --claims-dir (file backend)")
    parser.add_argument("--expired", action="store_true", help="release: every claim whose lease ran out")
    parser.add_argument("--failed", action="store_true", help="release: every version whose evaluation failed")
    parser.add_argument("--redo", action="store_true", help="release: re-evaluate versions already done too")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.action == "list" and (args.versions or args.expired or args.failed or args.redo):
        parser.error("list takes no versions, --expired, --failed or --redo")
    if args.action == "release" and not (args.versions or args.expired or args.failed):
        parser.error("release: name versions, or pass --expired or --failed")
    bad = [v for v in args.versions if not v.isdigit()]
    if bad:
        parser.error(f"versions must be numbers, got {', '.join(bad)}")
    claims = make_claims(args.claims, args.claims_dir)
    rows = claim_status(args.model, claims)
    if args.action == "list":
        print_table(rows)
        return
    chosen = set(args.versions)
    chosen |= {r["version"] for r in rows if args.expired and r["claim"] == "expired"}
    chosen |= {r["version"] for r in rows if args.failed and (r["registry"] == "failed" or r["claim"] == "failed")}
    registered = {r["version"] for r in rows if r["registry"] != "(not registered)"}
    for version in sorted(chosen, key=int):
        if version not in registered:
            released = claims.release(args.model, version)
            print(f"v{version}: not a registered version of {args.model!r}; "
                  + ("its claim was released" if released else "nothing to release"))
            continue
        print(requeue(args.model, version, claims, redo=args.redo))
    if not chosen:
        print("nothing to release")


if __name__ == "__main__":
    sys.exit(run_main(main))
