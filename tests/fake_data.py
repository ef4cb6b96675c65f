"""Fake datasets shared by tests."""
from __future__ import annotations

import numpy as np

from metatta.data import fashion_mnist


def serve_train_split_only(monkeypatch, num_images: int):
    """Clean Fashion-MNIST of `num_images` random images whose test split cannot be read; returns
    (images, labels, the list of splits asked for)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_images, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, num_images).astype(np.int64)
    asked = []

    def load(split="test", root=None):
        asked.append(split)
        if split != "train":
            raise AssertionError(f"the {split} split was read")
        return images.copy(), labels.copy()

    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", load)
    return images, labels, asked
