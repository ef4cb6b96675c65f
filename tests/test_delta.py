"""Tests of DELTA's test-time batch renormalization (metatta.methods.delta): the value is
the moving averages' normalization, the gradient batch normalization's, the averages'
update, BN and Tent as bases at batch size 1, validation, and real data at N=1."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatta.methods import build_method
from metatta.methods.delta import TBR_CLASSES, TBRNorm
from metatta.methods.plugin import channel_moments, convert_batchnorms

from test_methods import TinyBNNet, batches
from test_nanoadapt import _error_at_batch_one, _real_stream, one_thread  # noqa: F401  (fixture)


def tbr_layer(alpha: float = 0.1, init: str = "source") -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    holder = nn.Sequential(bn)
    convert_batchnorms(holder, TBR_CLASSES, momentum=alpha, init=init)
    return bn


def test_value_is_the_moving_average_normalization_and_the_averages_take_the_batch_in():
    layer = tbr_layer(alpha=0.1)
    mean_ema, std_ema = layer.tbr_mean.clone(), layer.tbr_std.clone()
    torch.testing.assert_close(std_ema, torch.sqrt(layer.running_var + layer.eps))
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    layer.begin_session(store=True)
    y = layer(x)
    layer.end_session()
    shape = (1, -1, 1, 1)
    ref = (x - mean_ema.view(shape)) / std_ema.view(shape) * layer.weight.view(shape) + layer.bias.view(shape)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    mean_b, sq_b = channel_moments(x)
    std_b = torch.sqrt(sq_b - mean_b ** 2 + layer.eps)
    torch.testing.assert_close(layer.tbr_mean, mean_ema + 0.1 * (mean_b - mean_ema))
    torch.testing.assert_close(layer.tbr_std, std_ema + 0.1 * (std_b - std_ema))


def test_by_default_the_averages_start_from_the_first_test_batch():
    """The authors' code: the first batch is normalized by its own statistics (plain BN) and
    becomes the averages; the source statistics are never used."""
    layer = tbr_layer(alpha=0.1, init="first_batch")
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    layer.begin_session(store=True)
    y = layer(x)
    layer.end_session()
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w, b, training=True, eps=layer.eps),
                               rtol=1e-4, atol=1e-5)
    mean_b, sq_b = channel_moments(x)
    torch.testing.assert_close(layer.tbr_mean, mean_b)
    torch.testing.assert_close(layer.tbr_std, torch.sqrt(sq_b - mean_b ** 2 + layer.eps))
    assert float(layer.tbr_count) == 3.0


def test_reset_starts_again_from_the_next_first_batch():
    method = build_method("delta", TinyBNNet(), {"base": "bn"}, batch_size=2)
    layer = method.norms[0]
    method(torch.randn(2, 3, 8, 8))
    assert float(layer.tbr_count) == 2.0
    method.reset()
    assert float(layer.tbr_count) == 0.0
    x = torch.randn(2, 3, 8, 8) * 3
    torch.testing.assert_close(method(x), build_method("delta", TinyBNNet(), {"base": "bn"}, batch_size=2)(x))


def test_outside_a_session_nothing_is_stored():
    layer = tbr_layer()
    before = layer.tbr_mean.clone()
    layer(torch.randn(2, 4, 3, 3))
    assert torch.equal(layer.tbr_mean, before)


def test_gradient_is_that_of_batch_normalization():
    """d(loss)/d(x) of TBR equals BN's times r = sigma_b / sigma_ema (the renormalization's
    constant scale): the batch statistics are in the graph, the moving averages are not."""
    layer = tbr_layer()
    x = (torch.randn(4, 4, 3, 3) * 1.5).requires_grad_(True)
    g = torch.randn(4, 4, 3, 3)
    layer.begin_session(store=False)
    (layer(x) * g).sum().backward()
    layer.end_session()
    tbr_grad = x.grad.clone()
    x.grad = None
    w, b = layer.weight.detach(), layer.bias.detach()
    mean_b, sq_b = channel_moments(x.detach())
    std_b = torch.sqrt(sq_b - mean_b ** 2 + layer.eps)
    r = std_b / layer.tbr_std
    (F.batch_norm(x, None, None, w * r, b, training=True, eps=layer.eps) * g).sum().backward()
    torch.testing.assert_close(tbr_grad, x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", ["bn", "tent", "eta"])
def test_a_batch_of_one_runs_with_bn_and_tent(base):
    method = build_method("delta", TinyBNNet(), {"base": base}, batch_size=1)
    before = copy.deepcopy(method.model.state_dict())
    for x in batches(4, batch_size=1):
        out = method(x)
        assert out.shape == (1, 10) and bool(torch.isfinite(out).all())
    changed = [k for k, v in method.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("tbr_mean") for k in changed)
    assert all(isinstance(m, TBRNorm) for m in method.model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_bad_momentum_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=rf"delta: config\.tbr_momentum must be in \[0, 1\], got {value}"):
        build_method("delta", TinyBNNet(), {"tbr_momentum": value})


def test_unknown_init_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"delta: config\.tbr_init must be one of cumulative, first_batch, source, got 'zero'"):
        build_method("delta", TinyBNNet(), {"tbr_init": "zero"})


def test_bn_with_tbr_beats_plain_bn_at_batch_size_one_on_real_data(one_thread):
    model, x, y = _real_stream()
    bn = _error_at_batch_one(build_method("bn", copy.deepcopy(model), batch_size=1), x, y)
    delta = _error_at_batch_one(build_method("delta", copy.deepcopy(model), {"base": "bn"}, batch_size=1), x, y)
    assert delta < bn - 20, (delta, bn)


# ---- where the averages start: degenerate first batches ---------------------------------------------------
def test_cumulative_start_weighs_every_image_alike_until_the_moving_average_takes_over():
    layer = tbr_layer(alpha=0.1, init="cumulative")
    a, b = torch.randn(1, 4, 5, 5) * 3 + 2, torch.randn(7, 4, 5, 5)
    for x in (a, b):
        layer.begin_session(store=True)
        layer(x)
        layer.end_session()
    mean_a, mean_b = channel_moments(a)[0], channel_moments(b)[0]
    torch.testing.assert_close(layer.tbr_mean, (1 * mean_a + 7 * mean_b) / 8)  # the one image weighs 1/8, not 0.9
    assert float(layer.tbr_count) == 8.0
    c = torch.randn(200, 4, 2, 2)  # 200 / 208 of the images: still above alpha, so the share is by count
    layer.begin_session(store=True)
    layer(c)
    layer.end_session()
    torch.testing.assert_close(layer.tbr_mean, (mean_a + 7 * mean_b + 200 * channel_moments(c)[0]) / 208,
                               rtol=1e-5, atol=1e-5)
    before = layer.tbr_mean.clone()
    d = torch.randn(2, 4, 2, 2)  # 2 / 210 < alpha: the moving average's share
    layer.begin_session(store=True)
    layer(d)
    layer.end_session()
    torch.testing.assert_close(layer.tbr_mean, before + 0.1 * (channel_moments(d)[0] - before))


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_a_batch_of_constant_images_is_never_taken_into_the_averages(value):
    method = build_method("delta", TinyBNNet(), {"base": "bn"}, batch_size=4)
    reference = build_method("delta", TinyBNNet(), {"base": "bn"}, batch_size=4)
    blank = torch.full((4, 3, 8, 8), value)
    out = method(blank)
    assert bool(torch.isfinite(out).all()) and method.degenerate_batches == 1
    assert all(float(layer.tbr_count) == 0.0 for layer in method.norms)  # nothing stored
    for x in batches(3, batch_size=4):
        torch.testing.assert_close(method(x), reference(x))  # as if the blank batch had not come
    method(blank)
    assert method.degenerate_batches == 2 and float(method.norms[0].tbr_count) == 12.0


def _stream_error(method, x, y, first=None, batch_size=16) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        if first is not None:
            method(first)
        wrong = sum(int((method(x[i:i + batch_size]).argmax(1) != y[i:i + batch_size]).sum())
                    for i in range(0, len(x), batch_size))
    return 100.0 * wrong / len(x)


def test_a_degenerate_first_batch_costs_about_nothing_on_real_data(one_thread):
    """Issue #24: with the averages started from whatever came first (tbr_init=first_batch), a
    zeros batch first cost +56 points and a one-image batch +9 on the rest of the stream."""
    # 192 images: at 96 the authors' one-image cost was a tie (+1 image) on one of the two source
    # checkpoints the project trains (8.49%); at 192 it costs +10 points there
    model, x, y = _real_stream(n=192)

    def error(first=None, **config):
        return _stream_error(build_method("delta", copy.deepcopy(model), {"base": "bn", **config}, batch_size=16),
                             x, y, first)

    normal = error()
    assert error(torch.zeros(16, *x.shape[1:])) == normal
    assert error(torch.full((16, *x.shape[1:]), 0.5)) == normal
    one_image = error(x[-1:].clone())
    assert abs(one_image - normal) <= 2.1, (one_image, normal)  # at most 4 of 192 images
    authors = error(x[-1:].clone(), tbr_init="first_batch")
    assert authors > one_image, (authors, one_image)
