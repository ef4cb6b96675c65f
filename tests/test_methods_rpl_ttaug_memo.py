"""RPL, TTAug and MEMO (metatta.methods.rpl, .ttaug, .memo) and their AugMix views
(metatta.methods.augmix): parameters adapted by name, the generalized cross-entropy, the
TTAug average and MEMO's marginal entropy against hand-computed values, reset, non-finite
batches, the learned optimizer."""
from __future__ import annotations

import math

import pytest
import torch

from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.augmix import OPERATIONS, augmix_views, operate
from metatta.methods.memo import marginal_entropy
from metatta.methods.rpl import generalized_cross_entropy
from method_checks import adapted_names, assert_reset_restores_source, method_state, tiny_vit
from test_methods import TinyBNNet, assert_same_state, batches

NORM_AFFINES = {"layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}


def test_defaults():
    rpl, memo, ttaug = (method_class(n).Config() for n in ("rpl", "memo", "ttaug"))
    assert (rpl.optimizer, rpl.lr, rpl.lr_batch_size, rpl.q) == ("adam", 1e-3, 200, 0.8)
    assert (memo.optimizer, memo.lr, memo.momentum, memo.episodic, memo.num_augmentations, memo.bn_alpha) == (
        "sgd", 0.005, 0.9, True, 32, 0.1)
    assert (ttaug.num_augmentations, ttaug.bn_alpha) == (32, 0.1)


@pytest.mark.parametrize("name, field, value", [("rpl", "q", 0.0), ("memo", "num_augmentations", 0),
                                                ("ttaug", "bn_alpha", 2.0), ("memo", "preaugmentation", "zoom")])
def test_bad_config_is_refused_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=f"{name}: config.{field}"):
        build_method(name, TinyBNNet(), {field: value})


# ---- what each adapts ---------------------------------------------------------------------------------
def test_adapted_parameters_by_name():
    assert adapted_names(build_method("rpl", TinyBNNet())) == NORM_AFFINES
    memo = build_method("memo", TinyBNNet())
    assert adapted_names(memo) == {n for n, _ in memo.model.named_parameters()}  # the whole network
    assert build_method("ttaug", TinyBNNet()).optimizer is None
    vit = build_method("rpl", tiny_vit())
    assert adapted_names(vit) == {n for n in vit.model.state_dict() if ".norm" in n and n.endswith(("weight", "bias"))}


# ---- the mechanisms, by hand ---------------------------------------------------------------------------
def test_generalized_cross_entropy_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    got = generalized_cross_entropy(logits, torch.tensor([0, 2]), q=0.8)
    torch.testing.assert_close(got, torch.tensor([(1 - 0.5 ** 0.8) / 0.8, (1 - 0.8 ** 0.8) / 0.8]))
    method = build_method("rpl", TinyBNNet())
    logits = torch.randn(5, 10)
    p_max = logits.softmax(1).max(1).values
    torch.testing.assert_close(method.loss(None, logits), ((1 - p_max ** 0.8) / 0.8).mean())


def test_marginal_entropy_by_hand():
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.4, 0.6]])) + torch.tensor([[1.0], [-2.0]])  # shifts don't matter
    torch.testing.assert_close(marginal_entropy(logits), torch.tensor(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4))))


def test_ttaug_averages_the_logits_over_the_image_and_its_views():
    model = TinyBNNet()
    method = build_method("ttaug", model, {"num_augmentations": 3, "bn_alpha": None, "channels_last": False})
    x = batches(1, batch_size=2)[0]
    torch.manual_seed(4)
    got = method(x)
    torch.manual_seed(4)
    with torch.no_grad():
        want = torch.stack([model(torch.cat([image[None], augmix_views(image, 3)])).mean(0) for image in x])
    torch.testing.assert_close(got, want)


def test_memo_takes_one_step_on_the_views_then_predicts_the_image():
    model = TinyBNNet()
    method = build_method("memo", model, {"num_augmentations": 4, "bn_alpha": None, "channels_last": False,
                                          "optimizer": "sgd", "momentum": 0.0, "lr": 0.1})
    twin = build_method("source", TinyBNNet())  # the same source weights, by hand below
    image = batches(1, batch_size=1)[0]
    torch.manual_seed(2)
    got = method(image)
    torch.manual_seed(2)
    views = augmix_views(image[0], 4)
    weights = dict(twin.model.named_parameters())
    loss = marginal_entropy(twin.model(views))
    grads = torch.autograd.grad(loss, list(weights.values()))
    with torch.no_grad():
        for p, g in zip(weights.values(), grads):
            p.sub_(0.1 * g)
        torch.testing.assert_close(got, twin.model(image))


def test_memo_is_episodic_per_image():
    method = build_method("memo", TinyBNNet(), {"num_augmentations": 2})
    x = batches(1, batch_size=3)[0]
    torch.manual_seed(0)
    together = method(x)
    torch.manual_seed(0)  # the same random draws, image by image: each starts from the source
    alone = torch.cat([method(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_augmix_views_shapes_and_operations():
    image = torch.rand(3, 16, 16)
    views = augmix_views(image, 5)
    assert views.shape == (5, 3, 16, 16) and torch.isfinite(views).all()
    assert not torch.equal(views[0], views[1])
    for op in OPERATIONS:
        assert operate(image, op, 1.0).shape == image.shape
    flat = torch.full((1, 4, 4), 0.7)
    assert torch.equal(operate(flat, "posterize", 1.0), torch.full((1, 4, 4), 0.6875))  # 4 bits: floor(11.2) / 16


# ---- state -------------------------------------------------------------------------------------------------
def test_reset_restores_the_source_bit_for_bit():
    assert_reset_restores_source(build_method("rpl", TinyBNNet(), {"lr": 0.01}), batches(2))
    memo = build_method("memo", TinyBNNet(), {"num_augmentations": 2, "episodic": False})
    assert_reset_restores_source(memo, [batches(1, batch_size=2)[0]])


@pytest.mark.parametrize("name", ["rpl", "memo", "ttaug"])
def test_a_nan_batch_leaves_it_finite_and_unchanged(name):
    method = build_method(name, TinyBNNet(), {"num_augmentations": 2} if name != "rpl" else {"lr": 0.01})
    method(batches(1, batch_size=4)[0])
    before = method_state(method)
    x = batches(1, batch_size=4, seed=3)[0]
    x[1] = float("inf")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(batches(1, batch_size=4, seed=2)[0])).all()


@pytest.mark.parametrize("name", ["rpl", "memo"])
def test_steps_with_the_learned_optimizer(name):
    extra = {"num_augmentations": 2, "episodic": False} if name == "memo" else {}
    method = build_method(name, TinyBNNet(), {"optimizer": "mgg", "lr": 0.05, **extra}, mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1, batch_size=2)[0])
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
