"""The repository's scripts (launch/, benchmarks/) are files, not a package: tests load them
as modules from their path."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """`launch/evaluate.py` -> the module `launch_evaluate`, freshly executed."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location("_".join(Path(relative_path).with_suffix("").parts), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
