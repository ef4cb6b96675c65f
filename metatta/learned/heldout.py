"""The labelled meta-training set: held-out corruptions of clean *training* images.

A supervised outer loss (`unroll(..., outer_loss="supervised")`) needs labels.
The -C benchmark files are built from the clean *test* split, so training on
their labels, even of the held-out corruptions, would let the test images'
labels shape the learned optimizer. This set is built instead from the clean
training split with the held-out corruptions only (speckle_noise,
gaussian_blur, spatter, saturate), never the 15 benchmark ones, and it says
where every image came from (`HeldOutSet.provenance`), so a test, or a reader
of a registered adapter, can check that no test image was read.

Choices:
- Every corruption gets its own block of clean images (a seeded permutation of
  the split, cut into disjoint blocks): the four domains share no image, so
  validating on one corruption's later rows never revisits another's images.
- Image i of the split under corruption c is corrupted with seed
  `image_seeds(seed, c, severity, N)[i]` (the -C builder's seed function,
  keyed by the index in the split): the same training image under the same
  corruption always gets the same damage, whatever else is built.
- Built in memory on each call (some hundred images take about a second);
  nothing is cached on disk, so there is no stale file to trust.
- Compositions (`compositions=["gaussian_blur-5+speckle_noise-5", ...]`): held-out
  corruptions applied one after the other, a new shift made of held-out parts
  only. A corruption repeated is a severity beyond the table's 5 (blur twice:
  sigma x sqrt 2). Each composition gets its own block of clean images (after
  the corruptions' blocks, which adding compositions does not move); step k of
  a composition draws with the -C seed of its (corruption, severity) plus
  k x STEP_SEED_OFFSET, so a repeated step draws new noise and step 0 equals
  the single corruption's damage on those images. Its domain is named after
  the steps ("gaussian_blur-5+speckle_noise-5": `DomainData.corruption` holds
  all but the last severity).

The source model was trained on this split, clean: the shift the MGG learns to
undo is the corruption, as on the benchmark. Validating on these images
measures that, not generalisation to unseen clean images.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from metatta.data import clean
from metatta.data.benchmark_files import image_seeds
from metatta.data.corruptions import corrupt
from metatta.data.domains import HELD_OUT_CORRUPTIONS, check_corruption_names, check_severities
from metatta.data.types import DomainData

SPLIT = "train"
CORRUPT_BATCH = 500
STEP_SEED_OFFSET = 7_919 * 10**12  # added per composition step to the -C seed (mod 2**62)


@dataclasses.dataclass
class HeldOutSet:
    """Domains (one per corruption and severity, rows in the order of their provenance indices) and
    provenance: {"dataset", "split", "severity" (or "severities"), "seed", "num_clean_images",
    "corruptions": {name: [index in the split of every row]}} (JSON-serializable)."""

    domains: list[DomainData]
    provenance: dict[str, Any]


def _check_held_out(corruptions: Sequence[str]) -> list[str]:
    names = check_corruption_names(corruptions)
    benchmark = [c for c in names if c not in HELD_OUT_CORRUPTIONS]
    if benchmark:
        raise ValueError(f"held-out set: {benchmark} are benchmark corruptions; meta-training may use only the "
                         f"held-out ones {list(HELD_OUT_CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"held-out set: corruptions repeat: {names}")
    return names


def parse_composition(text: str) -> list[tuple[str, int]]:
    """"gaussian_blur-5+speckle_noise-4" -> [("gaussian_blur", 5), ("speckle_noise", 4)]: at least
    two steps, each a held-out corruption and a severity 1-5."""
    steps = []
    for part in str(text).split("+"):
        name, _, severity = part.strip().rpartition("-")
        if not name or not severity.isdigit():
            raise ValueError(f"held-out composition {text!r}: each step is <corruption>-<severity>, got {part!r}")
        steps.append((name, int(severity)))
    if len(steps) < 2:
        raise ValueError(f"held-out composition {text!r}: needs at least two steps joined by '+'")
    names = check_corruption_names([n for n, _ in steps])
    benchmark = sorted({n for n in names if n not in HELD_OUT_CORRUPTIONS})
    if benchmark:
        raise ValueError(f"held-out composition {text!r}: {benchmark} are benchmark corruptions; compositions may "
                         f"use only the held-out ones {list(HELD_OUT_CORRUPTIONS)}")
    check_severities([s for _, s in steps])
    return steps


def composition_name(steps: Sequence[tuple[str, int]]) -> str:
    return "+".join(f"{name}-{severity}" for name, severity in steps)


def disjoint_indices(num_clean: int, blocks: int, per_block: int, seed: int) -> list[np.ndarray]:
    """`blocks` disjoint sets of `per_block` indices into a split of `num_clean` images (seeded)."""
    if blocks * per_block > num_clean:
        raise ValueError(f"held-out set: {blocks} corruptions x {per_block} images need {blocks * per_block} clean "
                         f"images; the {SPLIT} split has {num_clean}")
    order = np.random.default_rng(seed).permutation(num_clean)
    return [np.sort(order[b * per_block:(b + 1) * per_block]) for b in range(blocks)]


def corrupt_uint8(images: np.ndarray, corruption: str, severity: int, seeds: np.ndarray,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Corrupt uint8 (N, H, W, C) images with one seed each; uint8 (N, H, W, C), rounded as the -C files are."""
    out = np.empty_like(images)
    for start in range(0, len(images), CORRUPT_BATCH):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + CORRUPT_BATCH])).permute(0, 3, 1, 2)
        y = corrupt(x.to(device).float().div_(255), corruption, severity, seeds[start:start + len(x)])
        out[start:start + len(x)] = (y * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


def build_heldout_train_set(
    corruptions: Sequence[str] = HELD_OUT_CORRUPTIONS,
    severity: int = 5,
    images_per_corruption: int = 288,
    dataset: str = "fashion_mnist",
    root: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> HeldOutSet:
    """Labelled held-out-corruption domains from the clean training split (see the module docstring),
    at one severity. Only `metatta.data.clean.load_clean(dataset, "train", root)` is read."""
    held = build_heldout_domains(corruptions, [severity], images_per_corruption, dataset, root, seed, device)
    provenance = dict(held.provenance)
    provenance["severity"] = provenance.pop("severities")[0]
    del provenance["compositions"]  # none here
    return HeldOutSet(held.domains, provenance)


def build_heldout_domains(
    corruptions: Sequence[str] = HELD_OUT_CORRUPTIONS,
    severities: Sequence[int] = (5,),
    images_per_corruption: int = 288,
    dataset: str = "fashion_mnist",
    root: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    compositions: Sequence[str] = (),
) -> HeldOutSet:
    """As `build_heldout_train_set`, at several severities: one domain per (corruption, severity),
    corruption-major, then one per composition (module docstring), in the order given. A
    corruption's block of clean images is the same at every severity (as in the -C files, where
    each severity corrupts the same test images); corruptions and compositions share none.
    Provenance: {"dataset", "split", "severities", "seed", "num_clean_images", "corruptions",
    "compositions"} (the last two: {name: [index in the split of every row]})."""
    names = _check_held_out(corruptions)
    severities = check_severities(list(severities))
    if names and (not severities or len(set(severities)) != len(severities)):
        raise ValueError(f"held-out set: severities must be a non-empty list without repeats, got {severities}")
    steps = [parse_composition(c) for c in compositions]
    composed = [composition_name(s) for s in steps]
    if len(set(composed)) != len(composed):
        raise ValueError(f"held-out set: compositions repeat: {composed}")
    if not names and not composed:
        raise ValueError("held-out set: no corruption and no composition to build")
    if images_per_corruption < 1:
        raise ValueError(f"held-out set: images_per_corruption must be >= 1, got {images_per_corruption}")
    images, labels = clean.load_clean(dataset, SPLIT, root)
    blocks = disjoint_indices(len(images), len(names) + len(composed), images_per_corruption, seed)
    domains, provenance, composed_provenance = [], {}, {}
    for name, idx in zip(names, blocks):
        for severity in severities:
            seeds = image_seeds(seed, name, severity, len(images))[idx]
            domains.append(DomainData(name, severity, corrupt_uint8(images[idx], name, severity, seeds, device),
                                      np.asarray(labels[idx], dtype=np.int64)))
        provenance[name] = idx.tolist()
    for name, composition, idx in zip(composed, steps, blocks[len(names):]):
        corrupted = images[idx]
        for k, (step, severity) in enumerate(composition):
            seeds = (image_seeds(seed, step, severity, len(images))[idx] + k * STEP_SEED_OFFSET) % (2 ** 62)
            corrupted = corrupt_uint8(corrupted, step, severity, seeds, device)
        last = composition[-1][1]
        domains.append(DomainData(name.removesuffix(f"-{last}"), last, corrupted,
                                  np.asarray(labels[idx], dtype=np.int64)))
        composed_provenance[name] = idx.tolist()
    return HeldOutSet(domains, {"dataset": dataset, "split": SPLIT, "severities": severities, "seed": seed,
                                "num_clean_images": len(images), "corruptions": provenance,
                                "compositions": composed_provenance})
