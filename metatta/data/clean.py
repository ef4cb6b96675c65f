"""Clean datasets as (images uint8 (N, H, W, C), labels int64 (N,)) pairs.

- fashion_mnist: see metatta/data/fashion_mnist.py (local files first, download last).
- cifar10 / cifar100: torchvision's python-pickle layout (`cifar-10-batches-py/`,
  `cifar-100-python/`) under `root`, else under $METATTA_DATA, else under
  <cache root>/data (`metatta.paths.data_root`). Never downloaded here: fetch it once with
  `torchvision.datasets.CIFAR10(root, download=True)` on a machine with network.
- digits: scikit-learn's bundled handwritten digits (1,797 8x8 images, no download), upsampled
  to 28x28 like Fashion-MNIST; the first 1,400 train, the other 397 test. A small dataset that
  the shipped configs must also run on, and one a horizontal flip damages (`MIRROR_CHANGES_CLASS`).
- ImageNet: `imagenet_folder(root)` for a folder with one subfolder per wnid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metatta.data import fashion_mnist  # the module: tests replace its `load_fashion_mnist`
from metatta.paths import data_root

CLEAN_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "digits")
# Datasets whose labels a horizontal mirror changes (a mirrored 2, 3 or 7 is no digit): training
# augmentation never flips them. Fashion-MNIST and CIFAR classes are mirror-symmetric.
MIRROR_CHANGES_CLASS = frozenset({"digits"})
DIGITS_TRAIN_IMAGES = 1400


def flips_allowed(dataset: str) -> bool:
    """Whether training augmentation may mirror `dataset`'s images horizontally."""
    return dataset not in MIRROR_CHANGES_CLASS
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def load_clean(dataset: str, split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int64 (N,)) of `split` ("train" or "test") of `dataset`."""
    if dataset not in CLEAN_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(CLEAN_DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset == "fashion_mnist":
        return fashion_mnist.load_fashion_mnist(split, root)
    if dataset == "digits":
        return _load_digits(split)
    return _load_cifar(dataset, split, root)


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("dataset 'digits' is scikit-learn's: pip install scikit-learn") from None
    digits = load_digits()
    rows = slice(0, DIGITS_TRAIN_IMAGES) if split == "train" else slice(DIGITS_TRAIN_IMAGES, None)
    small = torch.from_numpy(digits.images[rows] / 16.0).float().unsqueeze(1)  # 17 gray levels, 0..16
    large = torch.nn.functional.interpolate(small, size=fashion_mnist.IMAGE_SHAPE, mode="bilinear", align_corners=False)
    images = (large.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images), digits.target[rows].astype(np.int64)


def _load_cifar(dataset: str, split: str, root: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import CIFAR10, CIFAR100

    folder = _CIFAR_FOLDERS[dataset]
    base = Path(root) if root is not None else data_root()
    if base.name == folder:  # the user pointed at the extracted folder itself
        base = base.parent
    if not (base / folder).is_dir():
        raise FileNotFoundError(
            f"{dataset} not found: expected torchvision's {folder}/ folder in {base}. Pass root= (or set "
            f"$METATTA_DATA) to the folder that contains {folder}/; to get it, run "
            f"torchvision.datasets.{'CIFAR10' if dataset == 'cifar10' else 'CIFAR100'}(root, download=True) "
            f"once on a machine with network.")
    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    try:
        data = cls(str(base), train=split == "train", download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (a checksum failed)
        raise ValueError(f"{base / folder}: {dataset} files are incomplete or corrupted ({e})") from None
    images = np.asarray(data.data, dtype=np.uint8)
    labels = np.asarray(data.targets, dtype=np.int64)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(labels) != len(images):
        raise ValueError(f"{base / folder}: expected uint8 (N, 32, 32, 3) images with N labels, got "
                         f"{images.shape} and {labels.shape}")
    return images, labels


def imagenet_folder(root: str | Path, transform=None):
    """An ImageNet-style folder (`<root>/<wnid>/<file>.JPEG`) as a torchvision ImageFolder.

    Class indices are the positions of the wnids in sorted order, the standard ImageNet
    class order, provided all 1,000 class folders are present."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet folder not found: {root}")
    return ImageFolder(str(root), transform=transform)
