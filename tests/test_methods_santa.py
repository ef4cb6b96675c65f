"""SANTA (metatta.methods.santa): parameters adapted by name, the anchored cross-entropy against
hand-computed values, the prediction, reset, non-finite batches, the learned optimizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.santa import anchored_cross_entropy
from method_checks import adapted_names, assert_reset_restores_source, method_state
from test_methods import TinyBNNet, assert_same_state, batches
from test_methods_rmt import source

FAST = {"lr": 0.01, "projection_dim": 8}


def test_defaults_and_source_data():
    cfg = method_class("santa").Config()
    assert (cfg.optimizer, cfg.lr, cfg.lr_batch_size, cfg.lambda_ce_trg, cfg.lambda_cont, cfg.temperature) == (
        "adam", 1e-3, 200, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="santa: needs labelled source data"):
        build_method("santa", TinyBNNet(), FAST)


def test_adapts_the_norm_affines_and_the_projector():
    method = build_method("santa", TinyBNNet(), FAST, source_batches=source())
    assert adapted_names(method) == {"layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}
    assert {id(p) for p in method.projector.parameters()} <= {id(p) for g in method.optimizer.param_groups
                                                               for p in g["params"]}


def test_anchored_cross_entropy_by_hand():
    s, s_aug, a = (torch.log(torch.tensor([p])) for p in ([0.7, 0.3], [0.6, 0.4], [0.2, 0.8]))
    want = -0.5 * (0.7 * math.log(0.2) + 0.3 * math.log(0.8)) - 0.5 * (0.6 * math.log(0.2) + 0.4 * math.log(0.8))
    torch.testing.assert_close(anchored_cross_entropy(s, s_aug, a), torch.tensor([want]))


def test_prediction_is_the_student_before_the_update_and_the_anchor_stays():
    method = build_method("santa", TinyBNNet(), FAST, source_batches=source())
    before = copy.deepcopy(method)
    x = batches(1)[0]
    with torch.no_grad():
        want = before.model(x)
    torch.testing.assert_close(method(x), want)
    assert not torch.equal(method.model.layer1[1].weight, before.model.layer1[1].weight)
    assert torch.equal(method.anchor.layer1[1].weight, before.anchor.layer1[1].weight)


def test_reset_restores_the_source_bit_for_bit():
    assert_reset_restores_source(build_method("santa", TinyBNNet(), FAST, source_batches=source()), batches(2))


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("santa", TinyBNNet(), FAST, source_batches=source())
    method(batches(1)[0])
    before = method_state(method)
    x = batches(1, seed=3)[0]
    x[2] = float("nan")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(batches(1, seed=2)[0])).all()


def test_steps_with_the_learned_optimizer():
    method = build_method("santa", TinyBNNet(), {**FAST, "optimizer": "mgg"}, source_batches=source(), mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
