"""What every launcher shares: `--config FILE key.sub=value ...`, `--device`, logging,
and `run_main`, which turns user errors into one line on stderr.

User errors (a bad config or override, a missing or unwritable file, an unknown
name) end a launcher with `error: <message>` on stderr and exit status 2, with
no traceback; `--debug` (or `METATTA_DEBUG=1`) re-raises them with the
traceback. Which exceptions count as user errors is `is_user_error`:

- `UserError`, and `ValueError` (the project raises ValueError, and its
  subclass `metatta.config.ConfigError`, for every value that fails a check);
- an `OSError` about a named file (missing, not readable/writable, a directory
  where a file was wanted);
- an MLflow error (an unknown registered model, version or alias).

Anything else is a bug and keeps its traceback. Dotted overrides may come
before, between or after the options (`parse_intermixed_args`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from metatta.config import load_config

USER_ERROR_STATUS = 2


class UserError(Exception):
    """An error in what the user asked for (not a bug): reported in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error: ...` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_STATUS, f"error: {message} (see {self.prog} --help)\n")


def experiment_parser(description: str, default_config: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="YAML experiment file (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (overrides the config)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stream.batch_size=16 (any position)")
    return parser


def parse_experiment(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[Any, dict]:
    """Parse options and overrides in any order; load the config with the overrides applied."""
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.log_level)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    return args, load_config(args.config, overrides)


def setup_logging(level: str = "INFO") -> None:
    try:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    except ValueError:
        raise UserError(f"--log-level: unknown level {level!r} (DEBUG, INFO, WARNING, ERROR)") from None


def require_file(path: str | os.PathLike | None, field: str) -> None:
    """Fail early, naming `field`, when a file the run will read is not there."""
    if path is not None and not os.path.exists(path):
        raise UserError(f"{field}: no such file {str(path)!r}")


def require_writable_dir(path: str | os.PathLike, field: str) -> None:
    """Fail early, naming `field`, when output cannot go under directory `path`
    (it is created if missing, like the run would)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{field}: cannot create output directory {str(path)!r} ({e.strerror or e})") from None
    if not os.path.isdir(path):
        raise UserError(f"{field}: {str(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{field}: output directory {str(path)!r} is not writable")


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, ValueError)):
        return True
    if isinstance(exc, OSError):
        return exc.filename is not None or isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                                                            NotADirectoryError, FileExistsError))
    return any(cls.__name__ == "MlflowException" for cls in type(exc).__mro__)


def error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        target = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{target}: {exc.strerror or exc}"
    message = " ".join(str(exc).split())  # one line
    return message or type(exc).__name__


def _debug_requested(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("METATTA_DEBUG", "") not in ("", "0")


def run_main(main: Callable[..., Any], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a user error becomes `error: <message>` on stderr and status 2.

    Use as `sys.exit(run_main(main))` under `if __name__ == "__main__":`.
    """
    try:
        main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        if not is_user_error(exc) or _debug_requested(argv):
            raise
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0
