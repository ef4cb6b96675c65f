"""RoTTA (metatta.methods.rotta): parameters adapted by name, robust BN, the memory bank's
insertions and the timeliness weights against hand-computed values, the teacher's EMA, reset,
non-finite batches, the learned optimizer."""
from __future__ import annotations

import math

import torch
from torch import nn

from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.rotta import CSTUMemory, set_adaptation_pass, timeliness_weights
from method_checks import adapted_names, assert_nan_batch_skipped, assert_reset_restores_source, tiny_vit
from test_methods import TinyBNNet, batches

FAST = {"lr": 0.01, "memory_size": 16, "update_frequency": 16}


def test_defaults_are_the_authors():
    cfg = method_class("rotta").Config()
    assert (cfg.optimizer, cfg.lr, cfg.betas, cfg.lr_batch_size) == ("adam", 1e-3, (0.9, 0.999), None)
    assert (cfg.memory_size, cfg.update_frequency, cfg.nu, cfg.alpha, cfg.lambda_t, cfg.lambda_u) == (
        64, 64, 0.001, 0.05, 1.0, 1.0)


def test_lr_does_not_scale_with_the_test_batch():
    # the update batch is the memory bank, whatever the test batch (their code: OPTIM.LR at any batch)
    method = build_method("rotta", TinyBNNet(), {}, batch_size=16)
    assert method.optimizer.param_groups[0]["lr"] == 1e-3


def test_adapts_the_norm_affines_of_a_bn_net_and_a_vit():
    assert adapted_names(build_method("rotta", TinyBNNet())) == {
        "layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}
    vit = build_method("rotta", tiny_vit())
    assert adapted_names(vit) == {n for n, _ in vit.model.named_parameters() if ".norm" in n}


def test_robust_bn_by_hand():
    bn = nn.BatchNorm2d(1)
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    method = build_method("rotta", nn.Sequential(bn), {"channels_last": False})
    layer = method.model[0]
    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(2, 1, 1, 2)  # batch mean 3, biased variance 5
    torch.testing.assert_close(layer(x), (x - 1.0) / math.sqrt(4.0 + 1e-5))  # prediction: global statistics
    set_adaptation_pass(method.model, True)
    mean, var = 0.95 * 1.0 + 0.05 * 3.0, 0.95 * 4.0 + 0.05 * 5.0
    torch.testing.assert_close(layer(x), (x - mean) / math.sqrt(var + 1e-5))
    torch.testing.assert_close(layer.running_mean, torch.tensor([mean]))  # stored as the new global ones
    torch.testing.assert_close(layer.running_var, torch.tensor([var]))


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_memory_bank_insertions_by_hand():
    bank = CSTUMemory(capacity=4, num_classes=2)  # 2 per class; score = sigmoid(age / 4) + u / ln 2
    image = torch.zeros(1)
    tag = {}

    def add(name, label, u):
        tag[u] = name
        return bank.add(image, label, u)

    assert add("a", 0, 0.1) and add("b", 0, 0.5)
    # class 0 is full: its highest score is b's, sig(1/4) + 0.5/ln2 = 1.28 > the new sig(0) + 0.2/ln2 = 0.79
    assert sig(1 / 4) + 0.5 / math.log(2) > 0.5 + 0.2 / math.log(2)
    assert add("c", 0, 0.2)
    assert [tag[i.uncertainty] for i in bank.items[0]] == ["a", "c"] and [i.age for i in bank.items[0]] == [3, 1]
    assert add("d", 1, 0.6) and add("e", 1, 0.9)  # class 1 has room, the bank too: now full
    # f (class 0, u 0): a scores sig(5/4) + 0.1/ln2 = 0.92, c sig(3/4) + 0.2/ln2 = 0.97 (highest) > 0.5: c goes
    assert add("f", 0, 0.0)
    assert [tag[i.uncertainty] for i in bank.items[0]] == ["a", "f"]
    # g (class 1, u 1): e scores sig(2/4) + 0.9/ln2 = 1.92 < g's own 0.5 + 1/ln2 = 1.94: g stays out
    assert not add("g", 1, 1.0)
    assert [tag[i.uncertainty] for i in bank.items[1]] == ["d", "e"]
    images, ages = bank.contents()
    assert len(images) == 4 and ages == [7 / 4, 2 / 4, 4 / 4, 3 / 4]  # a, f, d, e, aged by every offer


def test_memory_bank_replaces_from_the_majority_class_when_full():
    bank = CSTUMemory(capacity=3, num_classes=2)  # 1.5 per class
    for u in (0.3, 0.1):
        bank.add(torch.zeros(1), 0, u)
    bank.add(torch.zeros(1), 1, 0.2)  # full: class 0 holds 2, class 1 holds 1
    # class 1 is under its share but the bank is full: the highest score of the majority class 0 goes
    # (u 0.3, age 3: sig(1) + 0.3/ln2 = 1.16 > the new 0.5 + 0.05/ln2 = 0.57)
    assert bank.add(torch.zeros(1), 1, 0.05)
    assert [i.uncertainty for i in bank.items[0]] == [0.1] and [i.uncertainty for i in bank.items[1]] == [0.2, 0.05]


def test_timeliness_weights_by_hand():
    ages = torch.tensor([0.0, 1.0, 2.5])
    torch.testing.assert_close(timeliness_weights(ages), torch.tensor([0.5, sig(-1.0), sig(-2.5)]))


def test_one_update_per_update_frequency_and_the_teacher_follows_by_ema():
    method = build_method("rotta", TinyBNNet(), {**FAST, "nu": 0.25})
    teacher_before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    method(batches(1, batch_size=8)[0])
    assert method.updates == 0 and method.seen == 8 and len(method.memory) >= 1  # 8 of 16 images: no update yet
    method(batches(1, batch_size=8, seed=2)[0])
    assert method.updates == 1
    student = dict(method.model.named_parameters())
    for n, t in method.teacher.named_parameters():
        torch.testing.assert_close(t, 0.75 * teacher_before[n] + 0.25 * student[n].detach())
    assert not torch.equal(student["layer1.1.weight"], teacher_before["layer1.1.weight"])


def test_reset_restores_the_source_bit_for_bit():
    method = build_method("rotta", TinyBNNet(), FAST)
    assert_reset_restores_source(method, batches(2))
    assert method.seen == 16  # the one batch assert_reset_restores_source ran after the reset


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("rotta", TinyBNNet(), FAST)
    assert_nan_batch_skipped(method, [batches(1)[0], batches(1, seed=3)[0], batches(1, seed=2)[0]])


def test_steps_with_the_learned_optimizer():
    method = build_method("rotta", TinyBNNet(), {**FAST, "optimizer": "mgg", "lr": 0.05}, mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    assert method.updates == 1
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
