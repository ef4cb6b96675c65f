"""Tests of LAW (layer-wise auto-weighting, Park et al., WACV 2024): the Fisher
accumulation and per-tensor learning rates on hand-built models with known
gradients, state reset, config checks, and adaptation on a small corrupted stream."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatta.config import build_dataclass, load_config
from metatta.methods import available_methods, build_method, method_class
from metatta.methods.law import LAW, LAWConfig

from test_methods import TinyBNNet, assert_same_state, batches

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"


class ScaledLinearNet(nn.Module):
    """logits = s * (w x + b) for a scalar input x, as 1x1 convolutions: three adapted
    tensors (w, b of the first conv, s of the grouped second) with closed-form gradients."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.scale = nn.Conv2d(2, 2, 1, groups=2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.5, -0.5]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.2, 0.4]))
            self.scale.weight.copy_(torch.tensor([2.0, 0.5]).view(2, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x)).flatten(1)


def closed_form_grads(net: ScaledLinearNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of CE(logits, argmax logits) for ScaledLinearNet, without autograd."""
    w, b = net.conv.weight.detach().view(2), net.conv.bias.detach()
    s = net.scale.weight.detach().view(2)
    xi = x.view(-1, 1)
    h = w * xi + b
    z = s * h
    delta = (z.softmax(1) - F.one_hot(z.argmax(1), 2).to(z.dtype)) / len(xi)  # dCE/dz
    return [(delta * s * xi).sum(0).view(2, 1, 1, 1), (delta * s).sum(0), (delta * h).sum(0).view(2, 1, 1, 1)]


def expected_lrs(fims: list[torch.Tensor], lr: float, tau: float, eps: float = 1e-8) -> list[float]:
    s = [math.sqrt(f.double().mean().item()) for f in fims]
    lo, hi = min(s), max(s)
    return [lr * ((v - lo) / (hi - lo + eps)) ** tau for v in s]


def scalar_inputs(seed: int = 0, n: int = 12) -> torch.Tensor:
    return torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed))


# ---- registry and configs ---------------------------------------------------------------------
def test_registered_and_config_files_match():
    assert "law" in available_methods() and method_class("law") is LAW
    assert build_dataclass(LAWConfig, load_config(CONFIG_DIR / "law.yaml"), where="law") == LAWConfig()
    c = LAWConfig()
    assert (c.optimizer, c.lr, tuple(c.betas), c.weight_decay, c.steps, c.episodic, c.tau, c.consistency_weight) == (
        "adam", 1e-3, (0.9, 0.999), 0.0, 1, False, 1.0, 0.1)
    c100 = build_dataclass(LAWConfig, load_config(CONFIG_DIR / "law_cifar100.yaml"), where="law")
    assert (c100.lr, c100.tau, c100.consistency_weight) == (5e-5, 0.6, 1.0)
    inet = build_dataclass(LAWConfig, load_config(CONFIG_DIR / "law_imagenet.yaml"), where="law")
    assert (inet.lr, inet.tau, inet.consistency_weight) == (2e-4, 1.0, 10.0)


@pytest.mark.parametrize("field,value", [
    ("lr", -1e-3), ("tau", -0.5), ("consistency_weight", -1.0), ("eps", 0.0), ("eps", -1.0),
    ("weight_decay", -0.1), ("aug_noise_std", -0.01), ("steps", 0), ("lr", float("nan")),
    ("tau", float("inf")), ("betas", (0.9, 1.0)),
])
def test_bad_configs_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"config.{field}"):
        build_method("law", TinyBNNet(), {field: value})


def test_adapts_conv_and_norm_tensors_only_one_group_each():
    method = build_method("law", TinyBNNet())
    assert method.adapted_names == ["layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias",
                                    "layer2.0.weight", "layer2.0.bias", "layer2.1.weight", "layer2.1.bias"]
    groups = method.optimizer.param_groups
    assert [g["params"][0] for g in groups] == method.adapted and all(len(g["params"]) == 1 for g in groups)
    assert not method.model.fc.weight.requires_grad


# ---- Fisher and learning rates ------------------------------------------------------------------
def test_fisher_accumulates_squared_pseudo_label_gradients_without_decay():
    method = build_method("law", ScaledLinearNet(), {"lr": 0.0, "consistency_weight": 0.0})
    x = scalar_inputs()
    g = closed_form_grads(method.model, x)
    for k in (1, 2, 3):  # lr 0: the parameters (hence the gradients) stay; F = k g^2
        method(x)
        for f, gi in zip(method.fim, g):
            torch.testing.assert_close(f, k * gi ** 2, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_learning_rates_follow_the_formula_with_known_gradients(tau):
    net = ScaledLinearNet()
    method = build_method("law", net, {"lr": 0.01, "tau": tau, "consistency_weight": 0.0})
    x1, x2 = scalar_inputs(0), scalar_inputs(1)
    g1 = closed_form_grads(net, x1)
    before = [p.detach().clone() for p in method.adapted]
    method(x1)
    fim = [g ** 2 for g in g1]
    lrs = [grp["lr"] for grp in method.optimizer.param_groups]
    assert lrs == pytest.approx(expected_lrs(fim, 0.01, tau), rel=1e-5, abs=1e-12)
    assert min(lrs) == 0.0 and max(lrs) == pytest.approx(0.01, rel=1e-5)
    # first step of a fresh Adam, p -= lr * g / (|g| + 1e-8): each tensor moves by at most its own
    # lr per element, and the tensor with the smallest Fisher (lr 0) does not move
    for p, p0, lr in zip(method.adapted, before, lrs):
        step = (p0 - p.detach()).abs()
        assert torch.all(step <= lr * (1 + 1e-5) + 1e-12)
    i_min = lrs.index(0.0)
    assert torch.equal(method.adapted[i_min].detach(), before[i_min])
    # second batch: the Fisher adds g^2 at the updated parameters, never decays
    g2 = closed_form_grads(net, x2)
    method(x2)
    fim = [a + b ** 2 for a, b in zip(fim, g2)]
    for f, e in zip(method.fim, fim):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-10)
    lrs = [grp["lr"] for grp in method.optimizer.param_groups]
    assert lrs == pytest.approx(expected_lrs(fim, 0.01, tau), rel=1e-5, abs=1e-12)


def test_min_max_normalisation_across_tensors():
    method = build_method("law", TinyBNNet(), {"lr": 0.1, "tau": 1.0})
    means = [1.0, 4.0, 9.0, 16.0, 2.25, 6.25, 12.25, 4.0]  # s = 1, 2, 3, 4, 1.5, 2.5, 3.5, 2
    method.load_extra_state({"fim": [torch.full_like(f, m) for f, m in zip(method.fim, means)]})
    s = torch.tensor(means).sqrt()
    torch.testing.assert_close(method.layer_scores(), s.double())
    w = (s - 1.0) / (3.0 + 1e-8)
    assert method.layer_learning_rates() == pytest.approx((0.1 * w).tolist(), rel=1e-6, abs=1e-12)
    method.config.tau = 0.5
    assert method.layer_learning_rates() == pytest.approx((0.1 * w.double().sqrt()).tolist(), rel=1e-6, abs=1e-12)
    # non-uniform tensors: s is the root of the mean, not the mean of the roots
    fim = [torch.zeros_like(f) for f in method.fim]
    fim[0][(0,) * fim[0].dim()] = 8.0 * fim[0].numel()  # mean 8
    fim[1].fill_(2.0)
    method.load_extra_state({"fim": fim})
    assert method.layer_scores()[:2].tolist() == pytest.approx([math.sqrt(8.0), math.sqrt(2.0)])


def test_fisher_matches_autograd_on_a_bn_net():
    model = TinyBNNet()
    method = build_method("law", model, {"lr": 0.0})
    reference = copy.deepcopy(method.model)
    x = batches(1, batch_size=16)[0]
    method(x)
    logits = reference(x)
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params)
    for f, g in zip(method.fim, grads):
        torch.testing.assert_close(f, g ** 2, rtol=1e-4, atol=1e-12)


def test_fresh_optimizer_state_each_step_like_the_authors_new_adam():
    method = build_method("law", TinyBNNet(), {"lr": 0.01})
    for x in batches(3):
        method(x)
    assert all(s["step"].item() == 1 for s in method.optimizer.state.values())
    persistent = build_method("law", TinyBNNet(), {"lr": 0.01, "fresh_optimizer_state": False})
    for x in batches(3):
        persistent(x)
    assert all(s["step"].item() == 3 for s in persistent.optimizer.state.values())


# ---- state -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fresh", [True, False])
def test_reset_restores_model_fisher_and_optimizer(fresh):
    cfg = {"lr": 0.01, "fresh_optimizer_state": fresh}
    method = build_method("law", TinyBNNet(), cfg)
    source = {"model": copy.deepcopy(method.model.state_dict()), "opt": copy.deepcopy(method.optimizer.state_dict()),
              "extra": copy.deepcopy(method.extra_state())}
    xs = batches(2, batch_size=8)
    first = [method(x) for x in xs]
    assert any(f.abs().sum() > 0 for f in method.fim)
    assert not torch.equal(method.model.layer1[0].weight, source["model"]["layer1.0.weight"])
    method.reset()
    assert_same_state(method.model.state_dict(), source["model"], "model")
    assert_same_state(method.optimizer.state_dict(), source["opt"], "optimizer")
    assert_same_state(method.extra_state(), source["extra"], "fisher")
    assert all(f.abs().sum() == 0 for f in method.fim)
    torch.manual_seed(0)
    again = [method(x) for x in xs]
    fresh_method = build_method("law", TinyBNNet(), cfg)
    torch.manual_seed(0)
    ref = [fresh_method(x) for x in xs]
    for a, b in zip(again, ref):
        torch.testing.assert_close(a, b)
    del first


def test_reset_rejects_a_mismatched_fisher():
    method = build_method("law", TinyBNNet())
    with pytest.raises(ValueError, match="Fisher"):
        method.load_extra_state({"fim": method.fim[:-1]})


# ---- adaptation ----------------------------------------------------------------------------------
def _calibrated_source(clean: torch.Tensor) -> TinyBNNet:
    """TinyBNNet whose BN running statistics are those of the clean data."""
    model = TinyBNNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(clean)
    model.eval()
    return model


def test_reduces_error_versus_source_on_a_corrupted_stream():
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(384, 3, 16, 16, generator=g)
    source = _calibrated_source(clean)
    with torch.no_grad():
        labels = source(clean).argmax(1)  # the task: the source's clean predictions
    corrupted = (0.4 * clean + 0.45 + 0.08 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    with torch.no_grad():
        source_error = (source(corrupted).argmax(1) != labels).float().mean().item()
    method = build_method("law", copy.deepcopy(source))
    torch.manual_seed(0)
    predictions = torch.cat([method(xb).argmax(1) for xb in corrupted.split(64)])
    law_error = (predictions != labels).float().mean().item()
    assert source_error > 0.3
    print(f"source error {source_error:.3f}, LAW error {law_error:.3f}")
    assert law_error < source_error - 0.15, (law_error, source_error)


def test_non_finite_loss_or_fisher_is_rolled_back():
    method = build_method("law", TinyBNNet(), {"lr": 0.01})
    method(batches(1)[0])
    state = {"model": copy.deepcopy(method.model.state_dict()), "opt": copy.deepcopy(method.optimizer.state_dict()),
             "extra": copy.deepcopy(method.extra_state())}
    with torch.no_grad():
        method.model.fc.weight.mul_(1e38)  # frozen layer: logits overflow, the loss is NaN
    fc = method.model.fc.weight.detach().clone()
    method(batches(1, seed=5)[0])
    assert method.skipped_updates == 1
    with torch.no_grad():
        method.model.fc.weight.copy_(fc / 1e38)
    state["model"]["fc.weight"] = method.model.fc.weight.detach().clone()
    assert_same_state(method.model.state_dict(), state["model"], "model")
    assert_same_state(method.optimizer.state_dict(), state["opt"], "optimizer")
    assert_same_state(method.extra_state(), state["extra"], "fisher")
