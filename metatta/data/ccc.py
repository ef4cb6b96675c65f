"""Continuously Changing Corruptions (CCC-style): a stream of any length whose corruption never
stops changing while the source model's accuracy stays near a target level.

The recipe (docs/lifelong.md compares it with the CCC authors' code, oripress/CCC):

- Nodes are single (corruption, integer severity) domains of the project's per-image-seeded
  torch corruptions (metatta/data/corruptions.py).
- Calibration: the source model's accuracy on every node, on `calibration_images` clean test
  images (a fixed subset, whatever the seed); then, for every pair of nodes within `tolerance`
  of the target, its accuracy on the halfway blend (0.5 a + 0.5 b, pixel-wise). Cached as JSON
  under <cache root>/ccc/, keyed on the model's weights, the clean images, the corruption set and
  the calibration size, so every seed and difficulty reuses it.
- The walk: a sequence of nodes. It starts at a random in-band node; from node a it picks the
  next corruption uniformly among those with an in-band node b whose halfway blend is in band
  too (CCC also draws the next noise at random), then the severity of that corruption whose
  transition's estimated mean accuracy (a + 2 mid + b) / 4 is closest to the target corrected
  for the walk's drift so far (CCC's walk keeps its running mean accuracy closest to the target).
- The stream: transition k runs over `transition_images` images, from node k to node k + 1;
  the image at offset u of it is (1 - t) node_k(x) + t node_k+1(x), t = u / transition_images,
  so the corruption changes with every image. Clean images x come in a fresh permutation of the
  test set per pass (seeded by (seed, pass)).

Laziness and speed: nothing is materialised up front. A node's corrupted copy of a clean image
is a fixed function of (seed, node, image index) (per-image corruption seeds), computed on first
use and kept while the node is live (at most three nodes: the ones of the current batch),
so memory is O(1) in the stream length and each node costs at most one corruption per clean
image however long it lasts. Any batch can be produced directly (`batch(i)`), so a run can
resume anywhere without replaying the images before it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from metatta.data.corruptions import VERSION as CORRUPTIONS_VERSION, corrupt
from metatta.data.domains import BENCHMARK_CORRUPTIONS, HELD_OUT_CORRUPTIONS, ALL_CORRUPTIONS, SEVERITIES
from metatta.data.types import Batch, DomainData
from metatta.paths import cache_root

log = logging.getLogger(__name__)

RECIPE_VERSION = 2  # bump when calibration or generation changes: old caches are then ignored
DIFFICULTIES = {"easy": 85.0, "medium": 70.0, "hard": 25.0}  # target source accuracy (%), Fashion-MNIST ResNet-8
CORRUPTION_SETS = {"benchmark": BENCHMARK_CORRUPTIONS, "held_out": HELD_OUT_CORRUPTIONS, "all": ALL_CORRUPTIONS}
OPTIONS: dict[str, Any] = {
    "model": None,  # the source model (nn.Module) the walk is calibrated against; required
    "difficulty": "medium",  # easy | medium | hard (DIFFICULTIES)
    "target_accuracy": None,  # percent; overrides the difficulty's target
    "tolerance": 7.5,  # percentage points: nodes and halfway blends within target +- tolerance are usable
    "num_images": 1_000_000,
    "transition_images": 50_000,  # images from one node to the next (CCC: 20k-200k per pair walk)
    "corruptions": "benchmark",  # benchmark | held_out | all | a list of names
    "calibration_images": 256,
    "cache": True,  # read and write the calibration under <cache root>/ccc/
}
CALIBRATION_SEED = 0  # calibration images and their corruption seeds do not depend on the stream seed
MAX_LIVE_NODES = 3
FILL_AHEAD = 4096  # a node's missing images are corrupted for this many upcoming positions at once:
# corruptions run 5-20x faster per image on a few thousand images than on one batch of 64


Node = tuple[str, int]  # (corruption, severity)


def node_name(node: Node) -> str:
    return f"{node[0]}-{node[1]}"


# ---- options -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CCCOptions:
    difficulty: str
    target_accuracy: float
    tolerance: float
    num_images: int
    transition_images: int
    corruptions: tuple[str, ...]
    calibration_images: int
    cache: bool


def check_options(options: dict[str, Any]) -> CCCOptions:
    """Validate the ccc options (defaults filled in); ValueError names the option."""
    def integer(name, low):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"stream setting 'ccc': {name} must be an integer >= {low}, got {value!r}")
        return int(value)

    def number(name, low, high):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not low <= float(value) <= high:
            raise ValueError(f"stream setting 'ccc': {name} must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    difficulty = options["difficulty"]
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"stream setting 'ccc': difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}")
    target = DIFFICULTIES[difficulty] if options["target_accuracy"] is None else number("target_accuracy", 0, 100)
    corruptions = options["corruptions"]
    if isinstance(corruptions, str):
        if corruptions not in CORRUPTION_SETS:
            raise ValueError(f"stream setting 'ccc': corruptions must be one of {list(CORRUPTION_SETS)} or a list "
                             f"of names, got {corruptions!r}")
        corruptions = CORRUPTION_SETS[corruptions]
    corruptions = tuple(corruptions)
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if unknown or len(set(corruptions)) < 2:
        raise ValueError(f"stream setting 'ccc': corruptions must name at least two distinct known corruptions, "
                         f"got {list(corruptions)}" + (f" (unknown: {unknown})" if unknown else ""))
    if not isinstance(options["cache"], bool):
        raise ValueError(f"stream setting 'ccc': cache must be true or false, got {options['cache']!r}")
    return CCCOptions(difficulty=difficulty, target_accuracy=target, tolerance=number("tolerance", 0, 100),
                      num_images=integer("num_images", 1), transition_images=integer("transition_images", 1),
                      corruptions=tuple(sorted(set(corruptions), key=corruptions.index)),
                      calibration_images=integer("calibration_images", 1), cache=options["cache"])


# ---- hashing and seeds ---------------------------------------------------------------------------------
def model_hash(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes, values), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def images_hash(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(f"{images.shape}|".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def corruption_seed_base(seed: int, node: Node, tag: str = "stream") -> int:
    """First per-image corruption seed of a node; image i uses base + i (< 2**63 for any image count < 2**40)."""
    digest = hashlib.blake2b(f"{tag}|{seed}|{node[0]}|{node[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 42 << 40  # 22 random high bits, 40 bits of room for image indices


def _rng(seed: int, tag: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(tag.encode()), index])


# ---- calibration ---------------------------------------------------------------------------------------
COARSE_IMAGES = 64  # every node is first measured on this many calibration images ...
COARSE_MARGIN = 8.0  # ... and measured on all of them only if within tolerance + this margin of the target
SEVERITIES_PER_CORRUPTION = 2  # the walk uses each corruption's in-band severities closest to the target
PAIR_IMAGES = 128  # halfway blends are measured on the first this many calibration images


@dataclasses.dataclass
class Calibration:
    """Source accuracy (%) on nodes and on the halfway blend of pairs of band nodes."""

    key: str
    coarse: dict[str, float]  # "fog-3" -> accuracy on the first COARSE_IMAGES images, every node
    nodes: dict[str, float]  # "fog-3" -> accuracy on all calibration images, nodes near the target only
    pairs: dict[str, float]  # "fog-3|snow-2" (names sorted) -> accuracy on 0.5 fog-3 + 0.5 snow-2
    seconds: float = 0.0  # wall time spent computing (0 when everything came from the cache)
    cpu_seconds: float = 0.0  # process CPU time spent computing

    def node(self, node: Node) -> float:
        name = node_name(node)
        return self.nodes[name] if name in self.nodes else self.coarse[name]

    def pair(self, a: Node, b: Node) -> float:
        return self.pairs["|".join(sorted((node_name(a), node_name(b))))]


def _as_float_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    correct = 0
    for start in range(0, len(x), 512):
        logits = model(x[start:start + 512].to(device))
        correct += int((logits.argmax(1).cpu() == y[start:start + 512]).sum())
    return 100.0 * correct / len(x)


def calibrate(model: nn.Module, images: np.ndarray, labels: np.ndarray, opts: CCCOptions) -> Calibration:
    """The calibration the walk needs for `opts` (its target band), from the cache where possible.

    Coarse to fine: every node on COARSE_IMAGES images; nodes that may be in band on all
    `calibration_images`; halfway blends of band pairs on PAIR_IMAGES images."""
    n = min(opts.calibration_images, len(labels))
    coarse_n, pair_n = min(COARSE_IMAGES, n), min(PAIR_IMAGES, n)
    identity = {"recipe": RECIPE_VERSION, "corruptions_version": CORRUPTIONS_VERSION, "model": model_hash(model),
                "images": images_hash(images, labels), "corruptions": sorted(opts.corruptions), "n": n,
                "coarse_n": coarse_n, "pair_n": pair_n}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root() / "ccc" / f"calibration-{key}.json"
    cal = Calibration(key, {}, {}, {})
    if opts.cache and path.is_file():
        data = json.loads(path.read_text())
        cal.coarse, cal.nodes, cal.pairs = dict(data["coarse"]), dict(data["nodes"]), dict(data["pairs"])
    wall, cpu = time.perf_counter(), time.process_time()
    rows = _rng(CALIBRATION_SEED, "ccc-calibration", 0).permutation(len(labels))[:n]
    x, y = _as_float_images(images[rows]), torch.from_numpy(np.asarray(labels)[rows].astype(np.int64))
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    corrupted: dict[Node, torch.Tensor] = {}  # node -> its first m calibration images, corrupted

    def corrupted_images(node: Node, m: int) -> torch.Tensor:
        done = corrupted.get(node, x[:0])
        if len(done) < m:  # extend; per-image seeds make the result independent of how it is split
            base = corruption_seed_base(CALIBRATION_SEED, node, "calibration")
            more = corrupt(x[len(done):m], node[0], node[1], [base + i for i in range(len(done), m)])
            done = corrupted[node] = torch.cat([done, more.mul_(255).round_().div_(255)])  # uint8 levels, as served
        return done[:m]

    changed = False
    try:
        for node in all_nodes(opts.corruptions):
            name = node_name(node)
            if name not in cal.coarse:
                cal.coarse[name] = _accuracy(model, corrupted_images(node, coarse_n), y[:coarse_n], device)
                changed = True
            near = abs(cal.coarse[name] - opts.target_accuracy) <= opts.tolerance + COARSE_MARGIN
            if near and name not in cal.nodes:
                cal.nodes[name] = _accuracy(model, corrupted_images(node, n), y, device)
                changed = True
        band = band_nodes(cal, opts)
        for i, a in enumerate(band):
            for b in band[i + 1:]:
                name = "|".join(sorted((node_name(a), node_name(b))))
                if a[0] != b[0] and name not in cal.pairs:
                    blend = corrupted_images(a, pair_n).add(corrupted_images(b, pair_n)).mul_(0.5)
                    cal.pairs[name] = _accuracy(model, blend, y[:pair_n], device)
                    changed = True
    finally:
        model.train(was_training)
    if changed:
        cal.seconds, cal.cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    if changed and opts.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"identity": identity, "coarse": cal.coarse, "nodes": cal.nodes,
                                   "pairs": cal.pairs}, indent=1))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        log.info("ccc calibration: %d nodes (%d fine), %d pairs in %.1f s (%.1f s CPU) -> %s", len(cal.coarse),
                 len(cal.nodes), len(cal.pairs), cal.seconds, cal.cpu_seconds, path)
    return cal


def all_nodes(corruptions: Sequence[str]) -> list[Node]:
    return [(c, s) for c in corruptions for s in SEVERITIES]


def _refined(cal: Calibration, node: Node, opts: CCCOptions) -> bool:
    """Whether this target measures the node on all calibration images. Decided from the coarse
    accuracy only, so that the band does not depend on what other targets put in the cache."""
    name = node_name(node)
    return name in cal.nodes and abs(cal.coarse[name] - opts.target_accuracy) <= opts.tolerance + COARSE_MARGIN


def band_nodes(cal: Calibration, opts: CCCOptions) -> list[Node]:
    """Nodes the walk may visit: measured on all calibration images, within tolerance of the
    target, at most SEVERITIES_PER_CORRUPTION per corruption (the closest to the target)."""
    band = []
    for c in opts.corruptions:
        near = [(c, s) for s in SEVERITIES if _refined(cal, (c, s), opts)
                and abs(cal.nodes[node_name((c, s))] - opts.target_accuracy) <= opts.tolerance]
        near.sort(key=lambda node: (abs(cal.node(node) - opts.target_accuracy), node[1]))
        band += sorted(near[:SEVERITIES_PER_CORRUPTION], key=lambda node: node[1])
    return band


# ---- the walk ------------------------------------------------------------------------------------------
class Walk:
    """Nodes 0, 1, 2, ... of the walk for (calibration, options, seed); node k is a function of
    node k - 1 and a generator seeded by (seed, k), computed on demand (the last one is kept,
    so a forward pass costs O(1) per node; going back replays from the start, O(k) table lookups)."""

    def __init__(self, cal: Calibration, opts: CCCOptions, seed: int):
        self.cal, self.opts, self.seed = cal, opts, seed
        self.band = band_nodes(cal, opts)
        corruptions = sorted({c for c, _ in self.band})
        if len(corruptions) < 2:
            found = ", ".join(f"{node_name(n)} {cal.node(n):.0f}" for n in all_nodes(opts.corruptions))
            raise ValueError(
                f"stream setting 'ccc': fewer than two corruptions have a severity whose source accuracy is within "
                f"{opts.tolerance} points of the target {opts.target_accuracy:.1f}% (difficulty {opts.difficulty!r}); "
                f"choose another difficulty, target_accuracy or a larger tolerance. Source accuracy per node: {found}")
        self._last: tuple[int, Node, float] = (0, self._start(), 0.0)  # (k, node k, sum of transition estimates)

    def _start(self) -> Node:
        return self.band[int(_rng(self.seed, "ccc-walk", 0).integers(len(self.band)))]

    def transition_accuracy(self, a: Node, b: Node) -> float:
        """Estimated mean source accuracy over the transition a -> b (trapezoid over t = 0, 0.5, 1)."""
        return (self.cal.node(a) + 2 * self.cal.pair(a, b) + self.cal.node(b)) / 4

    def next_node(self, a: Node, k: int, drift: float = 0.0) -> Node:
        """Node k after node a. `drift`: the estimated mean accuracy of the transitions so far minus
        the target; the severity is chosen for target - drift, pulling the running mean back to the
        target (CCC's walk also holds the running mean)."""
        target, tol = self.opts.target_accuracy, self.opts.tolerance
        others = [b for b in self.band if b[0] != a[0]]
        good = [b for b in others if abs(self.cal.pair(a, b) - target) <= tol]
        candidates = good or others  # no halfway blend in band: take the best transition there is
        corruptions = sorted({c for c, _ in candidates})
        chosen = corruptions[int(_rng(self.seed, "ccc-walk", k).integers(len(corruptions)))]
        options = [b for b in candidates if b[0] == chosen]
        return min(options, key=lambda b: (abs(self.transition_accuracy(a, b) - (target - drift)), b[1]))

    def __getitem__(self, k: int) -> Node:
        if k < 0:
            raise IndexError(k)
        index, node, total = self._last if self._last[0] <= k else (0, self._start(), 0.0)
        while index < k:
            drift = total / index - self.opts.target_accuracy if index else 0.0
            following = self.next_node(node, index + 1, drift)
            total += self.transition_accuracy(node, following)
            index, node = index + 1, following
        self._last = (index, node, total)
        return node


# ---- the stream ----------------------------------------------------------------------------------------
class CCCStream:
    """A CCC-style stream (module docstring). Iterable any number of times (same batches);
    `batch(i)` produces batch i directly. `len(stream)` is the number of batches.

    Attributes as `metatta.data.streams.Stream`: setting ("ccc"), batch_size, seed, options,
    resets_per_domain (False), num_images, domains ([the clean images]); plus `walk`,
    `calibration`, `opts` (validated options) and `name` (every batch's `Batch.domain`,
    "ccc-<difficulty>": the evaluator reports one error for the whole stream)."""

    setting = "ccc"
    resets_per_domain = False

    def __init__(self, clean: DomainData, model: nn.Module, batch_size: int, seed: int, options: dict[str, Any]):
        self.opts = check_options(options)
        self.domains = [clean]
        self.images = np.asarray(clean.images)
        self.labels = np.asarray(clean.labels).astype(np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.options = {k: v for k, v in options.items() if k != "model"}
        self.calibration = calibrate(model, self.images, self.labels, self.opts)
        self.walk = Walk(self.calibration, self.opts, seed)
        self.num_images = self.opts.num_images
        self.name = f"ccc-{self.opts.difficulty}"
        self._clean = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).contiguous()  # uint8
        self._live: dict[Node, tuple[np.ndarray, np.ndarray]] = {}  # node -> (uint8 NCHW images, filled mask)
        self._order: tuple[int, np.ndarray] | None = None
        self._filled_blocks: set[tuple[int, int]] = set()

    @property
    def domain_names(self) -> list[str]:
        return [self.name]

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __repr__(self) -> str:
        return (f"CCCStream(difficulty={self.opts.difficulty!r}, target={self.opts.target_accuracy}%, "
                f"images={self.num_images}, batch_size={self.batch_size}, seed={self.seed})")

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self.batch(i)

    # -- where image p comes from
    def clean_rows(self, positions: np.ndarray) -> np.ndarray:
        """Clean-image row of each stream position: a fresh permutation of the clean set per pass."""
        n = len(self.labels)
        rows = np.empty(len(positions), dtype=np.int64)
        passes = positions // n
        for p in np.unique(passes):
            if self._order is None or self._order[0] != p:
                self._order = (int(p), _rng(self.seed, "ccc-order", int(p)).permutation(n))
            where = passes == p
            rows[where] = self._order[1][positions[where] % n]
        return rows

    def state_at(self, position: int) -> tuple[Node, Node, float]:
        """(node from, node to, blend weight t) of the image at `position`."""
        k, offset = divmod(position, self.opts.transition_images)
        return self.walk[k], self.walk[k + 1], offset / self.opts.transition_images

    # -- generation
    def _node(self, node: Node) -> tuple[np.ndarray, np.ndarray]:
        if node in self._live:
            self._live[node] = self._live.pop(node)  # most recently used last
        else:
            while len(self._live) >= MAX_LIVE_NODES:
                self._live.pop(next(iter(self._live)))  # least recently used
                self._filled_blocks.clear()
            self._live[node] = (np.empty(self._clean.shape, dtype=np.uint8), np.zeros(len(self.labels), dtype=bool))
        return self._live[node]

    def _fill(self, node: Node, rows: np.ndarray) -> None:
        """Corrupt the clean `rows` the node does not hold yet (per-image seeds: the values do not
        depend on which images are corrupted together)."""
        store, filled = self._node(node)
        missing = np.unique(rows[~filled[rows]])
        if len(missing):
            base = corruption_seed_base(self.seed, node)
            x = self._clean[torch.from_numpy(missing)].float().div_(255.0)
            out = corrupt(x, node[0], node[1], [base + int(r) for r in missing])
            store[missing] = out.mul_(255.0).round_().to(torch.uint8).numpy()
            filled[missing] = True

    def _fill_block(self, k: int, block: int) -> None:
        """Fill both nodes of transition k for the positions of aligned block `block` (FILL_AHEAD
        positions), once: one corruption call per node and block instead of one per batch."""
        if (k, block) in self._filled_blocks:
            return
        span = self.opts.transition_images
        first = max(block * FILL_AHEAD, k * span)
        last = min((block + 1) * FILL_AHEAD, (k + 1) * span, self.num_images)
        rows = self.clean_rows(np.arange(first, last, dtype=np.int64))
        for node in (self.walk[k], self.walk[k + 1]):
            self._fill(node, rows)
        if len(self._filled_blocks) > 64:
            self._filled_blocks.clear()  # only a memo: _fill skips rows already held
        self._filled_blocks.add((k, block))

    def batch(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: the stream has {len(self)} batches")
        span = self.opts.transition_images
        start = index * self.batch_size
        positions = np.arange(start, min(start + self.batch_size, self.num_images), dtype=np.int64)
        rows = self.clean_rows(positions)
        transitions = positions // span
        # numpy from here on: single-threaded small ops, no thread-pool wake-ups per batch
        x = np.empty((len(positions), *self._clean.shape[1:]), dtype=np.float32)
        for k in np.unique(transitions):  # a batch may cross into the next transition
            k = int(k)
            where = np.flatnonzero(transitions == k)
            a, b = self.walk[k], self.walk[k + 1]
            for block in np.unique(positions[where] // FILL_AHEAD):
                self._fill_block(k, int(block))
            t = ((positions[where] - k * span) / span).astype(np.float32).reshape(-1, 1, 1, 1)
            for node in (a, b):
                self._fill(node, rows[where])  # a no-op unless a node was dropped since its block was filled
            xa = self._node(a)[0][rows[where]].astype(np.float32)
            xb = self._node(b)[0][rows[where]].astype(np.float32)
            xb -= xa
            xb *= t
            xa += xb
            xa /= np.float32(255)
            x[where] = xa
        return Batch(torch.from_numpy(x), torch.from_numpy(self.labels[rows]), self.name)


def check_config_options(options: dict[str, Any]) -> CCCOptions:
    """The options an experiment config may give (all but `model`, which is the experiment's source
    model), checked before any work; ValueError names the option."""
    allowed = set(OPTIONS) - {"model"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {sorted(allowed)}")
    return check_options({**OPTIONS, **options})


def build_ccc_stream(domains: Sequence[DomainData], batch_size: int, seed: int, options: dict[str, Any]) -> CCCStream:
    """The `stream.setting: ccc` stream; `domains` is one DomainData of clean test images.
    `options`: OPTIONS (defaults filled in here)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"stream option(s) {unknown} do not apply to setting 'ccc' "
                         f"(its options: {', '.join(OPTIONS)})")
    options = {**OPTIONS, **options}
    domains = list(domains)
    if len(domains) != 1:
        raise ValueError(f"stream setting 'ccc': expected exactly one domain, the clean test images, got "
                         f"{len(domains)} ({', '.join(d.name for d in domains)})")
    model = options.get("model")
    if not isinstance(model, nn.Module):
        raise ValueError("stream setting 'ccc': option model= must be the source model (torch.nn.Module) the walk "
                         f"is calibrated against, got {type(model).__name__}")
    images = np.asarray(domains[0].images)
    if min(images.shape[1:3]) < 8:
        raise ValueError(f"stream setting 'ccc': images must be at least 8x8, got {images.shape[1:3]}")
    return CCCStream(domains[0], model, batch_size, seed, options)


def clean_domain(images: np.ndarray, labels: np.ndarray) -> DomainData:
    """Clean test images as the one domain a ccc stream takes."""
    return DomainData("clean", 0, images, labels)


def stream_summary(stream: CCCStream, every: int | None = None) -> list[dict[str, Any]]:
    """The walk as rows (transition index, first image, from, to, calibrated accuracies), for docs and plots."""
    rows = []
    transitions = math.ceil(stream.num_images / stream.opts.transition_images)
    for k in range(transitions if every is None else min(transitions, every)):
        a, b = stream.walk[k], stream.walk[k + 1]
        rows.append({"transition": k, "first_image": k * stream.opts.transition_images, "from": node_name(a),
                     "to": node_name(b), "from_accuracy": stream.calibration.node(a),
                     "halfway_accuracy": stream.calibration.pair(a, b), "to_accuracy": stream.calibration.node(b)})
    return rows
