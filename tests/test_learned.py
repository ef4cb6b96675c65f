"""Tests of the learned optimizer: GML, MGG, MGGOptimizer, MGTTA losses, the
differentiable unroll and the mgtta method."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metatta.learned.gml import GradientMemoryLayer, Memory, layer_norm_l2_grad
from metatta.learned.losses import TTALoss, entropy_loss, stats_alignment_loss
from metatta.learned.mgg import MGG, TensorState, load_mgg, moment_features, save_mgg
from metatta.learned.optimizer import MGGOptimizer, mgg_optimizer_factory
from metatta.learned.unroll import Trajectory, unroll
from metatta.methods.base import TTAMethod
from metatta.methods.common import configure_norm_adaptation, norm_affine_params, softmax_entropy
from metatta.models import build_model
from metatta.models.feature_stats import compute_feature_stats



# ---- helpers -------------------------------------------------------------------------------
def tiny_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    """Conv -> BN -> ReLU -> pool -> LayerNorm -> Linear: BN and LN affines to adapt (12 coordinates)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.LayerNorm(3), nn.Linear(3, 4),
    ).to(dtype)
    with torch.no_grad():  # non-trivial affines so every coordinate matters
        for m in (model[1], model[5]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
    configure_norm_adaptation(model)
    return model


def tiny_batches(n: int, seed: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 2, 5, 5, generator=g, dtype=dtype) for _ in range(n)]


def random_mgg(seed: int = 0, dtype=torch.float32, **kwargs) -> MGG:
    """An MGG with all weights perturbed away from their init (so no gradient is trivially zero)."""
    torch.manual_seed(seed)
    mgg = MGG(**kwargs).to(dtype)
    with torch.no_grad():
        for p in mgg.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mgg


def adapted(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- GML -----------------------------------------------------------------------------------
def explicit_gml_step(layer: GradientMemoryLayer, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
    """One coordinate, written out: projections, inner loss by formula, its gradient by autograd."""
    eps, d = layer.eps, layer.width
    gamma, beta = layer.inner_norm.weight.detach(), layer.inner_norm.bias.detach()

    def ln(z):
        mu = z.mean()
        var = ((z - mu) ** 2).mean()
        return gamma * (z - mu) / torch.sqrt(var + eps) + beta

    q = layer.q_proj.weight.detach() @ x
    k = layer.k_proj.weight.detach() @ x
    v = layer.v_proj.weight.detach() @ x
    W = W.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    loss = 0.5 * ((ln(k @ W + b) - (v - k)) ** 2).sum()
    gW, gb = torch.autograd.grad(loss, (W, b))
    gate = layer.lr_gate.weight.detach()[0] @ x + layer.lr_gate.bias.detach()[0]
    eta = layer.base_lr * torch.sigmoid(gate) / d * max(0.0, 1.0 + layer.token_eta.item())
    W_new, b_new = (W - eta * gW).detach(), (b - eta * gb).detach()
    out = q + ln(q @ W_new + b_new)
    return out, W_new, b_new


def test_gml_step_matches_explicit_per_coordinate_computation():
    torch.manual_seed(0)
    layer = GradientMemoryLayer(width=4).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 2, dtype=torch.float64)
    out, mem = layer(x)
    # second step from the carried memory
    x2 = torch.randn(3, 2, dtype=torch.float64)
    out2, mem2 = layer(x2, mem.detach())
    for p in range(3):
        o, W, b = explicit_gml_step(layer, x[p], layer.init_W.detach(), layer.init_b.detach())
        torch.testing.assert_close(out[p], o)
        torch.testing.assert_close(mem.W[p], W)
        torch.testing.assert_close(mem.b[p], b)
        o2, W2, b2 = explicit_gml_step(layer, x2[p], W, b)
        torch.testing.assert_close(out2[p], o2)
        torch.testing.assert_close(mem2.W[p], W2)
        torch.testing.assert_close(mem2.b[p], b2)


def test_gml_by_hand_zero_gamma_means_no_inner_update():
    # With the inner LN's gamma = 0 the reconstruction loss is constant in (W, b):
    # the memory stays put and the output is q + beta.
    layer = GradientMemoryLayer(width=3)
    with torch.no_grad():
        layer.inner_norm.weight.zero_()
        layer.inner_norm.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.q_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    out, mem = layer(torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 1.0, 5.5]]))
    torch.testing.assert_close(mem.W[0], layer.init_W.detach())
    torch.testing.assert_close(mem.b[0], layer.init_b.detach())


def test_gml_step_size_by_hand():
    layer = GradientMemoryLayer(width=8)
    with torch.no_grad():
        layer.lr_gate.weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lr_gate.bias.fill_(0.5)
        layer.token_eta.fill_(1.0)  # scale max(0, 1 + 1) = 2
    eta = layer.step_size(torch.tensor([[2.0, 1.0]]))  # sigmoid(1.5) / 8 * 2
    assert eta.item() == pytest.approx(1 / (1 + math.exp(-1.5)) / 4)
    with torch.no_grad():
        layer.token_eta.fill_(-3.0)  # clamped at 0: no inner update
    assert layer.step_size(torch.tensor([[2.0, 1.0]])).item() == 0.0


def test_layer_norm_l2_grad_matches_autograd():
    torch.manual_seed(0)
    z = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    target, w, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    loss = 0.5 * (torch.nn.functional.layer_norm(z, (8,), w, b, 1e-6) - target).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(layer_norm_l2_grad(z, target, w, b, 1e-6), expected)


def autograd_gml_forward(layer: GradientMemoryLayer, x: torch.Tensor, memory: Memory) -> torch.Tensor:
    """The GML with the inner gradient from autograd (create_graph) instead of the closed form."""
    ln = lambda z: torch.nn.functional.layer_norm(z, (layer.width,), layer.inner_norm.weight, layer.inner_norm.bias, layer.eps)
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    W, b = memory.W.clone(), memory.b.clone()
    loss = 0.5 * (ln(torch.bmm(k.unsqueeze(1), W).squeeze(1) + b) - (v - k)).pow(2).sum()
    gW, gb = torch.autograd.grad(loss, (W, b), create_graph=True)
    eta = layer.step_size(x)
    W, b = W - eta.unsqueeze(-1) * gW, b - eta * gb
    return q + ln(torch.bmm(q.unsqueeze(1), W).squeeze(1) + b)


def test_gml_closed_form_meta_gradient_matches_autograd_create_graph():
    torch.manual_seed(0)
    layer = GradientMemoryLayer().double()
    x = torch.randn(6, 2, dtype=torch.float64)
    weights = torch.randn(6, 8, dtype=torch.float64)
    out_closed, _ = layer(x)
    out_auto = autograd_gml_forward(layer, x, layer.initial_memory(6))
    torch.testing.assert_close(out_closed, out_auto)
    g_closed = torch.autograd.grad((out_closed * weights).sum(), list(layer.parameters()))
    g_auto = torch.autograd.grad((out_auto * weights).sum(), list(layer.parameters()))
    for (name, _), a, e in zip(layer.named_parameters(), g_closed, g_auto):
        torch.testing.assert_close(a, e, msg=name)
        assert e.abs().sum() > 0, name


def test_gml_rejects_bad_shapes():
    layer = GradientMemoryLayer()
    with pytest.raises(ValueError, match="input must have shape"):
        layer(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="memory has shapes"):
        layer(torch.zeros(4, 2), layer.initial_memory(5))


# ---- MGG -----------------------------------------------------------------------------------
def test_mgg_parameter_count():
    assert sum(p.numel() for p in MGG().parameters()) == 164
    assert sum(p.numel() for p in MGG(learnable_token_eta=False).parameters()) == 163


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=2, max_size=40))
def test_mgg_output_shape_and_bounds(values):
    mgg = random_mgg()
    feats = torch.tensor(values[: len(values) // 2 * 2], dtype=torch.float32).reshape(-1, 2)
    direction, memory = mgg(feats)
    assert direction.shape == (feats.shape[0],)
    assert torch.isfinite(direction).all() and direction.abs().max() <= 1.0
    assert memory.W.shape == (feats.shape[0], 8, 8)


def test_moment_features_bias_correction():
    g = torch.tensor([2.0, -0.5, 0.0])
    feats, m, v = moment_features(g, TensorState.fresh(g))
    # step 1, standard correction: m_hat = g, v_hat = g^2, features = (sign g, sign g)
    torch.testing.assert_close(feats, torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(m, 0.1 * g)
    torch.testing.assert_close(v, 0.01 * g * g)
    # the authors' offset: 1 - beta^(t+1)
    feats, _, _ = moment_features(g, TensorState.fresh(g), bias_correction_offset=1)
    m_hat, v_hat = 0.1 * 2.0 / (1 - 0.9**2), 0.01 * 4.0 / (1 - 0.99**2)
    assert feats[0, 0].item() == pytest.approx(m_hat / math.sqrt(v_hat), rel=1e-5)
    assert feats[0, 1].item() == pytest.approx(2.0 / math.sqrt(v_hat), rel=1e-5)


def test_mgg_directions_equal_one_joint_forward():
    mgg = random_mgg()
    grads = [torch.randn(3), torch.randn(2, 2)]
    states = mgg.init_states(grads)
    dirs, new_states = mgg.directions(grads, states)
    feats = torch.cat([moment_features(g, s)[0] for g, s in zip(grads, states)])
    joint, memory = mgg(feats)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in dirs]), joint)
    torch.testing.assert_close(torch.cat([s.memory.W for s in new_states]), memory.W)
    assert [d.shape for d in dirs] == [g.shape for g in grads]
    assert all(s.step == 1 for s in new_states)
    with pytest.raises(ValueError, match="2 gradients but 1 states"):
        mgg.directions(grads, states[:1])


def test_mgg_save_and_load(tmp_path):
    mgg = random_mgg(learnable_token_eta=False, bias_correction_offset=1)
    save_mgg(mgg, tmp_path / "adapter")
    loaded = load_mgg(tmp_path / "adapter")
    assert loaded.hparams() == mgg.hparams()
    x = torch.randn(5, 2)
    torch.testing.assert_close(loaded(x)[0], mgg(x)[0])
    torch.save(mgg.state_dict(), tmp_path / "bare.pt")  # a bare state dict: shapes give width/options
    torch.testing.assert_close(load_mgg(tmp_path / "bare.pt")(x)[0], mgg(x)[0])
    with pytest.raises(FileNotFoundError):
        load_mgg(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an MGG"):
        load_mgg(tmp_path / "other.pt")


# ---- MGGOptimizer --------------------------------------------------------------------------
def _quadratic_step(opt: MGGOptimizer, lin: nn.Linear, x: torch.Tensor) -> None:
    opt.zero_grad()
    lin(x).pow(2).sum().backward()
    opt.step()


def test_optimizer_memory_carries_over_and_resets():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    mgg = random_mgg()
    opt = MGGOptimizer(lin.parameters(), mgg, lr=0.1)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    w0 = lin.weight.detach().clone()
    _quadratic_step(opt, lin, x1)
    after_first = copy.deepcopy(lin.state_dict())
    st = opt.state[lin.weight]
    assert st["step"] == 1 and st["memory_W"].shape == (6, 8, 8) and not st["memory_W"].requires_grad
    saved = copy.deepcopy(opt.state_dict())
    w1 = lin.weight.detach().clone()
    # the step is theta - lr * MGG(features): within lr of the old value
    assert 0 < (w1 - w0).abs().max() <= 0.1 + 1e-7

    # second step from the carried state vs from a fresh state: different (memory + moments matter)
    _quadratic_step(opt, lin, x2)
    carried = lin.weight.detach().clone()
    lin.load_state_dict(after_first)
    opt.load_state_dict(saved)  # state round trip reproduces the carried step exactly
    _quadratic_step(opt, lin, x2)
    torch.testing.assert_close(lin.weight.detach(), carried)
    lin.load_state_dict(after_first)
    opt.reset_memory()
    assert len(opt.state) == 0
    _quadratic_step(opt, lin, x2)
    assert not torch.allclose(lin.weight.detach(), carried)


def test_optimizer_checks_inputs():
    lin = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="must be an MGG"):
        MGGOptimizer(lin.parameters(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="invalid lr"):
        MGGOptimizer(lin.parameters(), MGG(), lr=-1.0)
    opt = MGGOptimizer(lin.parameters(), MGG())
    assert opt.step() is None  # no gradients: nothing happens


class _EntropyOnNormAffines(TTAMethod):
    """Tent's recipe, defined here so the test does not depend on metatta.methods.tent."""

    def configure_model(self):
        configure_norm_adaptation(self.model)

    def collect_params(self):
        return norm_affine_params(self.model)

    def loss(self, x, logits):
        return softmax_entropy(logits).mean()


def _check_only_norm_affines_change_and_reset_restores(method: TTAMethod, model: nn.Module | None):
    model = method.model if model is None else model
    before = copy.deepcopy(model.state_dict())
    norm_keys = {n for n, p in model.named_parameters() if p.requires_grad}
    for x in tiny_batches(3):
        method(x)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= norm_keys, changed
    assert isinstance(method.optimizer, MGGOptimizer) and len(method.optimizer.state) > 0
    method.reset()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert len(method.optimizer.state) == 0  # moments and memory reset too


def test_mgg_optimizer_under_a_tent_like_method():
    model = tiny_model()
    method = _EntropyOnNormAffines(model, optimizer_factory=mgg_optimizer_factory(random_mgg(), lr=0.05))
    _check_only_norm_affines_change_and_reset_restores(method, model)


def test_mgg_optimizer_under_tent():
    from metatta.methods.base import build_method

    model = tiny_model()
    method = build_method("tent", model, optimizer_factory=mgg_optimizer_factory(random_mgg(), lr=0.05))
    _check_only_norm_affines_change_and_reset_restores(method, model)


def test_optimizer_mgg_in_a_config_steps_any_method_like_the_factory():
    """`optimizer: mgg` (config) = `mgg_optimizer_factory` (code): the same updates, bit for bit,
    and the method declares the context input "mgg" so an experiment loads the adapter for it."""
    from metatta.methods.base import build_method, method_class

    mgg = random_mgg()
    by_config = build_method("tent", tiny_model(), {"optimizer": "mgg", "lr": 0.05}, mgg=mgg)
    by_factory = build_method("tent", tiny_model(), {"lr": 0.05}, optimizer_factory=mgg_optimizer_factory(mgg, 0.05))
    for x in tiny_batches(3):
        torch.testing.assert_close(by_config(x), by_factory(x), rtol=0, atol=0)
    torch.testing.assert_close(adapted(by_config.model), adapted(by_factory.model), rtol=0, atol=0)
    assert by_config.optimizer.mgg is not mgg  # a private frozen copy: adapting never trains the caller's MGG
    _check_only_norm_affines_change_and_reset_restores(
        build_method("eata", tiny_model(), {"optimizer": "mgg", "lr": 0.05, "use_fisher": False,
                                    "entropy_factor": 1.01, "d_margin": 2.0}, mgg=mgg),  # every sample selected
        None)

    eata = method_class("eata")
    assert eata.inputs_for(eata.make_config({"optimizer": "mgg"})) == ("fisher_batches", "mgg")
    assert eata.inputs_for(eata.make_config({})) == ("fisher_batches",)
    mgtta = method_class("mgtta")
    assert mgtta.inputs_for(mgtta.make_config({})).count("mgg") == 1
    with pytest.raises(ValueError, match="optimizer 'mgg' needs a trained MGG"):
        build_method("tent", tiny_model(), {"optimizer": "mgg"})
    with pytest.raises(ValueError, match="'sgd', 'adam' or 'mgg'"):
        build_method("tent", tiny_model(), {"optimizer": "lion"})
    with pytest.raises(TypeError, match="must be an MGG"):
        build_method("tent", tiny_model(), {"optimizer": "mgg"}, mgg=nn.Linear(2, 1))


def test_experiment_gives_the_adapter_to_rows_with_optimizer_mgg(tmp_path):
    from pathlib import Path

    from metatta.experiment import ExperimentConfig, MethodSpec, method_context, with_adapter

    save_mgg(random_mgg(), tmp_path / "mgg")
    cfg = ExperimentConfig(methods=[MethodSpec("tent"), MethodSpec("tent", label="tent+mgg", config={"optimizer": "mgg"})])
    marked = with_adapter(cfg, str(tmp_path / "mgg"))
    assert [(s.label or s.name, s.adapter) for s in marked.methods] == [("tent", None), ("tent+mgg", str(tmp_path / "mgg"))]
    context = method_context(marked.methods[1], marked, Path("unused.pt"), torch.device("cpu"), {})
    assert isinstance(context["mgg"], MGG) and set(context) == {"mgg"}


# ---- losses --------------------------------------------------------------------------------
def _stats_of(features):
    stats = {}
    for i, f in enumerate(features):
        std, mean = torch.std_mean(f.flatten(1), dim=0)
        stats[f"mean.{i}"], stats[f"std.{i}"] = mean, std
    return stats


def test_stats_term_is_zero_when_batch_matches_source():
    torch.manual_seed(0)
    feats = [torch.randn(6, 5), torch.randn(6, 3)]
    stats = _stats_of(feats)
    assert stats_alignment_loss(feats, stats).item() == pytest.approx(0.0, abs=1e-12)
    logits = torch.randn(6, 4)
    loss = TTALoss("entropy+stats", stats, stats_lambda=0.4)
    assert loss(logits, feats).item() == pytest.approx(entropy_loss(logits).item(), abs=1e-6)


def test_stats_term_values_and_reductions():
    feats = [torch.tensor([[0.0, 2.0], [2.0, 4.0]])]  # mean (1, 3), unbiased std (sqrt 2, sqrt 2)
    stats = {"mean.0": torch.tensor([0.0, 3.0]), "std.0": torch.tensor([math.sqrt(2.0), 0.0])}
    # per layer: mean((1, 0)^2) + mean((0, sqrt2)^2) = 0.5 + 1 = 1.5 ; authors: (1 + 2) / 64
    assert stats_alignment_loss(feats, stats).item() == pytest.approx(1.5, rel=1e-6)
    assert stats_alignment_loss(feats, stats, "authors").item() == pytest.approx(3.0 / 64, rel=1e-6)
    # one image: no std, only the mean term
    assert stats_alignment_loss([feats[0][:1]], stats).item() == pytest.approx(0.5 * (0.0 + 1.0), rel=1e-6)
    with pytest.raises(ValueError, match="no 'mean.1'"):
        stats_alignment_loss(feats + feats, stats)
    with pytest.raises(ValueError, match="gives 3 features"):
        stats_alignment_loss([torch.zeros(2, 3)], stats)
    with pytest.raises(ValueError, match="needs source_stats"):
        TTALoss("entropy+stats")
    with pytest.raises(ValueError, match="not one of"):
        TTALoss("cross_entropy")


def test_entropy_loss_is_mean_entropy():
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    assert entropy_loss(logits).item() == pytest.approx(math.log(2) / 2, rel=1e-5)


# ---- the unroll ----------------------------------------------------------------------------
def explicit_features(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int):
    m = 0.9 * m + 0.1 * g
    v = 0.99 * v + 0.01 * g * g
    denom = torch.sqrt(v / (1 - 0.99**t)) + 1e-8
    return torch.stack([m / (1 - 0.9**t) / denom, g / denom], 1), m, v


def torch_func_meta_grad(model, mgg, batches, inner_lr):
    """Independent meta-gradient: torch.func.functional_call + torch.func.grad over the MGG's
    weights, with the gradient features fixed to their values along the trajectory (stop-gradient)."""
    from torch.func import functional_call, grad

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sizes = [theta0[n].numel() for n in names]

    def loss_at(theta, x):
        return softmax_entropy(functional_call(model, theta, (x,))).mean()

    def flat_grad(theta, x):
        g = grad(loss_at)(theta, x)
        return torch.cat([g[n].reshape(-1) for n in names]).detach()

    def trajectory(mgg_params, fixed=None):
        """Mean outer loss; the gradient features are `fixed` if given, else computed (as values)."""
        theta, memory, outer, used = dict(theta0), None, [], []
        g = flat_grad(theta0, batches[0]) if fixed is None else None
        m = v = torch.zeros(sum(sizes), dtype=torch.float64)
        for k, x in enumerate(batches[1:]):
            g = fixed[k] if fixed is not None else g
            used.append(g)
            feats, m, v = explicit_features(g, m, v, k + 1)
            direction, memory = functional_call(mgg, mgg_params, (feats, memory))
            flat_theta = torch.cat([theta[n].reshape(-1) for n in names]) - inner_lr * direction
            theta = {n: c.reshape(theta0[n].shape) for n, c in zip(names, flat_theta.split(sizes))}
            outer.append(loss_at(theta, x))
            if fixed is None:
                g = flat_grad({n: t.detach() for n, t in theta.items()}, x)
        return torch.stack(outer).mean(), used

    mgg_params = {n: p.detach() for n, p in mgg.named_parameters()}
    _, fixed = trajectory(mgg_params)
    meta_grad = grad(lambda p: trajectory(p, fixed)[0])(mgg_params)
    return {n: g.detach() for n, g in meta_grad.items()}


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_unroll_meta_gradient_matches_torch_func(backend):
    model = tiny_model(dtype=torch.float64)
    mgg = random_mgg(dtype=torch.float64)
    batches = tiny_batches(3, dtype=torch.float64)
    inner_lr = 0.3
    result = unroll(mgg, Trajectory(copy.deepcopy(model), backend=backend), batches, K=2, inner_lr=inner_lr)
    expected = torch_func_meta_grad(model, mgg, batches, inner_lr)
    assert set(result.grads) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(result.grads[name], g, msg=name)
    assert sum(g.abs().sum() for g in expected.values()) > 0


def test_unroll_meta_gradient_matches_finite_differences():
    model = tiny_model(dtype=torch.float64)
    mgg = random_mgg(dtype=torch.float64)
    batches = tiny_batches(2, dtype=torch.float64)
    inner_lr, h = 0.3, 1e-6
    result = unroll(mgg, Trajectory(copy.deepcopy(model)), batches, K=1, inner_lr=inner_lr)

    def meta_loss(m):
        return unroll(m, Trajectory(model, backend="func"), batches, K=1, inner_lr=inner_lr).meta_loss

    # Directional derivatives, one random direction per weight tensor (checks every tensor's
    # gradient with 2 evaluations each instead of 2 per scalar).
    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(mgg)
    for name, p in probe.named_parameters():
        u = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        with torch.no_grad():
            p.add_(h * u)
            up = meta_loss(probe)
            p.sub_(2 * h * u)
            down = meta_loss(probe)
            p.add_(h * u)
        fd = (up - down) / (2 * h)
        analytic = (result.grads[name] * u).sum().item()
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9), name
        assert abs(analytic) > 1e-8, name


def test_k2_differs_from_two_truncations_and_truncation_detaches():
    model = tiny_model()
    mgg = random_mgg()
    batches = tiny_batches(3)
    full = unroll(mgg, Trajectory(copy.deepcopy(model)), batches, K=2, inner_lr=0.3)

    traj = Trajectory(copy.deepcopy(model))
    first = unroll(mgg, traj, batches[:2], K=1, inner_lr=0.3)
    for t in traj.theta + traj.pending_grads:
        assert t.grad_fn is None and not t.requires_grad
    for s in traj.states:
        assert s.memory.W.grad_fn is None and s.memory.b.grad_fn is None and s.exp_avg.grad_fn is None
    assert traj.batches_needed(1) == 1
    second = unroll(mgg, traj, batches[2:], K=1, inner_lr=0.3)

    # same trajectory, same losses ...
    assert full.meta_loss == pytest.approx((first.meta_loss + second.meta_loss) / 2, rel=1e-6)
    # ... but K=2 also backpropagates step 2's loss through step 1's update and memory
    truncated = {n: (first.grads[n] + second.grads[n]) / 2 for n in full.grads}
    diff = sum((full.grads[n] - truncated[n]).abs().sum() for n in full.grads)
    assert diff > 1e-4 * sum(g.abs().sum() for g in full.grads.values())
    # the learned initial memory only gets gradient at a trajectory's start
    assert second.grads["gml.init_W"].abs().sum() == 0 and first.grads["gml.init_W"].abs().sum() > 0
    assert full.metrics["trajectory_steps"] == 2 and "mean_abs_direction" in full.metrics


def test_unroll_leaves_model_and_mgg_untouched():
    model = tiny_model()
    mgg = random_mgg()
    before_model, before_mgg = copy.deepcopy(model.state_dict()), copy.deepcopy(mgg.state_dict())
    traj = Trajectory(model)
    x = tiny_batches(3)
    y = torch.tensor([0, 1, 2, 3])
    result = unroll(mgg, traj, [(x[0], y), (x[1], y), (x[2], y)], inner_lr=0.1)
    assert 0.0 <= result.metrics["accuracy_after_update"] <= 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k])
    for k, v in mgg.state_dict().items():
        assert torch.equal(v, before_mgg[k])
    assert all(p.grad is None for p in mgg.parameters())
    assert not torch.equal(traj.theta[0], traj.source_theta[0])
    traj.reset()
    assert torch.equal(traj.theta[0], traj.source_theta[0]) and not traj.primed


def test_unroll_checks_inputs():
    model = tiny_model()
    mgg = random_mgg()
    traj = Trajectory(model)
    with pytest.raises(ValueError, match="need 3 batches"):
        unroll(mgg, traj, tiny_batches(2), K=2)
    with pytest.raises(ValueError, match="inner_lr"):
        unroll(mgg, traj, tiny_batches(2), inner_lr=0.0)
    with pytest.raises(ValueError, match="backend"):
        Trajectory(model, backend="jax")
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters to adapt"):
        Trajectory(frozen)
    with pytest.raises(ValueError, match="no MGG parameter requires grad"):
        unroll(copy.deepcopy(mgg).requires_grad_(False), traj, tiny_batches(2))
    with pytest.raises(ValueError, match="a batch must be"):
        unroll(mgg, traj, ["not a batch", "x"])


# ---- the mgtta method ----------------------------------------------------------------------
def test_mgtta_method_adapts_norm_affines_and_resets(tmp_path):
    from metatta.methods.base import build_method

    model = tiny_model()
    method = build_method("mgtta", model, {"lr": 0.05}, mgg=random_mgg())
    assert method.adapted_parameter_count() == 12
    _check_only_norm_affines_change_and_reset_restores(method, model)

    save_mgg(random_mgg(), tmp_path / "mgg")
    from_file = build_method("mgtta", tiny_model(), {"mgg_path": str(tmp_path / "mgg")})
    assert isinstance(from_file.optimizer, MGGOptimizer)
    with pytest.raises(ValueError, match="needs a trained MGG"):
        build_method("mgtta", tiny_model())
    with pytest.raises(ValueError, match="needs source_stats"):
        build_method("mgtta", tiny_model(), {"loss": "entropy+stats"}, mgg=MGG())
    with pytest.raises(ValueError, match="config.loss"):
        build_method("mgtta", tiny_model(), {"loss": "ce"}, mgg=MGG())


def test_trajectory_refuses_models_that_would_update_running_stats():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).train()
    with pytest.raises(ValueError, match="running statistics"):
        Trajectory(model)


# ---- the stats loss end to end (feature recording) ------------------------------------------
def test_unroll_with_stats_loss_records_features_in_both_backends():
    model = tiny_model()
    stats = compute_feature_stats(model, torch.randn(16, 2, 5, 5))
    mgg = random_mgg()
    batches = [b * 2 + 1 for b in tiny_batches(3)]  # shifted: the stats term is far from zero
    results = {}
    for backend in ("higher", "func"):
        loss_fn = TTALoss("entropy+stats", stats, stats_lambda=0.4)
        results[backend] = unroll(mgg, Trajectory(copy.deepcopy(model), loss_fn, backend=backend), batches, inner_lr=0.1)
    plain = unroll(mgg, Trajectory(copy.deepcopy(model)), batches, inner_lr=0.1)
    assert results["higher"].meta_loss == pytest.approx(results["func"].meta_loss, rel=1e-6)
    for n, g in results["func"].grads.items():
        torch.testing.assert_close(results["higher"].grads[n], g, msg=n)
    assert results["func"].meta_loss > plain.meta_loss + 1e-3


def test_mgtta_with_stats_loss():
    from metatta.methods.base import build_method

    model = tiny_model()
    stats = compute_feature_stats(model, torch.randn(16, 2, 5, 5))
    method = build_method("mgtta", model, {"lr": 0.05, "loss": "entropy+stats"}, mgg=random_mgg(), source_stats=stats)
    spy = _LossSpy(method.loss_fn)
    method.loss_fn = spy
    _check_only_norm_affines_change_and_reset_restores(method, model)
    assert spy.feature_counts and all(n > 0 for n in spy.feature_counts)


class _LossSpy:
    needs_features = True

    def __init__(self, inner):
        self.inner, self.feature_counts = inner, []

    def __call__(self, logits, features=None):
        self.feature_counts.append(len(features))
        return self.inner(logits, features)

    def any_reliable(self, logits):
        return self.inner.any_reliable(logits)


def test_reliable_entropy_loss_is_eatas_term_on_reliable_samples():
    from metatta.losses import softmax_entropy

    logits = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 2.5, 0.0, 0.0]], requires_grad=True)
    h = softmax_entropy(logits).detach()
    margin = 0.4 * math.log(4)
    reliable = h < margin
    assert reliable.tolist() == [True, False, False]
    loss = TTALoss("entropy", reliable_factor=0.4)
    assert float(loss(logits)) == pytest.approx(float(h[0] * torch.exp(margin - h[0])))
    assert loss.any_reliable(logits) and not loss.any_reliable(torch.zeros(2, 4))
    none = loss(torch.zeros(2, 4, requires_grad=True))  # no reliable sample: zero, still in the graph
    assert float(none) == 0.0 and none.requires_grad
    assert TTALoss("entropy").any_reliable(torch.zeros(2, 4))  # the paper's loss always adapts
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="reliable_factor"):
            TTALoss("entropy", reliable_factor=bad)


def test_mgtta_on_reliable_entropy_skips_batches_without_a_reliable_sample():
    from metatta.methods.base import build_method

    model = tiny_model()
    method = build_method("mgtta", model, {"lr": 0.05, "reliable_entropy_factor": 0.4}, mgg=random_mgg())
    before = copy.deepcopy(model.state_dict())
    uniform = torch.zeros(4, 4)  # 4 classes, maximal entropy: nothing is reliable
    assert method.loss(None, uniform) is None
    confident = method.loss(None, torch.tensor([[9.0, 0, 0, 0]] * 4))
    assert confident is not None and float(confident) > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["resnet_fmnist", "vit_tiny_fmnist"])
def test_unroll_on_project_models_with_stats_loss(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=1)
    if arch.startswith("vit"):
        with torch.no_grad():  # timm zero-inits the head: give the entropy a gradient
            model.vit.head.weight.normal_(0, 0.1)
    x = torch.rand(12, 1, 28, 28)
    stats = compute_feature_stats(model, x[:8])
    configure_norm_adaptation(model)
    batches = [x[8:10], x[10:12], x[8:10].flip(-1)]
    results = {
        backend: unroll(random_mgg(), Trajectory(copy.deepcopy(model), TTALoss("entropy+stats", stats), backend=backend),
                        batches, inner_lr=1e-2)
        for backend in ("higher", "func")
    }
    assert results["higher"].meta_loss == pytest.approx(results["func"].meta_loss, rel=1e-5)
    for n, g in results["func"].grads.items():
        torch.testing.assert_close(results["higher"].grads[n], g, rtol=1e-4, atol=1e-7, msg=n)
    assert results["func"].metrics["meta_grad_norm"] > 0
