"""What every launcher shares: `--config FILE key.sub=value ...`, `--device`, logging."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

from metatta.config import load_config


def experiment_parser(description: str, default_config: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML experiment file (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (overrides the config)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stream.batch_size=16")
    return parser


def parse_experiment(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[Any, dict]:
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    return args, load_config(args.config, overrides)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
