"""Test streams: the order in which a TTA method sees the corrupted images.

`build_stream(domains, setting, batch_size, seed=0, **options)` returns a `Stream`,
an iterable of `Batch(x, y, domain)`. A stream is a list of segments; a batch
never spans two segments, so the last batch of each segment may be smaller.
`Batch.domain` is the segment's name (`"fog-5"`, or `"mixed"`).

Settings (options in brackets):
- episodic [shuffle]: domain by domain, in the order given; `resets_per_domain`
  is True, so the evaluator resets the method at every domain change.
- continual [shuffle]: domain by domain, never reset (CoTTA's continual
  setting). A domain may be listed twice (repeated rounds).
- gradual [shuffle, start_high]: for each corruption, in order of first
  appearance, the severity moves 1,2,3,4,5,4,3,2,1 and the corruption changes at
  the lowest severity; never reset. As in the CoTTA authors' code
  (cifar10c_gradual.py), the first corruption starts at severity 5 and runs
  5,4,3,2,1 "to simulate the large gap between the source and the first target
  domain" (`start_high=True`, the default); `start_high=False` gives
  1,2,3,4,5,4,3,2,1 for every corruption (the sequence the CoTTA paper writes).
  Needs severities 1-5 of every corruption; a severity segment holds all the
  images of that (corruption, severity), so images recur.
- mixed: all images of all domains shuffled into one segment named "mixed"
  (SAR's mixed domain shifts), never reset; one error is reported for it.
- label_shift [shuffle, dirichlet_alpha=0.1, num_slots]: non-i.i.d. labels
  within each domain, domains in order, never reset. The protocol of NOTE as
  implemented in RoTTA (`LabelDirichletDomainSequence`, core/data/ttasampler.py):
  per domain, the stream is cut into `num_slots` time slots (default: the
  number of classes, at most 100); each class's images are split over the slots
  in proportions drawn from Dirichlet(dirichlet_alpha) (one draw per class), and
  each slot lists its classes' chunks one after another, in random order.
  Smaller alpha: each class crowds into fewer slots, so batches hold fewer
  classes. Even a large alpha is not i.i.d., since a class's chunk stays
  contiguous within its slot. Every image appears exactly once.

Generated settings (GENERATED_SETTINGS; not lists of rows of the domains given):
- ccc [model (required), difficulty, target_accuracy, tolerance, num_images,
  transition_images, corruptions, calibration_images, cache]: Continuously
  Changing Corruptions, generated lazily from one domain of clean test images;
  the corruption blends from one (corruption, severity) to the next along a walk
  that holds the source model's accuracy near a target. See metatta/data/ccc.py
  (a `CCCStream`, not a `Stream`: the same iteration interface).

`shuffle` (default True) shuffles the images within each domain (for
label_shift, within each class). Order is a fixed function of (seed, domain
name, occurrence of that name in the stream): a domain is seen in the same
order whatever other domains share its stream.

Images stay uint8 (N, H, W, C) (memory maps for -C files) until a batch is
requested; each batch is converted to float32 (B, C, H, W) in [0, 1].
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from metatta.data import ccc
from metatta.data.domains import SEVERITIES
from metatta.data.types import Batch, DomainData

SETTINGS = ("episodic", "continual", "gradual", "mixed", "label_shift")
GENERATED_SETTINGS = ("ccc",)  # options: ccc.OPTIONS
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)
GRADUAL_FIRST_HIGH = (5, 4, 3, 2, 1)  # CoTTA's code: the first corruption starts at severity 5
OPTIONS: dict[str, dict[str, Any]] = {
    "episodic": {"shuffle": True},
    "continual": {"shuffle": True},
    "gradual": {"shuffle": True, "start_high": True},
    "mixed": {},
    "label_shift": {"shuffle": True, "dirichlet_alpha": 0.1, "num_slots": None},
}
MIXED = "mixed"


# ---- validation -------------------------------------------------------------------------------------
def check_images(x: torch.Tensor, name: str = "x", check_values: bool = True) -> torch.Tensor:
    """Validate a model input batch: a float tensor (B, C, H, W) with C in {1, 3} and no NaN or inf.

    Raises ValueError naming `name` (the field) and what is wrong; returns x unchanged.
    check_values=False skips the NaN/inf scan (for data that cannot hold them, e.g. from uint8)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype (images in [0, 1]), got dtype {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if check_values and not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite pixels")
    return x


def check_domain(d: DomainData) -> DomainData:
    """Validate a domain: images uint8 (N, H, W, C), C in {1, 3}; labels integer (N,), N >= 1."""
    if not isinstance(d, DomainData):
        raise ValueError(f"domains: expected DomainData, got {type(d).__name__}")
    images, labels = d.images, d.labels
    if getattr(images, "dtype", None) != np.uint8 or getattr(images, "ndim", None) != 4 \
            or images.shape[-1] not in (1, 3):
        raise ValueError(f"{d.name}: images must be uint8 (N, H, W, C) with C in 1 or 3, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{d.name}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{d.name}: {len(labels)} labels for {len(images)} images")
    if len(labels) == 0:
        raise ValueError(f"{d.name}: the domain has no images")
    return d


# ---- the stream -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of images that batches do not cross: image k is row `rows[k]` of `domains[sources[k]]`."""

    name: str
    sources: np.ndarray  # int64 (M,), index into Stream.domains
    rows: np.ndarray  # int64 (M,)

    def __len__(self) -> int:
        return len(self.rows)


class Stream:
    """Batches of a test stream. Iterable (any number of times, always the same batches).

    Attributes: `setting`, `batch_size`, `seed`, `options` (the setting's options, defaults
    filled in), `resets_per_domain` (True for episodic: reset the method at every change of
    `Batch.domain`), `domains` (the DomainData given), `segments`. Properties: `num_images`
    (images yielded in total, repeats counted), `domain_names` (each segment's name, in
    stream order). `len(stream)` is the number of batches."""

    def __init__(self, domains: Sequence[DomainData], segments: Sequence[Segment], setting: str,
                 batch_size: int, seed: int, options: dict[str, Any]):
        self.domains = list(domains)
        self.segments = list(segments)
        self.setting = setting
        self.batch_size = batch_size
        self.seed = seed
        self.options = dict(options)
        self.resets_per_domain = setting == "episodic"

    @property
    def num_images(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def domain_names(self) -> list[str]:
        return [s.name for s in self.segments]

    def __len__(self) -> int:
        return sum(-(-len(s) // self.batch_size) for s in self.segments)

    def __iter__(self) -> Iterator[Batch]:
        for segment in self.segments:
            for start in range(0, len(segment), self.batch_size):
                stop = start + self.batch_size
                yield self._batch(segment.name, segment.sources[start:stop], segment.rows[start:stop])

    def __repr__(self) -> str:
        return (f"Stream(setting={self.setting!r}, batch_size={self.batch_size}, batches={len(self)}, "
                f"images={self.num_images}, segments={len(self.segments)})")

    def _batch(self, name: str, sources: np.ndarray, rows: np.ndarray) -> Batch:
        if (sources == sources[0]).all():
            images, labels = _fetch(self.domains[sources[0]], rows)
        else:  # mixed: gather per source domain, put each image back at its place in the stream
            first = self.domains[sources[0]].images
            images = np.empty((len(rows), *first.shape[1:]), dtype=np.uint8)
            labels = np.empty(len(rows), dtype=np.int64)
            for source in np.unique(sources):
                where = sources == source
                images[where], labels[where] = _fetch(self.domains[source], rows[where])
        # uint8 NHWC -> NCHW copy first (a quarter of the bytes of a float copy), then one float pass.
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
        return Batch(check_images(x, check_values=False), torch.from_numpy(labels), name)


def _fetch(domain: DomainData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and int64 labels of `rows` of a domain, in the order of `rows`."""
    order = np.argsort(rows, kind="stable")
    # Memory maps and lazy image files read fastest in ascending row order; undo the sort after.
    images = np.empty((len(rows), *domain.images.shape[1:]), dtype=np.uint8)
    images[order] = np.asarray(domain.images[rows[order]])
    labels = np.asarray(domain.labels)[rows].astype(np.int64)
    return images, labels


# ---- building ---------------------------------------------------------------------------------------
def build_stream(
    domains: Sequence[DomainData],
    setting: str,
    batch_size: int,
    seed: int = 0,
    **options: Any,
) -> Stream | ccc.CCCStream:
    """A stream over `domains` (in the order given) for `setting`; deterministic for `seed`.

    settings: see the module docstring and SETTINGS; options per setting: OPTIONS."""
    if setting not in SETTINGS + GENERATED_SETTINGS:
        raise ValueError(f"unknown stream setting {setting!r}; known: {', '.join(SETTINGS + GENERATED_SETTINGS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if setting == "ccc":
        return ccc.build_ccc_stream(domains, int(batch_size), int(seed), options)
    unknown = sorted(set(options) - set(OPTIONS[setting]))
    if unknown:
        allowed = ", ".join(OPTIONS[setting]) or "none"
        raise ValueError(f"stream option(s) {unknown} do not apply to setting {setting!r} (its options: {allowed})")
    opts = {**OPTIONS[setting], **options}
    domains = list(domains)
    if not domains:
        raise ValueError("domains: no domains given")
    for d in domains:
        check_domain(d)
    batch_size, seed = int(batch_size), int(seed)

    if setting in ("episodic", "continual"):
        plan = list(range(len(domains)))
    elif setting == "gradual":
        plan = _gradual_plan(domains, opts["start_high"])
    elif setting == "mixed":
        return Stream(domains, [_mixed_segment(domains, seed)], setting, batch_size, seed, opts)
    else:
        plan = list(range(len(domains)))
        alpha, num_slots = opts["dirichlet_alpha"], opts["num_slots"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
                or not 0 < alpha < float("inf"):
            raise ValueError(f"dirichlet_alpha must be a number > 0, got {alpha!r}")
        if num_slots is not None and (isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1):
            raise ValueError(f"num_slots must be an integer >= 1 or None, got {num_slots!r}")

    segments, seen = [], {}
    for index in plan:
        d = domains[index]
        occurrence = seen[d.name] = seen.get(d.name, -1) + 1
        rng = _rng(seed, d.name, occurrence)
        labels = np.asarray(d.labels)
        if setting == "label_shift":
            rows = _label_shift_rows(labels, float(opts["dirichlet_alpha"]), opts["num_slots"], opts["shuffle"], rng)
        else:
            rows = rng.permutation(len(labels)) if opts["shuffle"] else np.arange(len(labels))
        segments.append(Segment(d.name, np.full(len(rows), index, dtype=np.int64), rows.astype(np.int64)))
    return Stream(domains, segments, setting, batch_size, seed, opts)


def _rng(seed: int, name: str, occurrence: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(name.encode()), occurrence])


def _gradual_plan(domains: list[DomainData], start_high: bool) -> list[int]:
    by_key: dict[tuple[str, int], int] = {}
    for i, d in enumerate(domains):
        key = (d.corruption, int(d.severity))
        if key in by_key:
            raise ValueError(f"gradual setting: domain {d.name} is given twice")
        by_key[key] = i
    corruptions = list(dict.fromkeys(d.corruption for d in domains))
    missing = [f"{c}-{s}" for c in corruptions for s in SEVERITIES if (c, s) not in by_key]
    if missing:
        raise ValueError(f"gradual setting needs severities 1-5 of every corruption; missing {missing}")
    extra = [domains[i].name for (c, s), i in by_key.items() if s not in SEVERITIES]
    if extra:
        raise ValueError(f"gradual setting: severities must be 1-5, got domains {extra}")
    plan = []
    for k, c in enumerate(corruptions):
        sequence = GRADUAL_FIRST_HIGH if (k == 0 and start_high) else GRADUAL_SEVERITIES
        plan += [by_key[(c, s)] for s in sequence]
    return plan


def _mixed_segment(domains: list[DomainData], seed: int) -> Segment:
    shapes = {tuple(d.images.shape[1:]) for d in domains}
    if len(shapes) > 1:
        raise ValueError(f"mixed setting: all domains must have the same image shape, got {sorted(shapes)}")
    sources = np.concatenate([np.full(len(d.labels), i, dtype=np.int64) for i, d in enumerate(domains)])
    rows = np.concatenate([np.arange(len(d.labels), dtype=np.int64) for d in domains])
    order = _rng(seed, MIXED, 0).permutation(len(rows))
    return Segment(MIXED, sources[order], rows[order])


def _label_shift_rows(labels: np.ndarray, alpha: float, num_slots: int | None, shuffle: bool,
                      rng: np.random.Generator) -> np.ndarray:
    """Rows of one domain in NOTE/RoTTA's Dirichlet time-slot order (module docstring)."""
    classes = np.unique(labels)
    slots = num_slots or min(len(classes), 100)
    per_slot: list[list[np.ndarray]] = [[] for _ in range(slots)]
    proportions = rng.dirichlet(np.full(slots, alpha), size=len(classes))
    for c, p in zip(classes, proportions):
        rows = np.flatnonzero(labels == c)
        if shuffle:
            rows = rng.permutation(rows)
        cuts = (np.cumsum(p)[:-1] * len(rows)).astype(np.int64)
        for slot, chunk in enumerate(np.split(rows, cuts)):
            per_slot[slot].append(chunk)
    ordered = [chunks[i] for chunks in per_slot for i in rng.permutation(len(chunks))]
    return np.concatenate(ordered)
