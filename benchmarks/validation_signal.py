"""Which validation domains rank settings as the benchmark does? Re-score a search's trials on
candidate validation designs, cheaply, against their benchmark errors (issue 22).

A finished transfer measurement (benchmarks/results/search_transfer_<name>.json, written by
benchmarks/search_transfer.py) holds a search's trials with their parameters and their mean
error on the benchmark. This script runs each of those trials, and BN (the no-adaptation
reference), through the search's own trial code (`metatta.search.run_trial`: the same stream
setting, batch, seeds and objective) on the validation domains of every `--variant` (a
`validation:` section of the search config, as YAML), keeps every per-seed, per-domain error, and
reports, per variant:
- BN's and the default's error per validation domain, and the spread across trials (does the
  domain separate settings at all?);
- Spearman's rank correlation over the trials between the benchmark mean error and each
  aggregate of the validation errors (`AGGREGATES`): the search's objective, the plain mean, the
  mean over the domains where BN's error is at least a threshold, the mean of the errors relative
  to BN's (a ratio, so it weights domains by 1 / BN error) and the worst domain gain over BN.

Nothing here reads a test image for validation: the validation domains are built by
`metatta.search.validation_data` (clean training split, held-out corruptions and their
compositions, provenance checked). The benchmark errors are read from the transfer file.

    python benchmarks/validation_signal.py benchmarks/results/search_transfer_palm_n200_noasha.json \\
        --variant base='{}' --variant composed='{compositions: [gaussian_blur-5+spatter-3]}' \\
        --set benchmark.num_images=200 --name validation_signal_palm_n200
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from metatta.cli import run_main, setup_logging
from metatta.config import apply_override, load_config
from metatta.reporting import benchmark_command, markdown_table
from metatta.safe_files import read_json_file
from metatta.search import SearchConfig, run_trial, search_config, validation_data
from metatta.search_protocol import spearman
from metatta.source import source_checkpoint

HERE = Path(__file__).resolve().parent
BN = "bn"
log = logging.getLogger("validation_signal")


def errors_matrix(metrics: dict[str, Any], seeds: list[int], domains: list[str]) -> np.ndarray:
    """(seeds, domains) validation errors of one trial."""
    return np.array([[metrics[f"seed{s}/error/{d}"] for d in domains] for s in seeds])


def _mean_above(threshold: float) -> Callable[[np.ndarray, np.ndarray], float]:
    def aggregate(errors: np.ndarray, bn: np.ndarray) -> float:
        keep = bn.mean(axis=0) >= threshold
        return float(errors[:, keep].mean()) if keep.any() else float("nan")
    return aggregate


AGGREGATES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mean": lambda e, bn: float(e.mean()),
    "worst_domain": lambda e, bn: float(e.max(axis=1).mean()),
    "objective_0.25": lambda e, bn: float((0.75 * e.mean(axis=1) + 0.25 * e.max(axis=1)).mean()),
    "mean_bn>=20": _mean_above(20.0),
    "mean_bn>=30": _mean_above(30.0),
    "ratio_to_bn": lambda e, bn: float((e / np.maximum(bn, 1e-9)).mean()),
    "worst_gain_over_bn": lambda e, bn: float((e - bn).max(axis=1).mean()),
}


def variant_config(base: dict[str, Any], validation: dict[str, Any]) -> SearchConfig:
    data = copy.deepcopy(base)
    data["validation"] = {**data.get("validation", {}), **validation}
    return search_config(data)


def run_variant(cfg: SearchConfig, trials: list[dict[str, Any]], checkpoint: str) -> dict[str, Any]:
    """Every trial's and BN's per-seed, per-domain validation errors on `cfg`'s validation."""
    seeds = cfg.validation.seeds
    held = {s: validation_data(cfg, s) for s in seeds}
    domains = [d.name for d in held[seeds[0]].domains]
    bn_cfg = dataclasses.replace(cfg, method=BN, method_config={}, space={})
    out = {"domains": domains, "seeds": seeds, "trials": {}}
    for trial_id, trial_cfg, params in [(BN, bn_cfg, {})] + [(t["trial_id"], cfg, t["params"]) for t in trials]:
        start = time.perf_counter()
        metrics = run_trial(trial_cfg, params, checkpoint, validation=held)
        if metrics["diverged"]:
            out["trials"][trial_id] = {"diverged": metrics["diverged_reason"]}
            log.info("%s: diverged (%s)", trial_id, metrics["diverged_reason"])
            continue
        out["trials"][trial_id] = {"objective": metrics["objective"], "mean_error": metrics["mean_error"],
                                   "errors": errors_matrix(metrics, seeds, domains).tolist()}
        log.info("%s: objective %.2f, mean %.2f (%.0f s)", trial_id, metrics["objective"], metrics["mean_error"],
                 time.perf_counter() - start)
    return out


def summarize_variant(measured: dict[str, Any], benchmark: dict[str, float]) -> dict[str, Any]:
    """Per-domain separation and the Spearman of every aggregate against the benchmark."""
    trials = {k: v for k, v in measured["trials"].items() if k != BN and "errors" in v}
    bn = np.array(measured["trials"][BN]["errors"])
    ids = [k for k in trials if k in benchmark]
    bench = [benchmark[k] for k in ids]
    per_trial = {k: np.array(trials[k]["errors"]) for k in ids}
    rho = {}
    for name, aggregate in AGGREGATES.items():
        values = [aggregate(per_trial[k], bn) for k in ids]
        rho[name] = None if any(np.isnan(values)) else spearman(values, bench)
    rho["search_objective"] = spearman([trials[k]["objective"] for k in ids], bench)
    domain_means = np.array([per_trial[k].mean(axis=0) for k in ids])  # (trials, domains)
    per_domain = [{"domain": d, "bn": float(bn[:, j].mean()),
                   "default": float(per_trial["default"][:, j].mean()) if "default" in per_trial else None,
                   "trial_min": float(domain_means[:, j].min()), "trial_max": float(domain_means[:, j].max()),
                   "spearman_vs_benchmark": spearman(domain_means[:, j], bench)}
                  for j, d in enumerate(measured["domains"])]
    return {"trials": len(ids), "spearman": rho, "per_domain": per_domain,
            "diverged": sorted(k for k, v in measured["trials"].items() if "diverged" in v)}


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def markdown(results: dict[str, Any], command: list[str]) -> str:
    lines = ["# Validation signal: which validation domains rank settings as the benchmark does", "",
             f"Command: `python {' '.join(command)}`", "",
             f"Trials and their benchmark errors: `{results['transfer']}` ({results['trials']} trials); "
             f"validation: {results['num_images']} images per domain, seeds {results['seeds']}.", ""]
    names = list(AGGREGATES) + ["search_objective"]
    lines += ["## Spearman over the trials, validation aggregate vs benchmark mean error", "",
              markdown_table(["variant", "domains"] + names,
                             [[v, str(len(r["measured"]["domains"]))] + [number(r["summary"]["spearman"][n]) for n in names]
                              for v, r in results["variants"].items()]), ""]
    for variant, r in results["variants"].items():
        lines += [f"## {variant}: `{json.dumps(r['validation'])}`", "",
                  markdown_table(["domain", "BN", "default", "trials min", "trials max", "Spearman vs benchmark"],
                                 [[d["domain"], f"{d['bn']:.1f}", "-" if d["default"] is None else f"{d['default']:.1f}",
                                   f"{d['trial_min']:.1f}", f"{d['trial_max']:.1f}", number(d["spearman_vs_benchmark"])]
                                  for d in r["summary"]["per_domain"]]), ""]
        if r["summary"]["diverged"]:
            lines += [f"Diverged on this validation: {', '.join(r['summary']['diverged'])}.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("transfer", help="a benchmarks/search_transfer.py result JSON (trials and benchmark errors)")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=YAML",
                        help="a validation design: NAME='{compositions: [...], severities: [...]}' (repeatable)")
    parser.add_argument("--config", default="configs/fmnist_c/tune_palm.yaml", help="the search config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="validation_signal")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    setup_logging()
    transfer = read_json_file(Path(args.transfer), "transfer result")
    benchmark = {t["trial_id"]: t["benchmark_mean_error"] for t in transfer["trials"] if not t["validation_diverged"]}
    trials = [t for t in transfer["trials"] if not t["validation_diverged"]]
    base = load_config(args.config)
    for item in args.overrides:
        apply_override(base, item)
    source = search_config(copy.deepcopy(base)).source
    checkpoint = str(source_checkpoint(source.checkpoint, source.config))
    command = benchmark_command(__file__, argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {"command": command, "transfer": args.transfer, "trials": len(trials), "variants": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for item in args.variant:
        name, _, text = item.partition("=")
        validation = yaml.safe_load(text) or {}
        cfg = variant_config(base, validation)
        results.update(num_images=cfg.validation.num_images or cfg.benchmark.num_images, seeds=cfg.validation.seeds)
        log.info("variant %s: %s", name, validation)
        measured = run_variant(cfg, trials, checkpoint)
        results["variants"][name] = {"validation": validation, "measured": measured,
                                     "summary": summarize_variant(measured, benchmark)}
        log.info("variant %s: Spearman %s", name, results["variants"][name]["summary"]["spearman"])
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str))  # after every variant
        (out / f"{args.name}.md").write_text(markdown(results, command))
    print(markdown(results, command))
    return results


if __name__ == "__main__":
    sys.exit(run_main(main))
