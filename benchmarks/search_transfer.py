"""Does a search's validation rank settings as the benchmark does? Re-run a finished search's
trials on the benchmark stream the search was for (issue 22, item 5).

Takes a search's record (`search.json`, written by trainers/tune.py: the search config, every
trial with its parameters and validation values, the default first, and the decision) from the
search's output directory, the file itself, or a registered setting (`models:/palm_settings@champion`:
the record is registered with the setting). Runs the published default, the chosen setting and
the `--top-k` searched trials with the lowest validation value (completed, not diverged) on the
run the search tuned for: the search config's benchmark (its corruptions of the test split,
severities, `benchmark.num_images`), stream setting and batch size, once per `--seeds` stream
seed, each from a fresh copy of the source model, through the experiment's evaluation path
(`metatta.experiment.build_row_method` + `metatta.evaluation.evaluate`).

Reports, per trial, the validation value against the benchmark mean error (mean over seeds);
Spearman's rank correlation over those trials (validation objective and validation mean error,
each against the benchmark); and the chosen setting against the default on the benchmark: the
difference and whether the chosen one is at or below, and strictly below, the default (issue 22's
targets). Writes benchmarks/results/<name>.json and .md.

    python benchmarks/search_transfer.py outputs/tune_palm_fmnist [--top-k 5] [--seeds 0 1 2]
        [--config SEARCH_YAML] [--set benchmark.num_images=1000 ...] [--name NAME] [--device cpu]

`--config` gives the search config for a record that has none (searches before the record kept
it); `--set KEY=VALUE` overrides a field of the search config (e.g. `benchmark.root`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from metatta import tracking
from metatta.cli import run_main, setup_logging
from metatta.config import ConfigError, apply_override, load_config
from metatta.data.streams import build_stream
from metatta.device import resolve_device
from metatta.evaluation import evaluate
from metatta.experiment import MethodSpec, build_row_method, images_used, load_domains, source_model
from metatta.models.checkpoint import checkpoint_hash
from metatta.reporting import benchmark_command, markdown_table
from metatta.safe_files import read_json_file
from metatta.search import SearchConfig, search_config, trial_method_config
from metatta.search_protocol import spearman

HERE = Path(__file__).resolve().parent
RECORD = "search.json"
DEFAULT_TRIAL = "default"
log = logging.getLogger("search_transfer")


def load_record(search: str) -> tuple[dict[str, Any], str]:
    """(the search record, where it was read): a search's output directory, its search.json, or a
    registered setting's models:/ URI (its files hold the record)."""
    if search.startswith("models:/"):
        version, directory = tracking.download_registered(search)
        path = directory / RECORD
        if not path.is_file():
            raise FileNotFoundError(f"{search} (version {version}) has no {RECORD} (registered before searches "
                                    f"kept their trials with the setting); give the search's output directory")
        where = f"{search} (version {version})"
    else:
        path = Path(search)
        path = path / RECORD if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"search {search}: no {RECORD} there (a search's output directory, "
                                    f"<output_dir>/<name>, holds one)")
        where = str(path)
    record = read_json_file(path, "search record")
    for key in ("decision", "trials"):
        if key not in record:
            raise ValueError(f"search record {where}: no {key!r}")
    if not record["trials"] or record["trials"][0]["trial_id"] != DEFAULT_TRIAL:
        raise ValueError(f"search record {where}: the first trial must be the default")
    return record, where


def transfer_config(record: dict[str, Any], config: str | None, overrides: list[str]) -> SearchConfig:
    """The search config: `config` (a YAML file) or the record's, with `overrides` applied."""
    if config is not None:
        data = load_config(config)
    elif "config" in record:
        data = copy.deepcopy(record["config"])
    else:
        raise ConfigError("the search record has no search config; give the search's YAML with --config")
    for item in overrides:
        apply_override(data, item)
    return search_config(data)


def select_trials(record: dict[str, Any], metric: str, top_k: int,
                  stopped_seed: int | None = None) -> list[dict[str, Any]]:
    """The default, the chosen trial, then the top_k searched trials by validation `metric`
    (completed, not diverged), each once, each with its `roles`; with `stopped_seed`, also every
    trial ASHA stopped (not diverged) after it finished that validation seed (role `stopped`)."""
    default, searched = record["trials"][0], record["trials"][1:]
    chosen_id = record["decision"]["trial_id"]
    finished = sorted((t for t in searched if t["completed"] and not t["diverged"] and metric in t),
                      key=lambda t: t[metric])
    stopped = [] if stopped_seed is None else [
        t for t in searched if not t["completed"] and not t["diverged"] and f"seed{stopped_seed}/{metric}" in t]
    picked: dict[str, dict[str, Any]] = {}
    for role, trials in (("default", [default]), ("chosen", [t for t in record["trials"] if t["trial_id"] == chosen_id]),
                         ("top", finished[:top_k]), ("stopped", stopped)):
        for trial in trials:
            row = picked.setdefault(trial["trial_id"], {"trial": trial, "roles": []})
            row["roles"].append(role)
    if chosen_id not in picked:
        raise ValueError(f"search record: the chosen trial {chosen_id!r} is not among its trials")
    return list(picked.values())


def benchmark_errors(cfg: SearchConfig, rows: list[dict[str, Any]], seeds: list[int],
                     device: torch.device) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
    """{trial_id: {seed: benchmark mean error}} and the protocol (stream, images, checkpoint)."""
    domains = load_domains(cfg.benchmark, cfg.stream.setting)
    model, checkpoint = source_model(cfg.source, device)
    errors: dict[str, dict[int, float]] = {row["trial"]["trial_id"]: {} for row in rows}
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, seed=seed))
        cache: dict[str, Any] = {}  # context inputs (Fisher batches) are drawn with the stream seed
        for row in rows:
            if row["roles"] == ["stopped"] and seed != seeds[0]:
                continue  # ranked on the first seed only (as it was validated)
            trial = row["trial"]
            spec = MethodSpec(name=cfg.method, label=trial["trial_id"], adapter=cfg.adapter,
                              config=trial_method_config(cfg, trial["params"]))
            torch.manual_seed(seed)  # as an experiment row: the seed orders the images and draws the method's randomness
            stream = build_stream(domains, cfg.stream.setting, cfg.stream.batch_size, seed=seed,
                                  **cfg.stream.stream_options(model))
            method = build_row_method(spec, copy.deepcopy(model), seed_cfg, checkpoint, device, cache)
            result = evaluate(method, stream, method_name=spec.label, device=device, progress=False)
            errors[trial["trial_id"]][seed] = result.mean_error
            log.info("%s (%s), seed %d: benchmark mean error %.2f%%", trial["trial_id"], "+".join(row["roles"]),
                     seed, result.mean_error)
    protocol = {"benchmark": cfg.benchmark.name, "domains": [d.name for d in domains],
                "setting": cfg.stream.setting, "batch_size": cfg.stream.batch_size,
                "num_images_per_domain": images_used(cfg.benchmark, domains), "seeds": seeds,
                "source_checkpoint": str(checkpoint), "source_checkpoint_sha256": checkpoint_hash(checkpoint)}
    return errors, protocol


def summarize(record: dict[str, Any], rows: list[dict[str, Any]], errors: dict[str, dict[int, float]],
              metric: str, stopped_seed: int | None = None) -> dict[str, Any]:
    """Per trial validation vs benchmark, the rank correlations, the chosen setting vs the default;
    with `stopped_seed` (a validation seed), also the rank correlation on that seed alone over the
    completed and the ASHA-stopped trials (validation on that seed vs the first benchmark seed)."""
    trials = []
    for row in rows:
        trial = row["trial"]
        per_seed = errors[trial["trial_id"]]
        values = list(per_seed.values())
        trials.append({
            "trial_id": trial["trial_id"], "roles": row["roles"], "params": trial["params"],
            "validation_objective": trial.get("objective"), "validation_mean_error": trial.get("mean_error"),
            "validation_diverged": trial["diverged"], "validation_completed": trial["completed"],
            **({} if stopped_seed is None else {
                "validation_seed_objective": trial.get(f"seed{stopped_seed}/objective"),
                "validation_seed_mean_error": trial.get(f"seed{stopped_seed}/mean_error")}),
            "benchmark_mean_error": statistics.fmean(values), "benchmark_per_seed": {str(s): e for s, e in per_seed.items()},
            "benchmark_seed_std": statistics.stdev(values) if len(values) > 1 else None})
    # diverged trials carry the penalty, not a validation error: they are left out of the ranking
    ranked = [t for t in trials if not t["validation_diverged"] and t["validation_completed"]
              and t["validation_mean_error"] is not None]
    bench = [t["benchmark_mean_error"] for t in ranked]
    by_id = {t["trial_id"]: t for t in trials}
    default, chosen = by_id[DEFAULT_TRIAL], by_id[record["decision"]["trial_id"]]
    difference = chosen["benchmark_mean_error"] - default["benchmark_mean_error"]
    best = min(trials, key=lambda t: t["benchmark_mean_error"])
    return {
        "metric": metric, "trials": trials,
        "spearman": {"validation_objective_vs_benchmark": spearman([t["validation_objective"] for t in ranked], bench),
                     "validation_mean_error_vs_benchmark": spearman([t["validation_mean_error"] for t in ranked], bench),
                     "trials": len(ranked)},
        **({} if stopped_seed is None else {"spearman_one_seed": one_seed_spearman(trials, stopped_seed)}),
        "chosen_vs_default": {
            "chosen": record["decision"].get("chosen"), "chosen_trial_id": chosen["trial_id"],
            "default_benchmark": default["benchmark_mean_error"], "chosen_benchmark": chosen["benchmark_mean_error"],
            "difference": difference, "at_or_below": difference <= 0, "strictly_below": difference < 0,
            "per_seed_difference": {s: chosen["benchmark_per_seed"][s] - e for s, e in default["benchmark_per_seed"].items()}},
        "best_on_benchmark": {"trial_id": best["trial_id"], "benchmark_mean_error": best["benchmark_mean_error"],
                              "difference_to_default": best["benchmark_mean_error"] - default["benchmark_mean_error"]},
    }


def one_seed_spearman(trials: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Spearman over every trial with a value on validation seed `seed` (completed or stopped by ASHA
    after it), against its benchmark error on the first benchmark seed."""
    ranked = [t for t in trials if not t["validation_diverged"] and t["validation_seed_objective"] is not None]
    bench = [next(iter(t["benchmark_per_seed"].values())) for t in ranked]
    return {"validation_seed": seed, "trials": len(ranked),
            "validation_objective_vs_benchmark": spearman([t["validation_seed_objective"] for t in ranked], bench),
            "validation_mean_error_vs_benchmark": spearman([t["validation_seed_mean_error"] for t in ranked], bench)}


def short_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict[str, Any], source: str, cfg: SearchConfig, protocol: dict[str, Any],
             decision: dict[str, Any], command: list[str]) -> str:
    seeds = protocol["seeds"]
    rows = [[t["trial_id"], "+".join(t["roles"]), short_params(t["params"]),
             "diverged" if t["validation_diverged"] else number(t["validation_objective"]),
             "-" if t["validation_diverged"] else number(t["validation_mean_error"]),
             number(t["benchmark_mean_error"])
             + (f" ± {t['benchmark_seed_std']:.2f}" if t["benchmark_seed_std"] is not None else "")
             + (f" (seed {next(iter(t['benchmark_per_seed']))})" if len(t["benchmark_per_seed"]) < len(seeds) else "")]
            for t in summary["trials"]]
    rho, comp = summary["spearman"], summary["chosen_vs_default"]
    best = summary["best_on_benchmark"]
    return "\n".join([
        f"# Search transfer: {cfg.name} ({cfg.method})", "",
        f"Search record: `{source}`. Command: `python {' '.join(command)}`", "",
        f"Benchmark: {protocol['benchmark']}, {len(protocol['domains'])} domains "
        f"({', '.join(protocol['domains'][:3])}, ...), {protocol['num_images_per_domain']} images each, "
        f"{protocol['setting']}, batch {protocol['batch_size']}, stream seeds {seeds}; source "
        f"{Path(protocol['source_checkpoint']).name} (sha256 {protocol['source_checkpoint_sha256'][:12]}).",
        f"Decision of the search: {decision.get('chosen')} ({decision.get('why')}).", "",
        markdown_table(["trial", "role", "params", "validation objective", "validation mean error",
                        f"benchmark mean error (seeds {', '.join(map(str, seeds))})"], rows), "",
        f"Spearman over {rho['trials']} trials (diverged ones left out): validation objective vs benchmark "
        f"{number(rho['validation_objective_vs_benchmark'])}, validation mean error vs benchmark "
        f"{number(rho['validation_mean_error_vs_benchmark'])}.",
        *([] if "spearman_one_seed" not in summary else [
            f"On validation seed {summary['spearman_one_seed']['validation_seed']} alone, over "
            f"{summary['spearman_one_seed']['trials']} trials (the ASHA-stopped ones too) against the first benchmark "
            f"seed: objective {number(summary['spearman_one_seed']['validation_objective_vs_benchmark'])}, "
            f"mean error {number(summary['spearman_one_seed']['validation_mean_error_vs_benchmark'])}."]),
        f"Chosen ({comp['chosen']}, {comp['chosen_trial_id']}) vs default on the benchmark: "
        f"{comp['chosen_benchmark']:.2f} vs {comp['default_benchmark']:.2f}, difference {comp['difference']:+.2f}: "
        f"at or below: {'yes' if comp['at_or_below'] else 'no'}; strictly below: {'yes' if comp['strictly_below'] else 'no'}.",
        f"Best trial on the benchmark: {best['trial_id']} ({best['benchmark_mean_error']:.2f}, "
        f"{best['difference_to_default']:+.2f} vs the default).", ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("search", help="a search's output directory, its search.json, or a models:/ settings URI")
    parser.add_argument("--config", default=None, help="the search YAML, for a record without its config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the search config (repeatable)")
    parser.add_argument("--top-k", type=int, default=5, help="searched trials with the lowest validation value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="benchmark stream seeds")
    parser.add_argument("--name", default=None, help="output stem (default: search_transfer_<search name>)")
    parser.add_argument("--device", default=None, help="overrides the search config's device")
    parser.add_argument("--include-stopped", action="store_true",
                        help="also the trials ASHA stopped after the first validation seed, run on the first "
                             "benchmark seed only and ranked on that validation seed")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error("--top-k must be >= 0")
    setup_logging()
    record, source = load_record(args.search)
    cfg = transfer_config(record, args.config, args.overrides + ([f"device={args.device}"] if args.device else []))
    stopped_seed = cfg.validation.seeds[0] if args.include_stopped else None
    rows = select_trials(record, cfg.metric, args.top_k, stopped_seed)
    log.info("%s: running %d trials (%s) on the benchmark, seeds %s", cfg.name, len(rows),
             ", ".join(r["trial"]["trial_id"] for r in rows), args.seeds)
    errors, protocol = benchmark_errors(cfg, rows, args.seeds, resolve_device(cfg.device))
    summary = summarize(record, rows, errors, cfg.metric, stopped_seed)
    command = benchmark_command(__file__, argv if argv is not None else sys.argv[1:])
    stem = args.name or f"search_transfer_{cfg.name}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "search": source, "search_name": cfg.name, "method": cfg.method,
              "decision": record["decision"], "validation_rank_correlation": record.get("rank_correlation"),
              "protocol": protocol, **summary}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(summary, source, cfg, protocol, record["decision"], command)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(run_main(main))
