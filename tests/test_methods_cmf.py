"""CMF (metatta.methods.cmf): ROID's objective with a Kalman filter over the adapted parameters;
the gain and one filter step against hand-computed values, reset, non-finite batches, mgg."""
from __future__ import annotations

import torch

from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.cmf import kalman_gain
from method_checks import adapted_names, assert_reset_restores_source, method_state
from test_methods import TinyBNNet, assert_same_state, batches


def test_defaults_are_the_authors_cifar_setting():
    cfg = method_class("cmf").Config()
    assert (cfg.optimizer, cfg.lr, cfg.lr_batch_size, cfg.alpha, cfg.gamma, cfg.q) == ("adam", 1e-3, 200, 0.99, 0.99, 0.005)


def test_adapts_the_norm_affines():
    assert adapted_names(build_method("cmf", TinyBNNet())) == {
        "layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}


def test_kalman_gain_by_hand():
    assert kalman_gain(0.05, 0.05) == 0.95 / (0.05 + 0.95)
    assert kalman_gain(1.0, 0.5) == 0.89  # 0.5 / 1.5 clipped below
    assert kalman_gain(1e-6, 1e-6) == 1.0  # from 0.9999 on: 1


def test_one_filter_step_by_hand():
    x = batches(1)[0]
    # 32 adapted parameters: q = 60 * 32 / 38400 = 0.05, v = 0.05, beta = 0.95 / 1.0
    plain = build_method("roid", TinyBNNet(), {"lr": 0.05, "momentum_src": 1.0, "channels_last": False})
    cmf = build_method("cmf", TinyBNNet(), {"lr": 0.05, "q": 60.0, "gamma": 0.9, "channels_last": False})
    assert cmf.process_noise == 0.05
    source = cmf.model.layer1[1].weight.detach().clone()
    for method in (plain, cmf):
        torch.manual_seed(3)  # the same augmentation
        method(x)
    stepped = plain.model.layer1[1].weight.detach()
    beta = 0.95
    hidden = beta * source + (1 - beta) * stepped  # the predict step keeps the source: h = theta_0 at first
    torch.testing.assert_close(cmf.hidden[0], hidden)
    torch.testing.assert_close(cmf.model.layer1[1].weight.detach(), 0.9 * stepped + 0.1 * hidden)
    assert abs(cmf.hidden_var - beta * 0.05) < 1e-12


def test_reset_restores_the_source_bit_for_bit():
    assert_reset_restores_source(build_method("cmf", TinyBNNet(), {"lr": 0.05}), batches(2))


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("cmf", TinyBNNet(), {"lr": 0.05})
    method(batches(1)[0])
    before = method_state(method)
    x = batches(1, seed=3)[0]
    x[7] = float("nan")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(batches(1, seed=2)[0])).all()


def test_steps_with_the_learned_optimizer():
    method = build_method("cmf", TinyBNNet(), {"optimizer": "mgg", "lr": 0.05}, mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
