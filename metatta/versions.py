"""Versions of the libraries a result or checkpoint depends on, for its provenance record.

Used by `metatta.evaluation` (the protocol of every result) and
`metatta.models.checkpoint` (checkpoint headers); it imports neither.
"""
from __future__ import annotations

import importlib.metadata
import platform

import metatta

OPTIONAL = ("timm", "higher")


def library_versions() -> dict[str, str]:
    import numpy as np
    import torch
    import torchvision

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "metatta": metatta.__version__,
    }
    for name in OPTIONAL:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # optional for the protocol: record only what is installed
    return versions
