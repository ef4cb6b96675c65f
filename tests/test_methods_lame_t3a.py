"""LAME and T3A (metatta.methods.lame, metatta.methods.t3a): gradient-free, the network untouched;
LAME's affinities and assignment update and T3A's support filter and prototypes against
hand-computed values, reset, non-finite batches, the ViT."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatta.methods import build_method, method_class
from metatta.methods.lame import knn_affinity, laplacian_assignment, rbf_affinity
from metatta.methods.t3a import prototype_logits, select_supports
from method_checks import assert_reset_restores_source, method_state, tiny_vit
from test_methods import TinyBNNet, assert_same_state, batches


@pytest.mark.parametrize("name", ["lame", "t3a"])
def test_no_parameter_is_adapted_and_the_network_is_unchanged(name):
    model = TinyBNNet()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method(name, model)
    assert method.optimizer is None and method.adapted_parameter_count() == 0
    assert not any(p.requires_grad for p in method.model.parameters())
    for x in batches(2):
        method(x)
    assert_same_state({k: v.contiguous() for k, v in method.model.state_dict().items()}, source)


def test_defaults():
    lame, t3a = method_class("lame").Config(), method_class("t3a").Config()
    assert (lame.affinity, lame.knn, lame.bound_lambda, lame.max_steps, lame.force_symmetry) == ("rbf", 5, 1.0, 100, False)
    assert t3a.filter_k == 100


@pytest.mark.parametrize("name, field, value", [("lame", "affinity", "cosine"), ("lame", "knn", 0),
                                                ("t3a", "filter_k", 0), ("t3a", "classifier", "layer1")])
def test_bad_config_is_refused_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=f"{name}: config.{field}|classifier 'layer1'"):
        build_method(name, TinyBNNet(), {field: value})


# ---- LAME by hand ---------------------------------------------------------------------------------
def test_lame_affinities_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    # 2 smallest distances per row, self included: rows 0, 1 -> 1, row 2 -> 2; sigma = mean = 4/3
    d = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    torch.testing.assert_close(rbf_affinity(z, knn=2), torch.exp(-d ** 2 / (2 * (4 / 3) ** 2)))
    torch.testing.assert_close(rbf_affinity(z, knn=2, sigma=1.0), torch.exp(-d ** 2 / 2))
    # nearest other point: 0 -> 1, 1 -> 0, 2 -> 1
    assert knn_affinity(z, knn=1).tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 0]]


def test_lame_assignment_update_by_hand():
    p = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    unary = -torch.log(p + 1e-10)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y, steps = laplacian_assignment(unary, kernel, max_steps=1)
    assert steps == 1
    # Y1_i proportional to p_i * exp(sum_j W_ij p_j): row 0 gets p_1, row 1 gets p_0, row 2 nothing
    row0 = torch.tensor([0.6 * math.exp(0.3), 0.4 * math.exp(0.7)])
    row1 = torch.tensor([0.3 * math.exp(0.6), 0.7 * math.exp(0.4)])
    torch.testing.assert_close(y, torch.stack([row0 / row0.sum(), row1 / row1.sum(), torch.tensor([0.5, 0.5])]))
    y, steps = laplacian_assignment(unary, kernel, bound_lambda=0.5, max_steps=100)
    assert 2 < steps < 100  # converged: Y is a fixed point of the update
    torch.testing.assert_close(y, (0.5 * kernel @ y - unary).softmax(1), atol=1e-6, rtol=0)


def test_lame_output_is_the_log_of_the_assignment_over_the_model_features():
    model = TinyBNNet()
    method = build_method("lame", model, {"channels_last": False})
    x = batches(1)[0]
    with torch.no_grad():
        features = model.layer2(model.layer1(x)).mean((2, 3))
        p = model.fc(features).softmax(1)
    kernel = rbf_affinity(F.normalize(features, dim=1), knn=5)
    y, _ = laplacian_assignment(-torch.log(p + 1e-10), kernel)
    torch.testing.assert_close(method(x).softmax(1), y)
    assert not torch.equal(y.argmax(1), p.argmax(1)) or not torch.allclose(y, p)  # it did adjust


def test_lame_is_stateless_and_runs_on_the_vit():
    method = build_method("lame", TinyBNNet())
    x = batches(1)[0]
    first = method(x)
    for batch in batches(2, seed=4):
        method(batch)
    torch.testing.assert_close(method(x), first, rtol=0, atol=0)
    vit = build_method("lame", tiny_vit(), {"knn": 3})
    assert vit(x).shape == (16, 10) and torch.isfinite(vit(x)).all()


# ---- T3A by hand ----------------------------------------------------------------------------------------
def identity_classifier() -> nn.Module:
    """features = the input itself (B, 2); classifier = identity weights, no bias: logits = z."""
    fc = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(2))
    return nn.Sequential(nn.Identity(), fc).eval()


def entropy2(d: float) -> float:
    """Entropy of softmax([d, 0])."""
    q = 1 / (1 + math.exp(-d))
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))


def test_t3a_filter_and_prototypes_by_hand():
    method = build_method("t3a", identity_classifier(), {"filter_k": 2})
    # warm-up: supports e0 (class 0), e1 (class 1), both with entropy h(1)
    assert method.supports.tolist() == [[1, 0], [0, 1]] and method.labels.tolist() == [0, 1]
    torch.testing.assert_close(method.entropy, torch.tensor([entropy2(1), entropy2(1)]))
    z = torch.tensor([[2.0, 0.0], [4.0, 1.0], [0.0, 1.0]])  # labels 0, 0, 1; entropies h(2), h(3), h(1)
    logits = method(z)
    # class 0 keeps its 2 most confident: [4, 1] (h(3)) then [2, 0] (h(2)); e0 (h(1)) is dropped.
    # class 1 keeps e1 and [0, 1] (equal entropy: insertion order).
    assert method.supports.tolist() == [[4, 1], [2, 0], [0, 1], [0, 1]]
    assert method.labels.tolist() == [0, 0, 1, 1]
    c0 = torch.tensor([4.0, 1.0]) / math.sqrt(17) + torch.tensor([1.0, 0.0])
    c0 = c0 / c0.norm()
    torch.testing.assert_close(logits, z @ torch.stack([c0, torch.tensor([0.0, 1.0])], dim=1))


def test_t3a_select_supports_keeps_all_with_no_filter():
    labels, entropy = torch.tensor([1, 0, 1, 0]), torch.tensor([0.3, 0.2, 0.1, 0.4])
    assert select_supports(torch.zeros(4, 2), labels, entropy, None, 2).tolist() == [1, 3, 2, 0]
    assert select_supports(torch.zeros(4, 2), labels, entropy, 1, 2).tolist() == [1, 2]
    logits = prototype_logits(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]), 2)
    torch.testing.assert_close(logits, torch.tensor([[1.0, 1.0]]))


def test_t3a_reset_restores_the_warmup_supports_bit_for_bit():
    assert_reset_restores_source(build_method("t3a", TinyBNNet()), batches(2))
    vit = build_method("t3a", tiny_vit())
    assert vit.supports.shape == (10, 32)
    assert_reset_restores_source(vit, batches(2))


@pytest.mark.parametrize("name", ["lame", "t3a"])
def test_a_nan_batch_leaves_it_finite_and_unchanged(name):
    method = build_method(name, TinyBNNet())
    method(batches(1)[0])
    before = method_state(method)
    x = batches(1, seed=3)[0]
    x[2] = float("nan")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(batches(1, seed=2)[0])).all()
