import numpy as np
import pytest
import torch

from metatta.data.corruptions import CORRUPTIONS, corrupt
from metatta.data.domains import ALL_CORRUPTIONS
from metatta.data.fashion_mnist import load_fashion_mnist

# Their CIFAR-10-C tables switch mechanism between severities (see the module docstring).
NOT_MONOTONE = {"glass_blur", "elastic_transform", "spatter", "frost"}
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "spatter", "elastic_transform"}


@pytest.fixture(scope="module")
def gray():
    images, _ = load_fashion_mnist("test")
    return torch.from_numpy(np.array(images[:16])).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def rgb():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(6, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


def rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


def test_registry_matches_domain_names():
    assert set(CORRUPTIONS) == set(ALL_CORRUPTIONS)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_changes_image_keeps_format_and_damage_grows(name, gray):
    damage = []
    for severity in range(1, 6):
        out = corrupt(gray, name, severity, 0)
        assert out.shape == gray.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        damage.append(rmse(out, gray))
    assert min(damage) > 1e-3, f"{name} leaves the image unchanged: {damage}"
    if name not in NOT_MONOTONE:
        assert all(b >= a - 1e-3 for a, b in zip(damage, damage[1:])), f"{name}: damage {damage}"
    else:
        assert max(damage) > 2 * min(damage) or max(damage) > 0.1


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_deterministic_and_batch_equals_single(name, gray, rgb):
    for x in (gray[:4], rgb[:3]):
        seeds = [11, 12, 13, 14][: len(x)]
        batch = corrupt(x, name, 5, seeds)
        assert torch.equal(batch, corrupt(x, name, 5, seeds))
        singles = torch.cat([corrupt(x[i:i + 1], name, 5, [seeds[i]]) for i in range(len(x))])
        torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)
        if name in RANDOM:
            assert not torch.equal(batch, corrupt(x, name, 5, [s + 100 for s in seeds]))


def test_int_seed_means_seed_plus_index(gray):
    torch.testing.assert_close(corrupt(gray[:3], "gaussian_noise", 3, 7), corrupt(gray[:3], "gaussian_noise", 3, [7, 8, 9]))


@pytest.mark.parametrize("bad, match", [
    (dict(corruption="fogg"), "unknown corruption"),
    (dict(severity=0), "severity"),
    (dict(severity=6), "severity"),
    (dict(images=torch.rand(2, 28, 28)), r"\(B, C, H, W\)"),
    (dict(images=torch.rand(2, 1, 8, 8).double()), "float32"),
    (dict(images=torch.rand(2, 2, 8, 8)), "channels"),
    (dict(images=torch.full((1, 1, 8, 8), float("nan"))), "NaN"),
    (dict(images=torch.full((1, 1, 8, 8), 2.0)), r"\[0, 1\]"),
    (dict(seeds=[1, 2, 3]), "seeds"),
])
def test_errors(bad, match):
    args = dict(images=torch.rand(2, 1, 8, 8), corruption="fog", severity=1, seeds=[1, 2])
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        corrupt(args["images"], args["corruption"], args["severity"], args["seeds"])
