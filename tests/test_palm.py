"""Tests of PALM (metatta.methods.palm): selection, learning rates, frozen tensors, the two
variants' updates, reset, validation, and adaptation on a small corrupted stream."""
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
from metatta.methods.common import use_batch_statistics
from metatta.methods.palm import PALMConfig, palm_candidates, palm_importance

from test_methods import TinyBNNet, assert_same_state, batches

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"


def flip(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the CoTTA augmentation."""
    return x.flip(-1)


class Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip(x)

    single_view = forward


def build(model: nn.Module | None = None, **overrides):
    method = build_method("palm", model if model is not None else TinyBNNet(), overrides)
    method.augment = Flip()
    return method


def reference(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """An independent copy configured by hand: BN on batch statistics, candidates in order."""
    ref = copy.deepcopy(model)
    use_batch_statistics(ref)
    ref.eval().requires_grad_(True)
    params = [p for m in ref.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for p in (m.weight, m.bias)]
    return ref, params


def uncertainty_grads(ref: nn.Module, params: list, x: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    ref.zero_grad()
    logits = ref(x) / temperature
    target = torch.ones_like(logits)  # their code: the all-ones "uniform" target
    (-(target * F.log_softmax(logits, 1)).sum(1).mean()).backward()
    return [p.grad.detach().clone() for p in params]


def main_grads(ref: nn.Module, params: list, x: torch.Tensor, lam: float = 0.01) -> list[torch.Tensor]:
    ref.zero_grad()
    logits, logits_aug = ref(x), ref(flip(x))
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    keep = ent < 0.4 * math.log(10)
    loss = ent[keep].mean() if keep.any() else logits.sum() * 0
    loss = loss + lam * 10 * -(logits.softmax(1) * logits_aug.log_softmax(1)).sum(1).mean()
    loss.backward()
    return [p.grad.detach().clone() for p in params]


def middle_threshold(norms: list[float]) -> float:
    s = sorted(norms)
    k = len(s) // 2
    return 0.5 * (s[k - 1] + s[k])


# ---- registry, configs -------------------------------------------------------------------------
def test_registered_and_config_file_equals_defaults():
    assert "palm" in available_methods()
    cls = method_class("palm")
    assert build_dataclass(cls.Config, load_config(CONFIG_DIR / "palm.yaml"), where="palm") == cls.Config()
    c = cls.Config()
    assert (c.optimizer, c.lr, c.temperature, c.eta, c.alpha, c.lambda_consistency, c.variant) == (
        "adam", 5e-4, 50.0, 1.0, 0.5, 0.01, "paper")


@pytest.mark.parametrize("name, expected", [("palm_cifar100", (5e-4, 100.0, 0.5, 0.9)),
                                            ("palm_imagenet", (5e-5, 1000.0, 0.3, 0.5))])
def test_dataset_configs(name, expected):
    c = build_dataclass(PALMConfig, load_config(CONFIG_DIR / f"{name}.yaml"), where=name)
    assert (c.lr, c.temperature, c.eta, c.alpha) == expected


@pytest.mark.parametrize("field, value", [("eta", -1.0), ("alpha", 1.5), ("alpha", -0.1), ("temperature", 0.0),
                                          ("temperature", -2.0), ("lambda_consistency", -0.01),
                                          ("variant", "nope"), ("optimizer", "sgd"), ("eps", 0.0),
                                          ("entropy_margin_scale", "x"), ("uncertainty_loss", "x")])
def test_bad_configs_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"palm: config.{field} must be"):
        build_method("palm", TinyBNNet(), {field: value})


def test_eta_message():
    with pytest.raises(ValueError, match=r"palm: config.eta must be >= 0, got -1"):
        build_method("palm", TinyBNNet(), {"eta": -1})


def test_optimizer_factory_is_refused():
    with pytest.raises(ValueError, match="optimizer_factory"):
        build_method("palm", TinyBNNet(), optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))


def test_candidates_are_norm_and_conv_weights_and_biases():
    model = TinyBNNet()
    names = [n for n, _ in palm_candidates(model)]
    assert names == ["layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias",
                     "layer2.0.weight", "layer2.0.bias", "layer2.1.weight", "layer2.1.bias"]
    method = build(model)
    assert not model.fc.weight.requires_grad and all(p.requires_grad for p in method.candidates)
    assert all(m.running_mean is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---- selection, rates, frozen tensors ------------------------------------------------------------
def test_importance_formula_on_known_numbers():
    theta = [torch.tensor([1.0, -2.0, 0.0])]
    grad = [torch.tensor([0.5, 0.25, 3.0])]
    prev = [torch.tensor([0.1, 0.0, 0.0])]
    s_hat, imp = palm_importance(theta, grad, prev, alpha=0.5, eps=1e-8)
    torch.testing.assert_close(s_hat[0], torch.tensor([0.3, 0.25, 0.0]))
    torch.testing.assert_close(imp[0], torch.tensor([(0.2 + 1e-8) / (0.3 + 1e-8), 1.0, 1.0]))
    assert torch.equal(prev[0], torch.tensor([0.1, 0.0, 0.0]))  # inputs untouched


def test_selection_picks_exactly_the_tensors_under_eta_and_only_they_move():
    x1, x2 = batches(2)
    model = TinyBNNet()
    ref, ref_params = reference(model)
    norms = [g.abs().sum().item() for g in uncertainty_grads(ref, ref_params, x1, 50.0)]
    eta = middle_threshold(norms)
    method = build(model, eta=eta, lr=0.01)
    expected = [n <= eta for n in norms]
    assert 0 < sum(expected) < len(expected)
    before = [p.detach().clone() for p in method.candidates]
    method(x1)
    assert method.last_selected == expected
    for sel, p, b in zip(expected, method.candidates, before):
        assert (not torch.equal(p, b)) == sel
    n_sel = sum(p.numel() for s, p in zip(expected, method.candidates) if s)
    assert method.adapted_parameter_count() == n_sel
    assert method.last_adapted_fraction == pytest.approx(n_sel / sum(p.numel() for p in method.candidates))
    # nothing under eta: nothing moves
    method.config.eta = 0.0
    after = [p.detach().clone() for p in method.candidates]
    method(x2)
    assert not any(method.last_selected) and method.adapted_parameter_count() == 0
    assert all(torch.equal(p, a) for p, a in zip(method.candidates, after))


def test_learning_rates_and_first_adam_step_follow_the_formula():
    x1, x2 = batches(2, seed=4)
    model = TinyBNNet()
    lr, alpha, eps = 0.01, 0.7, 1e-8
    method = build(model, eta=1e9, lr=lr, alpha=alpha)
    ref, ref_params = reference(model)
    g1 = uncertainty_grads(ref, ref_params, x1, 50.0)
    gm = main_grads(ref, ref_params, x1)
    theta0 = [p.detach().clone() for p in ref_params]
    method(x1)
    for k, (t, g) in enumerate(zip(theta0, g1)):
        s = (t * g).abs()
        s_hat = alpha * s  # the moving average starts at zero
        rate = lr * ((s - s_hat).abs() + eps) / (s_hat + eps)
        torch.testing.assert_close(method.s_hat[k], s_hat)
        torch.testing.assert_close(method.rates[k], rate)
        # Adam's first step: theta - rate * g / (|g| + eps)
        step = rate * gm[k] / (gm[k].abs() + eps)
        torch.testing.assert_close(method.candidates[k].detach(), t - step, atol=1e-7, rtol=1e-5)
    # second batch: the moving average carries over, rates use the updated weights
    with torch.no_grad():
        for p, q in zip(ref_params, method.candidates):
            p.copy_(q)
    g2 = uncertainty_grads(ref, ref_params, x2, 50.0)
    prev = [s.clone() for s in method.s_hat]
    method(x2)
    for k, (t, g) in enumerate(zip(ref_params, g2)):
        s = (t.detach() * g).abs()
        s_hat = alpha * s + (1 - alpha) * prev[k]
        torch.testing.assert_close(method.s_hat[k], s_hat)
        torch.testing.assert_close(method.rates[k], lr * ((s - s_hat).abs() + eps) / (s_hat + eps))
    assert all(method.optimizer.state[p]["step"] == 2 for p in method.candidates)  # persistent Adam


def test_code_variant_scalar_rates_stale_rates_and_fresh_adam():
    x1, x2 = batches(2, seed=5)
    model = TinyBNNet()
    method = build(model, variant="code", eta=1e9, lr=0.01)
    method(x1)
    assert all(r is not None and r.ndim == 0 for r in method.rates)
    assert not method.optimizer.state  # a fresh Adam every step keeps no state
    stale = [r.clone() for r in method.rates]
    s_hat = [s.clone() for s in method.s_hat]
    ref, ref_params = reference(method.model)
    gm = main_grads(ref, ref_params, x2)
    before = [p.detach().clone() for p in method.candidates]
    method.config.eta = 0.0  # nothing selected: every tensor keeps its stale rate and still moves
    method(x2)
    assert not any(method.last_selected)
    assert_same_state(method.rates, stale, "rates")
    assert_same_state(method.s_hat, s_hat, "s_hat")
    assert method.adapted_parameter_count() == sum(p.numel() for p in method.candidates)
    for p, b, r, g in zip(method.candidates, before, stale, gm):
        torch.testing.assert_close(p.detach(), b - r * g / (g.abs() + 1e-8), atol=1e-7, rtol=1e-5)


def test_code_variant_never_selected_tensors_do_not_move():
    x = batches(1)[0]
    model = TinyBNNet()
    ref, ref_params = reference(model)
    norms = [g.abs().sum().item() for g in uncertainty_grads(ref, ref_params, x, 50.0)]
    method = build(model, variant="code", eta=middle_threshold(norms), lr=0.01)
    before = [p.detach().clone() for p in method.candidates]
    method(x)
    for sel, p, b in zip(method.last_selected, method.candidates, before):
        assert (not torch.equal(p, b)) == sel


def test_kl_uncertainty_loss_is_the_paper_kl():
    from metatta.methods.palm import uncertainty_loss

    z = torch.randn(6, 5)
    p = (z / 3).softmax(1)
    kl = (p * (p.log() - math.log(1 / 5))).sum(1).mean()
    torch.testing.assert_close(uncertainty_loss(z, 3.0, "kl"), kl)
    torch.testing.assert_close(uncertainty_loss(z, 3.0, "uniform_ce"), -(z / 3).log_softmax(1).sum(1).mean())


# ---- state -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_reset_restores_model_moving_average_rates_and_optimizer(variant):
    cfg = dict(variant=variant, eta=1e9, lr=0.01)
    method = build(TinyBNNet(), **cfg)
    source = {"model": copy.deepcopy(method.model.state_dict()), "opt": copy.deepcopy(method.optimizer.state_dict()),
              "extra": copy.deepcopy(method.extra_state())}
    xs = batches(3)
    for x in xs:
        method(x)
    assert any(s.abs().sum() > 0 for s in method.s_hat) and all(r is not None for r in method.rates)
    method.reset()
    assert_same_state(method.model.state_dict(), source["model"], "model")
    assert_same_state(method.optimizer.state_dict(), source["opt"], "optimizer")
    assert_same_state(method.extra_state(), source["extra"], "extra")
    again = [method(x) for x in xs]
    fresh = build(TinyBNNet(), **cfg)
    for a, b in zip(again, [fresh(x) for x in xs]):
        torch.testing.assert_close(a, b)


def test_extra_state_snapshot_is_not_mutated_by_a_step():
    method = build(TinyBNNet(), eta=1e9)
    x1, x2 = batches(2)
    method(x1)
    snap = method.extra_state()
    kept = copy.deepcopy(snap)
    method(x2)
    assert_same_state(snap, kept, "extra")


# ---- adaptation -------------------------------------------------------------------------------------
def _calibrated_source(clean: torch.Tensor) -> TinyBNNet:
    model = TinyBNNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(clean)
    model.eval()
    return model


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_reduces_error_versus_source_on_a_corrupted_stream(variant):
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(384, 3, 16, 16, generator=g)
    source = _calibrated_source(clean)
    with torch.no_grad():
        labels = source(clean).argmax(1)
    corrupted = (0.4 * clean + 0.45 + 0.08 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    with torch.no_grad():
        source_error = (source(corrupted).argmax(1) != labels).float().mean().item()
    method = build_method("palm", copy.deepcopy(source), {"variant": variant})
    torch.manual_seed(0)
    predictions = torch.cat([method(xb).argmax(1) for xb in corrupted.split(64)])
    error = (predictions != labels).float().mean().item()
    assert source_error > 0.3
    assert error < source_error - 0.15, (error, source_error)
    assert 0.0 <= method.last_adapted_fraction <= 1.0
    assert all(torch.isfinite(p).all() for p in method.candidates)
