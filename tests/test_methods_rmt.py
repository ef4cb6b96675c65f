"""RMT (metatta.methods.rmt): parameters adapted by name, the symmetric cross-entropy, the
contrastive loss and the source prototypes against hand-computed values, the warm-up, the
ensemble output, reset, non-finite batches, the learned optimizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.rmt import contrastive_loss, symmetric_cross_entropy
from method_checks import adapted_names, assert_reset_restores_source, method_state
from test_methods import TinyBNNet, assert_same_state, batches

FAST = {"lr": 0.01, "warmup_samples": 0, "projection_dim": 8}


def source(n: int = 2, batch_size: int = 16) -> list:
    return [(x, torch.arange(len(x)) % 10) for x in batches(n, batch_size=batch_size, seed=9)]


def test_defaults_are_the_authors_cifar_setting():
    cfg = method_class("rmt").Config()
    assert (cfg.optimizer, cfg.lr, cfg.lr_batch_size, cfg.teacher_momentum, cfg.temperature) == (
        "adam", 1e-3, 200, 0.999, 0.1)
    assert (cfg.lambda_ce_trg, cfg.lambda_cont, cfg.lambda_ce_src, cfg.projection_dim, cfg.warmup_samples) == (
        1.0, 1.0, 1.0, 128, 50000)


def test_needs_labelled_source_batches():
    with pytest.raises(ValueError, match="rmt: needs labelled source data"):
        build_method("rmt", TinyBNNet(), FAST)
    with pytest.raises(ValueError, match=r"rmt: source_batches\[0\] must be an \(images, labels"):
        build_method("rmt", TinyBNNet(), FAST, source_batches=[torch.rand(2, 3, 16, 16)])
    with pytest.raises(ValueError, match="no image of classes"):
        build_method("rmt", TinyBNNet(), FAST, source_batches=[(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))])


def test_adapts_the_whole_student_and_the_projector():
    method = build_method("rmt", TinyBNNet(), FAST, source_batches=source())
    assert adapted_names(method) == {n for n, _ in method.model.named_parameters()}
    projector = {id(p) for p in method.projector.parameters()}
    assert projector <= {id(p) for g in method.optimizer.param_groups for p in g["params"]}


def test_symmetric_cross_entropy_by_hand():
    s, t = torch.log(torch.tensor([[0.7, 0.3]])), torch.log(torch.tensor([[0.4, 0.6]]))
    want = -0.5 * (0.4 * math.log(0.7) + 0.6 * math.log(0.3)) - 0.5 * (0.7 * math.log(0.4) + 0.3 * math.log(0.6))
    torch.testing.assert_close(symmetric_cross_entropy(s, t), torch.tensor([want]))


def test_contrastive_loss_by_hand():
    torch.manual_seed(0)
    views = nn.functional.normalize(torch.randn(2, 2, 3), dim=2)  # B = 2 samples, V = 2 views
    flat = [views[0, 0], views[1, 0], views[0, 1], views[1, 1]]  # view-major order
    partner = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for a in range(4):
        sims = {k: float(flat[a] @ flat[k]) / 0.1 for k in range(4) if k != a}
        total += -(sims[partner[a]] - math.log(sum(math.exp(v) for v in sims.values())))
    torch.testing.assert_close(contrastive_loss(views, 0.1), torch.tensor(total / 4))


def test_source_prototypes_are_the_class_means_of_the_features():
    # features of a Flatten -> Linear net: the flattened images themselves
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 2], [0, 5.0, 1, 1]]).view(3, 1, 2, 2)
    method = build_method("rmt", model, {**FAST, "channels_last": False}, source_batches=[(x, torch.tensor([0, 0, 1]))])
    torch.testing.assert_close(method.prototypes, torch.tensor([[2.0, 0, 0, 1], [0, 5.0, 1, 1]]))


def test_warm_up_moves_student_and_teacher_and_restores_the_lr():
    model = TinyBNNet()
    plain = build_method("rmt", copy.deepcopy(model), FAST, source_batches=source())
    warmed = build_method("rmt", copy.deepcopy(model), {**FAST, "warmup_samples": 32}, source_batches=source())
    assert warmed.optimizer.param_groups[0]["lr"] == 0.01
    w0 = plain.model.layer1[0].weight
    assert not torch.equal(warmed.model.layer1[0].weight, w0)
    assert not torch.equal(warmed.teacher.layer1[0].weight, w0)
    assert_same_state(method_state(warmed), warmed._source_state)  # the warmed-up state is the one reset returns to


def test_output_is_student_plus_teacher_before_the_update():
    method = build_method("rmt", TinyBNNet(), FAST, source_batches=source())
    before = copy.deepcopy(method)
    x = batches(1)[0]
    with torch.no_grad():
        want = before.model(x) + before.teacher(x)
    torch.testing.assert_close(method(x), want)
    assert not torch.equal(method.model.fc.weight, before.model.fc.weight)


def test_reset_restores_the_source_bit_for_bit():
    assert_reset_restores_source(build_method("rmt", TinyBNNet(), FAST, source_batches=source()), batches(2))


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("rmt", TinyBNNet(), FAST, source_batches=source())
    method(batches(1)[0])
    before = method_state(method)
    x = batches(1, seed=3)[0]
    x[3] = float("nan")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(batches(1, seed=2)[0])).all()


def test_steps_with_the_learned_optimizer():
    method = build_method("rmt", TinyBNNet(), {**FAST, "optimizer": "mgg"}, source_batches=source(), mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
