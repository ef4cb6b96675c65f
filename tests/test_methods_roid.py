"""ROID (metatta.methods.roid): parameters adapted by name, the soft likelihood ratio, the
diversity/certainty weights, the prior correction and the weight ensembling against
hand-computed values, reset, non-finite batches, the learned optimizer."""
from __future__ import annotations

import math

import torch

from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.roid import prior_corrected, roid_augment, roid_weights, soft_likelihood_ratio
from method_checks import adapted_names, assert_reset_restores_source, method_state, tiny_vit
from test_methods import TinyBNNet, assert_same_state, batches


def test_defaults_are_the_authors_cifar_setting():
    cfg = method_class("roid").Config()
    assert (cfg.optimizer, cfg.lr, cfg.lr_batch_size, cfg.momentum_src, cfg.momentum_probs) == (
        "adam", 1e-3, 200, 0.99, 0.9)
    assert cfg.temperature == 1 / 3 and cfg.use_weighting and cfg.use_prior_correction and cfg.use_consistency


def test_adapts_the_norm_affines():
    assert adapted_names(build_method("roid", TinyBNNet())) == {
        "layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}
    vit = build_method("roid", tiny_vit())
    assert adapted_names(vit) == {n for n, _ in vit.model.named_parameters() if ".norm" in n}


def test_soft_likelihood_ratio_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.995, 0.004, 0.001]]))
    first = -(0.5 * math.log(1 + 1e-5) + 0.3 * math.log(0.3 / 0.7 + 1e-5) + 0.2 * math.log(0.25 + 1e-5))
    second = -(0.99 * math.log(99 + 1e-5) + 0.004 * math.log(0.004 / 0.996 + 1e-5)
               + 0.001 * math.log(0.001 / 0.999 + 1e-5))  # 0.995 clipped to 0.99
    torch.testing.assert_close(soft_likelihood_ratio(logits), torch.tensor([first, second]))


def entropy(p):
    return -sum(v * math.log(v) for v in p)


def test_weights_by_hand():
    probs = [[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.4, 0.3, 0.3]]
    m = [0.5, 0.3, 0.2]
    logits = torch.log(torch.tensor(probs))

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    d = [1 - cos(m, p) for p in probs]
    d = [(v - min(d)) / (max(d) - min(d)) for v in d]
    c = [-entropy(p) for p in probs]
    c = [(v - min(c)) / (max(c) - min(c)) for v in c]
    kept = [v >= sum(d) / len(d) for v in d]
    want = [math.exp(dv * cv * 3) if k else 0.0 for dv, cv, k in zip(d, c, kept)]
    weights, got_kept = roid_weights(logits, torch.tensor(m), 1 / 3)
    assert got_kept.tolist() == kept and 0 < sum(kept) < 4
    torch.testing.assert_close(weights, torch.tensor(want))
    constant, kept_all = roid_weights(logits[:1], torch.tensor(m), 1 / 3)  # one sample: min-max of a constant is 0
    assert kept_all.tolist() == [True] and constant.tolist() == [1.0]


def test_prior_correction_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1]])
    logits = probs.log()
    prior = [0.6, 0.3, 0.1]
    s = max(1 / 2, 1 / 3) / 0.6
    factor = torch.tensor([(v + s) / (1 + 3 * s) for v in prior])
    torch.testing.assert_close(prior_corrected(logits), logits * factor)


def test_weight_ensembling_pulls_towards_the_source():
    x = batches(1)[0]
    plain = build_method("roid", TinyBNNet(), {"lr": 0.05, "momentum_src": 1.0, "channels_last": False})
    mixed = build_method("roid", TinyBNNet(), {"lr": 0.05, "channels_last": False})
    source = mixed.model.layer1[1].weight.detach().clone()
    for method in (plain, mixed):
        torch.manual_seed(3)  # the same augmentation
        method(x)
    stepped = plain.model.layer1[1].weight.detach()
    assert not torch.equal(stepped, source)
    torch.testing.assert_close(mixed.model.layer1[1].weight.detach(), 0.99 * stepped + 0.01 * source)
    # the prior-corrected output is returned, the class-probability average moved
    assert not torch.allclose(mixed.class_probs, torch.full((10,), 0.1))


def test_augmentation_keeps_shape_and_range():
    x = torch.rand(4, 3, 16, 16)
    out = roid_augment(x)
    assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_reset_restores_the_source_bit_for_bit():
    assert_reset_restores_source(build_method("roid", TinyBNNet(), {"lr": 0.05}), batches(2))


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("roid", TinyBNNet(), {"lr": 0.05})
    method(batches(1)[0])
    before = method_state(method)
    x = batches(1, seed=3)[0]
    x[0] = float("nan")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(batches(1, seed=2)[0])).all()


def test_steps_with_the_learned_optimizer():
    method = build_method("roid", TinyBNNet(), {"optimizer": "mgg", "lr": 0.05}, mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
