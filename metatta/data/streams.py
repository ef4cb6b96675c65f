"""Test streams: the order in which a TTA method sees corrupted images.

Settings:
- episodic: domain by domain; the evaluator resets the method at each domain change.
- continual: domain by domain, never reset (CoTTA's continual setting).
- gradual: per corruption the severity goes 1,2,3,4,5,4,3,2,1 (CoTTA's gradual
  setting), corruptions one after another, never reset. Needs all 5 severities.
- mixed: every domain shuffled into one stream (SAR's "mixed domain shifts").
- label_shift: non-i.i.d. labels within each domain: for each slot of
  `slot_size` images a class distribution is drawn from Dirichlet(alpha) and the
  slot is filled by sampling classes from it without replacement (NOTE/RoTTA's
  temporally correlated protocol; smaller alpha, stronger correlation). The
  stream still holds every image exactly once.

Images stay uint8 NHWC until a batch is requested; each batch is converted to
float (B, C, H, W) in [0, 1].
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
import torch

from metatta.data.types import Batch, DomainData

SETTINGS = ("episodic", "continual", "gradual", "mixed", "label_shift")
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def check_images(x: torch.Tensor, where: str = "images") -> torch.Tensor:
    """Validate a model input batch: float (B, C, H, W), C in {1, 3}, no NaN."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{where}: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{where}: expected a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{where}: expected 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if torch.isnan(x).any():
        raise ValueError(f"{where}: contains NaN pixels")
    return x


def check_domain(d: DomainData) -> DomainData:
    images, labels = d.images, d.labels
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{d.name}: images must be uint8 (N, H, W, C) with C in 1 or 3, "
                         f"got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{d.name}: {len(labels)} labels for {len(images)} images")
    return d


@dataclasses.dataclass
class _Segment:
    domain: DomainData
    order: np.ndarray  # row indices into domain.images


class Stream:
    """An iterable of `Batch`es; `len()` is the number of batches."""

    def __init__(self, segments: list[_Segment], setting: str, batch_size: int):
        self.segments, self.setting, self.batch_size = segments, setting, batch_size
        self.resets_per_domain = setting == "episodic"

    @property
    def num_images(self) -> int:
        return sum(len(s.order) for s in self.segments)

    @property
    def domain_names(self) -> list[str]:
        return [s.domain.name for s in self.segments]

    def __len__(self) -> int:
        return sum(-(-len(s.order) // self.batch_size) for s in self.segments)

    def __iter__(self) -> Iterator[Batch]:
        for seg in self.segments:
            for start in range(0, len(seg.order), self.batch_size):
                rows = seg.order[start:start + self.batch_size]
                yield _batch(seg, rows)


class MixedStream(Stream):
    """All domains interleaved at random; a batch may hold several domains, and
    is named after the domain of most of its images."""

    def __init__(self, segments: list[_Segment], batch_size: int, rng: np.random.Generator):
        super().__init__(segments, "mixed", batch_size)
        pairs = np.concatenate([np.stack([np.full(len(s.order), i), s.order], 1) for i, s in enumerate(segments)])
        self.pairs = pairs[rng.permutation(len(pairs))]

    def __len__(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.pairs), self.batch_size):
            chunk = self.pairs[start:start + self.batch_size]
            parts = [_batch(self.segments[i], chunk[chunk[:, 0] == i, 1]) for i in np.unique(chunk[:, 0])]
            # Keep the stream order within the batch: reorder the concatenation back.
            x = torch.cat([p.x for p in parts])
            y = torch.cat([p.y for p in parts])
            seg_ids = np.concatenate([np.full(int((chunk[:, 0] == i).sum()), i) for i in np.unique(chunk[:, 0])])
            majority = np.bincount(chunk[:, 0]).argmax()
            order = _restore_order(chunk[:, 0], seg_ids)
            yield Batch(x[order], y[order], self.segments[majority].domain.name)


def _restore_order(wanted: np.ndarray, grouped: np.ndarray) -> torch.Tensor:
    """Permutation taking the grouped-by-segment rows back to stream order."""
    position = np.argsort(np.argsort(wanted, kind="stable"), kind="stable")
    return torch.from_numpy(np.argsort(grouped, kind="stable")[position])


def _batch(seg: _Segment, rows: np.ndarray) -> Batch:
    x = torch.from_numpy(np.ascontiguousarray(seg.domain.images[np.sort(rows)][_unsort(rows)]))
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(np.asarray(seg.domain.labels[rows], dtype=np.int64))
    return Batch(x, y, seg.domain.name)


def _unsort(rows: np.ndarray) -> np.ndarray:
    # Fancy indexing of a memory map is fastest with sorted rows; undo the sort afterwards.
    return np.argsort(np.argsort(rows, kind="stable"), kind="stable")


def build_stream(
    domains: Sequence[DomainData],
    setting: str,
    batch_size: int,
    seed: int = 0,
    *,
    shuffle: bool = True,
    dirichlet_alpha: float = 0.1,
    slot_size: int | None = None,
) -> Stream:
    """A stream over `domains` (in the given order) for `setting`; deterministic for `seed`."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown stream setting {setting!r}; known: {', '.join(SETTINGS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not domains:
        raise ValueError("build_stream: no domains given")
    domains = [check_domain(d) for d in domains]
    rng = np.random.default_rng(seed)
    if setting == "gradual":
        domains = _gradual_order(domains)

    def order(d: DomainData) -> np.ndarray:
        return rng.permutation(len(d)) if shuffle else np.arange(len(d))

    if setting == "label_shift":
        if not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha!r}")
        segments = [_Segment(d, _label_shift_order(np.asarray(d.labels), dirichlet_alpha,
                                                   slot_size or batch_size, rng)) for d in domains]
        return Stream(segments, setting, batch_size)
    segments = [_Segment(d, order(d)) for d in domains]
    if setting == "mixed":
        return MixedStream(segments, batch_size, rng)
    return Stream(segments, setting, batch_size)


def _gradual_order(domains: list[DomainData]) -> list[DomainData]:
    by_key = {(d.corruption, d.severity): d for d in domains}
    corruptions = list(dict.fromkeys(d.corruption for d in domains))
    missing = [f"{c}-{s}" for c in corruptions for s in range(1, 6) if (c, s) not in by_key]
    if missing:
        raise ValueError(f"gradual setting needs severities 1-5 of every corruption; missing {missing}")
    return [by_key[(c, s)] for c in corruptions for s in GRADUAL_SEVERITIES]


def _label_shift_order(labels: np.ndarray, alpha: float, slot_size: int, rng: np.random.Generator) -> np.ndarray:
    """Order rows so that each slot's classes follow a fresh Dirichlet(alpha) draw."""
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    out: list[int] = []
    while len(out) < len(labels):
        weights = rng.dirichlet(np.full(len(classes), alpha))
        for _ in range(slot_size):
            alive = np.array([len(pools[c]) > 0 for c in classes])
            if not alive.any():
                break
            p = weights * alive
            p = p / p.sum() if p.sum() > 0 else alive / alive.sum()
            c = classes[rng.choice(len(classes), p=p)]
            out.append(pools[c].pop())
    return np.asarray(out, dtype=np.int64)
