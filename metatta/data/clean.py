"""Clean datasets as (uint8 images (N, H, W, C), int64 labels (N,)) pairs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CLEAN_DATASETS = ("fashion_mnist", "cifar10", "cifar100")


def load_clean(dataset: str, split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset == "fashion_mnist":
        from metatta.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(split, None if root is None else str(root))
    if dataset in ("cifar10", "cifar100"):
        from torchvision.datasets import CIFAR10, CIFAR100

        root = Path(root or os.environ.get("METATTA_DATA") or Path.home() / ".cache" / "metatta" / "data")
        cls = CIFAR10 if dataset == "cifar10" else CIFAR100
        try:
            data = cls(str(root), train=split == "train", download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(f"{dataset} not found under {root} (torchvision layout expected): {e}") from None
        return np.asarray(data.data, dtype=np.uint8), np.asarray(data.targets, dtype=np.int64)
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(CLEAN_DATASETS)}")


def imagenet_folder(root: str | Path, transform=None):
    """An ImageNet-style folder (one subfolder per wnid) as a torchvision ImageFolder."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet folder not found: {root}")
    return ImageFolder(str(root), transform=transform)
