"""The `bn` method's source-mixing variants (metatta.methods.bn): statistics "alpha" and "ema"
against hand-computed normalizations, reset, non-finite batches, models they refuse."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metatta.methods import build_method
from method_checks import assert_reset_restores_source, method_state, tiny_vit
from test_methods import TinyBNNet, assert_same_state, batches


def one_bn() -> nn.Module:
    """A single BatchNorm2d(2) with source mean (1, -1), variance (4, 0.25), weight (2, 1), bias (0, 0.5)."""
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.5]))
    return nn.Sequential(bn).eval()


def normalized(x, mean, var, weight=(2.0, 1.0), bias=(0.0, 0.5), eps=1e-5):
    shape = (1, -1, 1, 1)
    return ((x - torch.tensor(mean).view(shape)) / (torch.tensor(var).view(shape) + eps).sqrt()
            * torch.tensor(weight).view(shape) + torch.tensor(bias).view(shape))


# Two images, 2 channels, 1x2 pixels: channel 0 holds 0, 2, 4, 6 (mean 3, unbiased var 20/3),
# channel 1 holds 1, 1, 3, 3 (mean 2, unbiased var 4/3).
X = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[4.0, 6.0]], [[3.0, 3.0]]]])


def test_alpha_mixes_source_and_unbiased_batch_statistics_by_hand():
    method = build_method("bn", one_bn(), {"statistics": "alpha", "alpha": 0.25, "channels_last": False})
    mean = (0.75 * 1.0 + 0.25 * 3.0, 0.75 * -1.0 + 0.25 * 2.0)
    var = (0.75 * 4.0 + 0.25 * 20 / 3, 0.75 * 0.25 + 0.25 * 4 / 3)
    torch.testing.assert_close(method(X), normalized(X, mean, var))
    torch.testing.assert_close(method(X), normalized(X, mean, var))  # stateless
    source = build_method("bn", one_bn(), {"statistics": "alpha", "alpha": 0.0, "channels_last": False})
    torch.testing.assert_close(source(X), normalized(X, (1.0, -1.0), (4.0, 0.25)))


def test_ema_updates_the_running_statistics_before_normalizing_by_hand():
    method = build_method("bn", one_bn(), {"statistics": "ema", "channels_last": False})  # the layer's momentum 0.1
    mean1, var1 = (0.9 * 1.0 + 0.1 * 3.0, 0.9 * -1.0 + 0.1 * 2.0), (0.9 * 4.0 + 0.1 * 20 / 3, 0.9 * 0.25 + 0.1 * 4 / 3)
    torch.testing.assert_close(method(X), normalized(X, mean1, var1))
    mean2 = tuple(0.9 * m + 0.1 * b for m, b in zip(mean1, (3.0, 2.0)))
    var2 = tuple(0.9 * v + 0.1 * b for v, b in zip(var1, (20 / 3, 4 / 3)))
    torch.testing.assert_close(method(X), normalized(X, mean2, var2))
    bn = method.model[0]
    torch.testing.assert_close(bn.running_mean, torch.tensor(mean2))
    assert int(bn.num_batches_tracked) == 2
    fast = build_method("bn", one_bn(), {"statistics": "ema", "ema_momentum": 1.0, "channels_last": False})
    torch.testing.assert_close(fast(X), normalized(X, (3.0, 2.0), (20 / 3, 4 / 3)))


def test_ema_takes_each_layers_statistics_under_batch_normalization_upstream():
    """Two BN layers in a row: the second layer's running statistics follow the first layer's output
    normalized with the batch's statistics (a train-mode pass, as PyTorch's running statistics and the
    broadest codebase's EMABatchNorm have them), not with the first layer's updated running ones;
    the prediction then uses the running statistics (an eval-mode pass). Bit for bit with that."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        for bn in (net[1], net[3]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    oracle = copy.deepcopy(net)
    method = build_method("bn", net, {"statistics": "ema", "channels_last": False})
    for seed in range(3):
        x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        oracle.train()
        with torch.no_grad():
            oracle(x)
            oracle.eval()
            expected = oracle(x)
        assert torch.equal(method(x), expected)
    for ours, theirs in ((method.model[3], oracle[3]), (method.model[1], oracle[1])):
        assert torch.equal(ours.running_mean, theirs.running_mean)
        assert torch.equal(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("statistics", ["alpha", "ema"])
def test_nothing_is_learned_and_every_bn_layer_is_converted(statistics):
    method = build_method("bn", TinyBNNet(), {"statistics": statistics})
    assert method.optimizer is None and method.adapted_parameter_count() == 0
    names = [type(m).__name__ for m in method.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert names == [f"{statistics.capitalize() if statistics == 'alpha' else 'EMA'}BatchNorm2d"] * 2


def test_ema_reset_restores_the_source_statistics_bit_for_bit():
    assert_reset_restores_source(build_method("bn", TinyBNNet(), {"statistics": "ema"}), batches(2))


def test_ema_nan_batch_leaves_the_statistics_finite_and_unchanged():
    method = build_method("bn", TinyBNNet(), {"statistics": "ema"})
    method(batches(1)[0])
    before = method_state(method)
    x = batches(1, seed=3)[0]
    x[0, 0, 0, 0] = float("nan")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert all(torch.isfinite(b).all() for b in method.model.buffers())


@pytest.mark.parametrize("statistics", ["alpha", "ema"])
def test_models_without_source_bn_statistics_are_refused(statistics):
    with pytest.raises(ValueError, match="bn: needs a model with BatchNorm layers; ViTClassifier has none"):
        build_method("bn", tiny_vit(), {"statistics": statistics})
    model = TinyBNNet()
    model.layer1[1].track_running_stats = False
    model.layer1[1].running_mean = model.layer1[1].running_var = None
    with pytest.raises(ValueError, match="layer 'layer1.1' keeps none"):
        build_method("bn", model, {"statistics": statistics})


@pytest.mark.parametrize("field, value", [("statistics", "median"), ("alpha", 1.5), ("ema_momentum", -0.1)])
def test_bad_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"bn: config.{field}"):
        build_method("bn", TinyBNNet(), {field: value})
