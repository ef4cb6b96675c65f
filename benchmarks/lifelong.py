"""Lifelong benchmark: every method, with and without the collapse guard, on a CCC-style stream.

The stream (`stream.setting: ccc`, docs/lifelong.md) changes its corruption continuously while the
source model's accuracy stays near the difficulty's target, so a method's drift is its own doing.
Each method runs window by window (`metatta.lifelong.evaluate_windowed`): results are appended
per window under --work-dir, and a killed run resumes where it stopped.

The guard's thresholds are chosen on CCC streams of the four held-out corruptions only, never on the
benchmark's: per method (default), from its own held-out run, the quantile of its healthy signals
whose guarded held-out run keeps the most windows within BN + 0.5 (`choose_guard_thresholds`,
`choose_guard_quantile`); or pooled (`--guard-calibration pooled`), the lowest agreement and
class-marginal entropy seen on any healthy stretch of Tent, EATA and SAR.
The held-out streams run at --calibration-difficulty (default: the benchmark's; the held-out
corruptions have no hard nodes for the Fashion-MNIST ResNet-8, so hard calibrates on medium), or a
finished run's calibration is reused (--guard-thresholds-from).

Length: --num-images for every method whose probed speed is at least --fast-img-s, else
--slow-num-images (the table says which); --full-length names rows that take the full length without a
probe (their speed measured on a quiet machine). The probed speeds and the guard's thresholds are kept in the
work dir: a resumed run, or one split over processes (`--methods`, same --work-dir), reuses them.

    python benchmarks/lifelong.py --difficulty medium [--num-images 1000000 --slow-num-images 200000]
        [--methods source bn tent eata sar cotta palm law rdumb mgtta] [--mgg models:/mgg@champion]

Writes benchmarks/results/lifelong_<difficulty>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from metatta.cli import setup_logging
from metatta.data.ccc import clean_domain
from metatta.data.clean import load_clean
from metatta.data.streams import build_stream
from metatta.experiment import ExperimentConfig, MethodSpec, SourceConfig, StreamConfig, build_row_method, source_model
from metatta.evaluation import evaluate
from metatta.lifelong import (choose_guard_quantile, choose_guard_thresholds, evaluate_windowed, guard_signals,
                              guard_targets, guarded_score, plot_windows, read_windows, summarize, summary_table,
                              targets_table)
from metatta.methods.guard import GuardConfig, reference_model
from metatta.models.checkpoint import checkpoint_hash
from metatta.paths import cache_root
from metatta.reporting import benchmark_command

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "methods"
# label -> (method, settings file or None); rdumb is ETA wearing reset_every 1000.
ROWS = {"source": ("source", None), "bn": ("bn", None), "tent": ("tent", None), "eata": ("eata", None),
        "sar": ("sar", None), "cotta": ("cotta", None), "palm": ("palm", None), "law": ("law", None),
        "rdumb": ("eta", CONFIGS / "eta_rdumb.yaml"), "mgtta": ("mgtta", None)}
NOT_ADAPTING = ("source", "bn")  # nothing to guard
CALIBRATION_METHODS = ("tent", "eata", "sar")
GUARD_OPTIONS = ("check_every", "reference_confidence", "relative_marginal")  # per-method calibration options a record carries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--difficulty", default="medium", choices=["easy", "medium", "hard"])
    parser.add_argument("--num-images", type=int, default=1_000_000)
    parser.add_argument("--slow-num-images", type=int, default=200_000)
    parser.add_argument("--fast-img-s", type=float, default=1000.0, help="probed speed for the full length")
    parser.add_argument("--full-length", nargs="*", default=[], choices=list(ROWS),
                        help="rows that run --num-images without a probe (speeds measured on a quiet machine, e.g. "
                             "benchmarks/results/guard_cost.md: a probe on a loaded one can fall below --fast-img-s)")
    parser.add_argument("--window", type=int, default=10_000,
                        help="images per window, rounded down to whole batches (10,000 -> 9,984 at batch 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--guard-rows", default="both", choices=["both", "unguarded", "guarded"],
                        help="which of each adapting method's two rows to run (split a slow method over two processes)")
    parser.add_argument("--mgg", default=None, help="MGTTA's trained MGG (models:/mgg@champion or a directory); "
                                                     "without it the mgtta row is left out")
    parser.add_argument("--calibration-difficulty", default=None, choices=["easy", "medium", "hard"],
                        help="difficulty of the held-out calibration streams (default --difficulty's); the held-out "
                             "corruptions have no hard nodes for the Fashion-MNIST ResNet-8, so hard calibrates on medium")
    parser.add_argument("--calibration-images", type=int, default=40_000, help="held-out stream per method")
    parser.add_argument("--guard-calibration", default="per-method", choices=["per-method", "pooled"],
                        help="per-method: each method's own held-out run, at the quantile of its healthy signals that, "
                             "run guarded on the held-out stream, keeps the most windows within BN + 0.5; pooled (the "
                             "first rule): one pair of thresholds for every method, the lowest healthy signals of "
                             "Tent, EATA and SAR")
    parser.add_argument("--guard-thresholds-from", default=None, metavar="REPORT_JSON_OR_WORK_DIR",
                        help="reuse another run's held-out calibration (its work dir, or the `thresholds` of its report "
                             "JSON; same source checkpoint) instead of calibrating")
    parser.add_argument("--guard-quantiles", nargs="+", type=float, default=[0.0, 0.1, 0.25, 0.5, 0.75],
                        help="per-method: the candidate quantiles")
    parser.add_argument("--guard-check-every", type=int, default=None,
                        help="per-method: batches between the guard's reference checks (default: the guard's, 8); "
                             "smaller sees a fast drift sooner after a reset, for one more no-grad forward per check")
    parser.add_argument("--guard-reference-confidence", type=float, default=None,
                        help="per-method: the guard's agreement counts only images the reference predicts with at "
                             "least this softmax probability (calibrated the same way); default: every image")
    parser.add_argument("--guard-relative-marginal", action="store_const", const=True, default=None,
                        help="per-method: the guard's class-marginal signal is the method's marginal entropy over the "
                             "reference's on the same batch (calibrated the same way); default: the method's alone")
    parser.add_argument("--calibration-window", type=int, default=2_496,
                        help="per-method: images per window when scoring a candidate on the held-out stream")
    parser.add_argument("--work-dir", default=None, help="per-window results (resumable); default under the cache")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default=None, help="the report's file name (default lifelong_<difficulty>)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the windows finished so far in --work-dir; run nothing")
    args = parser.parse_args(argv)
    args.window -= args.window % args.batch_size  # windows hold whole batches
    if args.guard_calibration == "per-method" and args.calibration_images % args.batch_size:
        # a candidate's held-out run is scored on whole batches; refused before anything runs
        parser.error(f"--calibration-images {args.calibration_images} must be a multiple of --batch-size "
                     f"{args.batch_size} with --guard-calibration per-method")
    if options := guard_options(args):  # refused before anything runs, as the guard itself would refuse them
        if args.guard_calibration != "per-method" or args.guard_thresholds_from:
            parser.error(f"{', '.join('--guard-' + o.replace('_', '-') for o in options)}: options of a per-method "
                         "calibration run here (not with --guard-calibration pooled or --guard-thresholds-from)")
        try:
            GuardConfig(**options).validate("benchmarks/lifelong.py guard")
        except ValueError as error:
            parser.error(str(error))
    setup_logging("WARNING")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or cache_root() / "lifelong" / f"{args.difficulty}-seed{args.seed}")
    labels_run = [m for m in args.methods if m != "mgtta" or args.mgg]
    if args.report_only:
        return report_so_far(args, argv, out, work, labels_run)
    device = torch.device("cpu")
    model, checkpoint = source_model(SourceConfig(), device)
    # Thresholds and windows are only reused for the same source model (checkpoints trained on two machines differ).
    source_sha256 = checkpoint_hash(checkpoint)
    images, labels = load_clean("fashion_mnist", "test")
    context = ExperimentConfig(stream=StreamConfig(setting="ccc", batch_size=args.batch_size, seed=args.seed))

    def stream(num_images: int, corruptions: str = "benchmark"):
        difficulty = args.difficulty if corruptions == "benchmark" else calibration_difficulty(args)
        return build_stream([clean_domain(images, labels)], "ccc", args.batch_size, seed=args.seed, model=model,
                            difficulty=difficulty, num_images=num_images, corruptions=corruptions)

    def method(label: str, guard: dict | None):
        name, settings = ROWS[label]
        spec = MethodSpec(name=name, label=label, settings=str(settings) if settings else None,
                          adapter=args.mgg if label == "mgtta" else None, config={"guard": guard})
        return build_row_method(spec, copy.deepcopy(model), context, checkpoint, device)

    # Both are stored in the work dir on first use, so a resumed (or split) run keeps them: a probe on a
    # loaded machine must not move a method to the other length halfway through its stream.
    reference = reference_model(model)

    reused = thresholds_from(args.guard_thresholds_from, source_sha256) if args.guard_thresholds_from else None
    if reused is not None and (missing := without_thresholds(reused, labels_run, args.guard_rows)):
        raise SystemExit(f"--guard-thresholds-from {args.guard_thresholds_from} has no thresholds for {missing}")

    def first_calibration() -> dict:  # per-method: only the record here; each method's thresholds on first use
        if reused is not None:
            return reused["pooled"]
        if args.guard_calibration == "pooled":
            return calibrate_guard(args, stream, method, reference, source_sha256)
        return {"calibration": "per-method", "calibrated_on": calibration_record(args, source_sha256)}

    calibration = remembered(work / "guard_thresholds.json", first_calibration)
    check_calibration(calibration["calibrated_on"], work, args, source_sha256)

    def guard_of(label: str) -> dict:
        if "min_agreement" in calibration:  # pooled: one pair of thresholds for every method
            return reset_guard(calibration)
        path = work / f"guard_thresholds.{label}.json"
        if reused is not None:
            return reset_guard(remembered(path, lambda: reused[label]))
        record = remembered(path, lambda: calibrate_method_guard(args, label, stream, method, reference))
        check_method_record(record, path, args)
        return reset_guard(record)

    runs, lengths = {}, {}
    for label in labels_run:
        if label in args.full_length:
            length = args.num_images
        else:
            probed = remembered(work / f"{label}.speed.json", lambda: {
                "images_per_second": probe_speed(method(label, None), stream(args.batch_size * 40))})
            length = args.num_images if probed["images_per_second"] >= args.fast_img_s else args.slow_num_images
        for guarded in row_variants(label, args.guard_rows):
            row = f"{label}+guard" if guarded else label
            guard = guard_of(label) if guarded else None
            windows = evaluate_windowed(method(label, guard), stream(length),
                                        work / f"{row}.jsonl", window=args.window, method_name=row,
                                        description={"difficulty": args.difficulty, "guard": guard,
                                                     "source_sha256": source_sha256})
            runs[row] = windows
            lengths[row] = length
            print(f"{row}: {len(windows)} windows, mean {np.mean([w['error'] for w in windows]):.2f}", flush=True)
    write_report(args, argv, out, runs, lengths, guard_records(work))


def row_variants(label: str, guard_rows: str) -> tuple[bool, ...]:
    """Which rows of `label` to run: without the guard (False) and/or with it (True)."""
    if label in NOT_ADAPTING:
        return (False,) if guard_rows != "guarded" else ()
    return {"both": (False, True), "unguarded": (False,), "guarded": (True,)}[guard_rows]


def report_so_far(args, argv, out: Path, work: Path, labels: list[str]) -> None:
    """The report over the windows each row has finished in `work` (rows not started are left out)."""
    thresholds_file = work / "guard_thresholds.json"
    if not thresholds_file.is_file():
        raise SystemExit(f"--report-only: {work} holds no run (no {thresholds_file.name})")
    runs, lengths = {}, {}
    for label in labels:
        for row in (label, f"{label}+guard"):
            header, windows = read_windows(work / f"{row}.jsonl")
            if windows:
                runs[row], lengths[row] = windows, header["num_batches"] * header["batch_size"]
    if "bn" not in runs or "source" not in runs:
        raise SystemExit(f"--report-only: {work} has no finished window of source and bn yet")
    write_report(args, argv, out, runs, lengths, guard_records(work))


def calibration_record(args, source_sha256: str) -> dict:
    return {"methods": list(CALIBRATION_METHODS) if args.guard_calibration == "pooled" else "each its own",
            "corruptions": "held_out", "images_per_method": args.calibration_images, "source_sha256": source_sha256,
            "calibration": args.guard_calibration, "difficulty": calibration_difficulty(args)}


def calibration_difficulty(args) -> str:
    return args.calibration_difficulty or args.difficulty


def calibrate_guard(args, stream, method, reference, source_sha256: str) -> dict:
    """Pooled thresholds from held-out CCC streams of the calibration methods (no benchmark corruption)."""
    signals = [guard_signals(method(label, None), stream(args.calibration_images, "held_out"), reference)
               for label in CALIBRATION_METHODS]
    thresholds = choose_guard_thresholds(signals)
    thresholds["calibrated_on"] = calibration_record(args, source_sha256)
    print(f"guard thresholds (held-out): {thresholds}", flush=True)
    return thresholds


def calibrate_method_guard(args, label: str, stream, method, reference) -> dict:
    """`label`'s own thresholds: its unguarded held-out run gives the healthy signals; each candidate
    quantile's thresholds are then run guarded on the same held-out stream and scored against the
    BN-adapted source there (`guarded_score`); the best (`choose_guard_quantile`) is kept."""
    signals = guard_signals(method(label, None), stream(args.calibration_images, "held_out"), reference,
                            reference_confidence=args.guard_reference_confidence,
                            relative_marginal=bool(args.guard_relative_marginal))
    candidates, scores = {}, {}
    for quantile in args.guard_quantiles:
        candidates[quantile] = {**choose_guard_thresholds([signals], quantile=quantile), **guard_options(args)}
        result = evaluate(method(label, reset_guard(candidates[quantile])), stream(args.calibration_images, "held_out"),
                          progress=False)
        sizes = [args.batch_size] * len(result.error_over_stream)  # whole batches: checked in main
        scores[quantile] = {**guarded_score(result.error_over_stream, signals["reference_error"], sizes,
                                            args.calibration_window), "guard_fired": result.collapse_events}
        print(f"{label} guard, quantile {quantile}: {scores[quantile]}", flush=True)
    chosen = choose_guard_quantile(scores)
    return {**candidates[chosen], "candidates": {str(q): {**candidates[q], **scores[q]} for q in scores},
            "calibration_window": args.calibration_window}


def guard_options(args) -> dict:
    """The guard settings given on the command line (`--guard-check-every`, ...), by GuardConfig field."""
    return {option: getattr(args, f"guard_{option}") for option in GUARD_OPTIONS
            if getattr(args, f"guard_{option}") is not None}


def reset_guard(thresholds: dict) -> dict:
    """The `guard:` config of a guarded row: reset to the source when a threshold record's signals say collapse."""
    guard = {"action": "reset", "min_agreement": thresholds["min_agreement"],
             "min_marginal_entropy": thresholds["min_marginal_entropy"], "window": thresholds["window"]}
    for option in GUARD_OPTIONS:  # else the guard's default
        if option in thresholds:
            guard[option] = thresholds[option]
    return guard


def thresholds_from(report: str, source_sha256: str) -> dict:
    """The guard calibration of another run (its work dir or report JSON), by label ("pooled" holds its
    record), marked as reused. Refused unless it was calibrated for the same source checkpoint."""
    path = Path(report)
    found = (path / "guard_thresholds.json").is_file() if path.is_dir() else path.is_file()
    if not found:
        raise SystemExit(f"--guard-thresholds-from {report}: neither a lifelong work dir (with guard_thresholds.json) "
                         "nor a report JSON")
    thresholds = guard_records(path) if path.is_dir() else json.loads(path.read_text()).get("thresholds")
    if thresholds is None:
        raise SystemExit(f"--guard-thresholds-from {report}: a JSON without the `thresholds` of a lifelong report")
    calibrated_on = thresholds["pooled"]["calibrated_on"]
    if calibrated_on.get("source_sha256") != source_sha256:
        raise SystemExit(f"--guard-thresholds-from {report}: calibrated for another source checkpoint (sha256 "
                         f"{str(calibrated_on.get('source_sha256'))[:12]}), not this one ({source_sha256[:12]})")
    marked = {**calibrated_on, "reused_from": str(report)}
    return {**thresholds, "pooled": {**thresholds["pooled"], "calibrated_on": marked}}


def without_thresholds(reused: dict, labels: list[str], guard_rows: str) -> list[str]:
    """The labels among `labels` that run guarded but find no thresholds in a reused calibration."""
    if "min_agreement" in reused["pooled"]:  # pooled: one pair for every method
        return []
    return [label for label in labels if True in row_variants(label, guard_rows) and label not in reused]


def check_calibration(calibrated_on: dict, work: Path, args, source_sha256: str) -> None:
    """Refuse a work dir whose guard was calibrated on another length, source checkpoint or rule."""
    if calibrated_on.get("reused_from") != args.guard_thresholds_from:
        raise SystemExit(f"{work}: its guard thresholds were "
                         + (f"reused from {calibrated_on['reused_from']}" if calibrated_on.get("reused_from")
                            else "calibrated here") + f", not --guard-thresholds-from {args.guard_thresholds_from}; "
                         "use another --work-dir")
    if args.guard_thresholds_from:
        return  # the length and rule are the reused calibration's
    if calibrated_on["images_per_method"] != args.calibration_images:
        raise SystemExit(f"{work}: its guard was calibrated on {calibrated_on['images_per_method']} "
                         f"images per method, not --calibration-images {args.calibration_images}; use another --work-dir")
    if calibrated_on.get("source_sha256") != source_sha256:
        raise SystemExit(f"{work}: its guard was calibrated for another source checkpoint (sha256 "
                         f"{str(calibrated_on.get('source_sha256'))[:12]}), not this one ({source_sha256[:12]}); "
                         "use another --work-dir")
    if calibrated_on.get("difficulty", args.difficulty) != calibration_difficulty(args):  # older records: the run's
        raise SystemExit(f"{work}: its guard was calibrated on {calibrated_on['difficulty']} held-out streams, not "
                         f"--calibration-difficulty {calibration_difficulty(args)}; use another --work-dir")
    if calibrated_on.get("calibration", "pooled") != args.guard_calibration:
        raise SystemExit(f"{work}: its guard calibration is {calibrated_on.get('calibration', 'pooled')}, not "
                         f"--guard-calibration {args.guard_calibration}; use another --work-dir")


def check_method_record(record: dict, path: Path, args) -> None:
    """Refuse a method's remembered calibration made with other guard options or candidate quantiles than
    this command's (a resumed run would otherwise wear the old ones silently)."""
    remembered_options = {option: record[option] for option in GUARD_OPTIONS if option in record}
    if remembered_options != guard_options(args):
        raise SystemExit(f"{path}: calibrated with guard options {remembered_options or 'none'}, not this command's "
                         f"{guard_options(args) or 'none'}; use another --work-dir")
    candidates = sorted(float(q) for q in record["candidates"])
    if candidates != sorted(args.guard_quantiles):
        raise SystemExit(f"{path}: calibrated on candidate quantiles {candidates}, not --guard-quantiles "
                         f"{sorted(args.guard_quantiles)}; use another --work-dir")


def guard_records(work: Path) -> dict:
    """The work dir's guard calibration: the pooled thresholds, or each method's own by label."""
    records = {"pooled": json.loads((work / "guard_thresholds.json").read_text())}
    for path in sorted(work.glob("guard_thresholds.*.json")):
        records[path.name.split(".")[1]] = json.loads(path.read_text())
    return records


def remembered(path: Path, compute) -> dict:
    """The JSON record at `path`, or `compute()`'s, written there first."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def probe_speed(method, probe_stream) -> float:
    """Images per second of `method` on a short stretch of the stream (adaptation included)."""
    start, seen = time.perf_counter(), 0
    for batch in probe_stream:
        method(batch.x)
        seen += len(batch.y)
    return seen / (time.perf_counter() - start)


def write_report(args, argv, out: Path, runs: dict, lengths: dict, guards: dict) -> None:
    """`lengths`: the images each row's stream holds (a row still running has fewer windows)."""
    errors = {row: [w["error"] for w in windows] for row, windows in runs.items()}
    rows = summarize(errors)
    for row in rows:
        windows = runs[row["method"]]
        row.update(num_images=sum(w["num_images"] for w in windows), planned_images=lengths[row["method"]],
                   length_rule="full" if lengths[row["method"]] >= args.num_images else "slow",
                   images_per_second=float(np.mean([w["images_per_second"] for w in windows])),
                   collapse_events=windows[-1].get("collapse_events", 0),
                   scheduled_resets=windows[-1].get("scheduled_resets", 0))
    targets = guard_targets(errors)
    stem = args.name or f"lifelong_{args.difficulty}"
    plot = plot_windows(errors, args.window, out / f"{stem}.png",
                        title=f"CCC-style stream ({args.difficulty}), batch {args.batch_size}")
    command = benchmark_command(__file__, argv)
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "thresholds": guards, "summary": rows,
                                                  "targets": targets, "windows": runs}, indent=1))
    speed = "\n".join(f"| {r['method']} | {r['num_images']:,} of {r['planned_images']:,} ({r['length_rule']}) | "
                      f"{r['images_per_second']:.0f} | {r['collapse_events']} | {r['scheduled_resets']} |" for r in rows)
    (out / f"{stem}.md").write_text(
        f"Error (%) per window of {args.window:,} images on a CCC-style stream ({args.difficulty}), batch "
        f"{args.batch_size}, seed {args.seed}; each row over its own windows (a slow method's stream is shorter; "
        f"'windows > BN' compares it with BN's same windows). Command: `python {' '.join(command)}`\n\n"
        f"{summary_table(rows)}\n\n"
        f"Targets: a guarded row at or below BN + 0.5 and below Source in every window, its mean at or below the "
        f"unguarded method's over the same windows; RDumb below Source in every window.\n\n{targets_table(targets)}\n\n"
        f"| row | images (of the stream's) | img/s | guard fired | scheduled resets |\n|---|---:|---:|---:|---:|\n"
        f"{speed}\n\n"
        f"{guard_text(guards)}\n\n"
        f"![windowed error]({plot.name})\n")
    print((out / f"{stem}.md").read_text())


def guard_text(guards: dict) -> str:
    """The thresholds the guarded rows wore: pooled, or per method with the held-out scores of each candidate."""
    pooled = guards["pooled"]
    if "min_agreement" in pooled:
        return (f"Guard thresholds, chosen on held-out CCC streams: agreement >= {pooled['min_agreement']}, "
                f"class-marginal entropy >= {pooled['min_marginal_entropy']} (window {pooled['window']} checks).")
    lines = []
    for label, chosen in guards.items():
        if label == "pooled":
            continue
        held_out = ", ".join(f"q {q}: {c['windows_above_reference']}/{c['windows']} ({c['mean_error']:.2f})"
                             for q, c in chosen["candidates"].items())
        options = ", ".join(f"{option} {chosen[option]}" for option in GUARD_OPTIONS if option in chosen) or "-"
        lines.append(f"| {label} | {chosen['quantile']} | {chosen['min_agreement']} | {chosen['min_marginal_entropy']} "
                     f"| {options} | {held_out} |")
    return ("Guard thresholds per method, chosen on its own held-out CCC run: the quantile q of its healthy "
            "signals whose guarded held-out run has the fewest windows above BN + 0.5 (then the lowest mean).\n\n"
            "| method | q | agreement >= | class-marginal entropy >= | options | held-out: windows > BN + 0.5 "
            "(mean error) |\n|---|---:|---:|---:|---|---|\n" + "\n".join(lines))


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
