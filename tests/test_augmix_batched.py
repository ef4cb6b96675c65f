"""The batched AugMix views (metatta.methods.augmix.augmix_views) are the per-view `augmix` calls'
views bit for bit for the same seed; BN moments from BatchNorm's kernel (metatta.methods.bn)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from metatta.methods.augmix import augmix, augmix_views
from metatta.methods.bn import batch_moments


@pytest.mark.parametrize("shape, preaugmentation, severity", [
    ((1, 28, 28), "crop_flip", 1.0),
    ((3, 32, 32), "resized_crop_flip", 1.0),
    ((3, 20, 24), "none", 10.0),
    ((1, 28, 28), "crop_flip", 5.0),
])
def test_batched_views_equal_one_view_at_a_time(shape, preaugmentation, severity):
    for seed in range(4):
        img = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        batched = augmix_views(img, 12, severity, preaugmentation=preaugmentation)
        torch.manual_seed(seed)
        one_by_one = torch.stack([augmix(img, severity, preaugmentation=preaugmentation) for _ in range(12)])
        assert torch.equal(batched, one_by_one)


def test_views_leave_the_generator_where_one_view_at_a_time_does():
    img = torch.rand(1, 28, 28)
    torch.manual_seed(3)
    augmix_views(img, 5)
    after_batched = torch.rand(4)
    torch.manual_seed(3)
    for _ in range(5):
        augmix(img)
    assert torch.equal(after_batched, torch.rand(4))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_batch_moments_are_batchnorms_mean_and_unbiased_variance(layout):
    x = (torch.randn(5, 3, 6, 7) * 2 + 1).contiguous(memory_format=layout)
    mean, var = batch_moments(x)
    assert torch.allclose(mean, x.mean([0, 2, 3]), atol=1e-6)
    assert torch.allclose(var, x.var([0, 2, 3], correction=1), rtol=1e-5)
    reference = nn.BatchNorm2d(3, affine=False, momentum=1.0)  # the broadest codebase's AlphaBatchNorm
    reference(x)
    assert torch.equal(mean, reference.running_mean) and torch.equal(var, reference.running_var)


def test_batch_moments_of_one_value_per_channel_are_biased():
    x = torch.randn(1, 4)
    mean, var = batch_moments(x)
    assert torch.equal(mean, x[0]) and torch.equal(var, torch.zeros(4))
