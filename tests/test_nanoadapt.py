"""Tests of NanoAdapt (metatta.methods.nanoadapt) and the BN plug-in machinery
(metatta.methods.plugin): DBC's moments and Taylor correction, EWGA's weights and
accumulation, PCG's proxy batch, every wrapped base at batch size 1, the learned
optimizer underneath, validation, reset, and error at N=1 on real Fashion-MNIST-C."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from metatta.learned.mgg import MGG
from metatta.learned.optimizer import MGGOptimizer, mgg_optimizer_factory
from metatta.methods import available_methods, build_method
from metatta.methods.common import softmax_entropy
from metatta.methods.nanoadapt import (
    DBC_CLASSES,
    DBCNorm,
    entropy_weight,
    ewga_ramp,
    ewga_weight,
    moment_tangents,
    proxy_views,
)
from metatta.methods.plugin import channel_moments, convert_batchnorms
from metatta.paths import cache_root

from repo_scripts import load_script
from test_methods import TinyBNNet, assert_same_state, batches, fisher_batches
from test_tune import HELD_OUT, source_checkpoint  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]

# Every component off but the one under test, where a test needs it.
PLAIN = {"dbc": False, "ewga": False, "pcg": False}


def bn_inputs(model: nn.Module) -> tuple[list, list]:
    """Forward hooks recording the input of every BN layer of `model` (real rows only)."""
    seen: list[list[torch.Tensor]] = []
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def hook(module, args):
        rows = module.num_real if getattr(module, "num_real", None) else args[0].shape[0]
        seen[-1].append(args[0][:rows].detach().clone())

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    return seen, handles


# ---- registry and validation -----------------------------------------------------------------------
def test_registered_with_tent_as_default_base():
    assert {"nanoadapt", "delta"} <= set(available_methods())
    method = build_method("nanoadapt", TinyBNNet())
    assert method.base_method.name == "tent" and method.optimizer is method.base_method.optimizer
    assert all(isinstance(m, DBCNorm) for m in method.model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("field, value, rule", [
    ("num_views", -1, ">= 0"), ("accumulation_steps", 0, ">= 1"),
    ("dbc_momentum", 1.5, r"in \[0, 1\]"), ("dbc_momentum", -0.1, r"in \[0, 1\]"),
])
def test_bad_settings_are_refused_naming_the_field(field, value, rule):
    with pytest.raises(ValueError, match=rf"nanoadapt: config\.{field} must be {rule}, got {value}"):
        build_method("nanoadapt", TinyBNNet(), {field: value})


def test_unknown_base_and_loop_fields_in_base_config_are_refused():
    with pytest.raises(ValueError, match="unknown method 'tnet'"):
        build_method("nanoadapt", TinyBNNet(), {"base": "tnet"})
    with pytest.raises(ValueError, match=r"base_config sets \['episodic'\]; set them on nanoadapt itself"):
        build_method("nanoadapt", TinyBNNet(), {"base_config": {"episodic": True}})
    with pytest.raises(ValueError, match="nanoadapt: needs a model with BatchNorm layers; Sequential has none"):
        build_method("nanoadapt", nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)))


def test_plugins_do_not_nest():
    model = TinyBNNet()
    build_method("delta", model)
    with pytest.raises(ValueError, match="plug-ins do not nest"):
        build_method("nanoadapt", model)


# ---- DBC -----------------------------------------------------------------------------------------------
def test_dbc_statistics_are_the_exact_running_moments_when_parameters_do_not_change():
    m = 0.9
    source = TinyBNNet()
    start = [(bn.running_mean.clone(), bn.running_var + bn.running_mean ** 2)
             for bn in (source.layer1[1], source.layer2[1])]
    method = build_method("nanoadapt", copy.deepcopy(source), {"base": "bn", "dbc_momentum": m ** 0.25})
    seen, handles = bn_inputs(method.model)
    expected = [list(s) for s in start]
    for x in batches(5, batch_size=4):
        seen.append([])
        method(x)
        for k, inp in enumerate(seen[-1]):
            mean_b, sq_b = channel_moments(inp)
            expected[k] = [m * expected[k][0] + (1 - m) * mean_b, m * expected[k][1] + (1 - m) * sq_b]
    for h in handles:
        h.remove()
    for layer, (mean, sq) in zip(method.norms, expected):
        torch.testing.assert_close(layer.dbc_mean, mean)
        torch.testing.assert_close(layer.dbc_sqmean, sq)


def test_dbc_normalizes_with_the_mixed_statistics():
    method = build_method("nanoadapt", TinyBNNet(), {"base": "bn", "dbc_momentum": 0.7, "dbc_per_image": False})
    layer = method.norms[0]
    prior_mean, prior_sq = layer.dbc_mean.clone(), layer.dbc_sqmean.clone()
    seen, handles = bn_inputs(method.model)
    seen.append([])
    x = batches(1, batch_size=2)[0]
    outputs = []
    out_hook = layer.register_forward_hook(lambda mod, args, out: outputs.append(out))
    method(x)
    out_hook.remove()
    for h in handles:
        h.remove()
    inp = seen[-1][0]
    mean_b, sq_b = channel_moments(inp)
    mean = 0.7 * prior_mean + 0.3 * mean_b
    var = 0.7 * prior_sq + 0.3 * sq_b - mean ** 2
    shape = (1, -1, 1, 1)
    ref = (inp - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) * layer.weight.view(shape) \
        + layer.bias.view(shape)
    torch.testing.assert_close(outputs[0], ref)


class ConvBN(nn.Module):
    """conv-BN-ReLU-conv-BN-pool-linear: the second BN's input depends on the first BN's affine."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)
        with torch.no_grad():
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(h))).mean((2, 3)))


def dbc_model(momentum: float) -> ConvBN:
    model = ConvBN().double()
    convert_batchnorms(model, DBC_CLASSES, momentum=momentum)
    return model


def bn2_input_moments(model: ConvBN, x: torch.Tensor) -> torch.Tensor:
    """E[x], E[x^2] of bn2's input, the layers outside a session (their stored statistics fixed)."""
    seen = []
    handle = model.bn2.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return torch.cat(channel_moments(seen[0]))


@pytest.mark.parametrize("momentum", [0.0, 0.6, 1.0])
def test_taylor_term_matches_finite_differences_on_a_tiny_conv_bn(momentum):
    model = dbc_model(momentum)
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    v = {"bn1.weight": torch.randn(6, generator=g, dtype=torch.float64),
         "bn1.bias": torch.randn(6, generator=g, dtype=torch.float64)}
    before = torch.cat([model.bn2.dbc_mean, model.bn2.dbc_sqmean]).clone()
    bn1_before = torch.cat([model.bn1.dbc_mean, model.bn1.dbc_sqmean]).clone()
    moment_tangents(model, [model.bn1, model.bn2], x, v)
    tangent = torch.cat([model.bn2.dbc_mean, model.bn2.dbc_sqmean]) - before
    # bn1's input does not depend on its own affine: no correction there
    torch.testing.assert_close(torch.cat([model.bn1.dbc_mean, model.bn1.dbc_sqmean]), bn1_before)
    with torch.no_grad():  # restore bn2's stored statistics: the finite difference must not see the correction
        model.bn2.dbc_mean.copy_(before[:5])
        model.bn2.dbc_sqmean.copy_(before[5:])
    h = 1e-6
    plus, minus = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for name, d in v.items():
            plus.get_parameter(name).add_(h * d)
            minus.get_parameter(name).sub_(h * d)
    finite = (bn2_input_moments(plus, x) - bn2_input_moments(minus, x)) / (2 * h)
    assert tangent.abs().max() > 1e-3  # not identically zero when only BN affines change
    torch.testing.assert_close(tangent, finite, rtol=1e-5, atol=1e-7)


def test_taylor_correction_improves_the_estimate_under_the_new_parameters():
    model = dbc_model(1.0)  # m = 1: the layers normalize with their stored statistics only
    data = torch.rand(2048, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # stored statistics: the exact moments over all the data at theta_0
        model.bn1.dbc_mean.copy_(channel_moments(model.conv1(data))[0])
        model.bn1.dbc_sqmean.copy_(channel_moments(model.conv1(data))[1])
        exact0 = bn2_input_moments(model, data)
        model.bn2.dbc_mean.copy_(exact0[:5])
        model.bn2.dbc_sqmean.copy_(exact0[5:])
    g = torch.Generator().manual_seed(3)
    delta = {"bn1.weight": 0.1 * torch.randn(6, generator=g, dtype=torch.float64),
             "bn1.bias": 0.1 * torch.randn(6, generator=g, dtype=torch.float64)}
    with torch.no_grad():
        for name, d in delta.items():
            model.get_parameter(name).add_(d)
    exact1 = bn2_input_moments(model, data)  # the truth under the new parameters
    moment_tangents(model, [model.bn1, model.bn2], data[:16], delta)  # corrected from one small batch
    corrected = torch.cat([model.bn2.dbc_mean, model.bn2.dbc_sqmean])
    stale_error = (exact0 - exact1).abs().mean()
    corrected_error = (corrected - exact1).abs().mean()
    assert corrected_error < 0.25 * stale_error, (float(corrected_error), float(stale_error))


def test_updates_move_the_stored_moments_by_the_taylor_term_only_when_switched_on():
    def stats_after(taylor: bool):
        method = build_method("nanoadapt", TinyBNNet(), {**PLAIN, "dbc": True, "taylor_correction": taylor,
                                                         "lr": 0.05, "optimizer": "sgd"})
        method(batches(1, batch_size=4)[0])
        return torch.cat([method.norms[1].dbc_mean, method.norms[1].dbc_sqmean])

    on, off = stats_after(True), stats_after(False)
    assert (on - off).abs().max() > 1e-5


# ---- EWGA ------------------------------------------------------------------------------------------------
def test_ewga_weights_follow_the_formula():
    assert ewga_ramp(1, 1) == 1.0
    for s in (2, 4, 8):
        for i in range(1, s + 1):
            assert ewga_ramp(i, s) == pytest.approx((math.log(s) + math.log(i)) / (2 * math.log(s)))
        assert ewga_ramp(1, s) == pytest.approx(0.5) and ewga_ramp(s, s) == pytest.approx(1.0)
    assert entropy_weight(0.0) == 1.0 and entropy_weight(0.5) == 1.0 and entropy_weight(2.0) == 0.5
    logits = torch.randn(3, 10)
    h = float(softmax_entropy(logits).mean())
    assert ewga_weight(logits, 2, 4) == pytest.approx(ewga_ramp(2, 4) / 4 * min(1 / h, 1.0))


def test_ewga_steps_every_s_batches_on_the_weighted_gradient_sum():
    s, lr = 3, 0.5
    xs = batches(2 * s, batch_size=4, seed=6)
    method = build_method("nanoadapt", TinyBNNet(), {**PLAIN, "ewga": True, "accumulation_steps": s,
                                                     "optimizer": "sgd", "lr": lr, "momentum": 0.0})
    probe = build_method("tent", TinyBNNet(), {"optimizer": "sgd", "lr": 0.0, "momentum": 0.0})
    params, probe_params = method.base_method.collect_params(), probe.collect_params()
    theta0 = [p.detach().clone() for p in params]
    expected = [t.clone() for t in theta0]
    for i, x in enumerate(xs[:s], start=1):
        logits = method(x)
        probe(x)  # the same forward at theta_0: its gradient is the batch's
        w = ewga_weight(logits, i, s)
        expected = [e - lr * w * q.grad for e, q in zip(expected, probe_params)]
        moved = any(not torch.equal(p, t) for p, t in zip(params, theta0))
        assert moved == (i == s), i
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert method.extra_state()["accumulated_batches"] == 0


# ---- PCG --------------------------------------------------------------------------------------------------
def test_proxy_views_shape_and_range():
    x = torch.rand(2, 3, 16, 16)
    v = proxy_views(x, 3, torch.Generator().manual_seed(0))
    assert v.shape == (6, 3, 16, 16) and v.min() >= 0 and v.max() <= 1 + 1e-6
    assert proxy_views(torch.rand(1, 1, 28, 28), 4).shape == (4, 1, 28, 28)


def test_pcg_keeps_the_dbc_values_and_changes_only_the_gradient():
    x = batches(1, batch_size=1)[0]
    runs = {}
    for pcg in (False, True):
        method = build_method("nanoadapt", TinyBNNet(), {**PLAIN, "dbc": True, "pcg": pcg, "num_views": 3,
                                                         "optimizer": "sgd", "lr": 0.0})
        torch.manual_seed(0)
        logits = method(x)
        grads = [p.grad.clone() for p in method.base_method.collect_params()]
        runs[pcg] = (logits, grads, [torch.cat([l.dbc_mean, l.dbc_sqmean]) for l in method.norms])
    torch.testing.assert_close(runs[True][0], runs[False][0])  # same predictions
    assert_same_state(runs[True][2], runs[False][2], "dbc statistics")  # from the real sample only
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(runs[True][1], runs[False][1]))


# ---- every base at batch size 1, composition ------------------------------------------------------------------
BASES = {
    "bn": ({}, {}), "tent": ({"lr": 0.01}, {}), "eata": ({"lr": 0.05}, {"fisher_batches": fisher_batches}),
    "eta": ({"lr": 0.05}, {}), "sar": ({"lr": 0.05, "reset_threshold": 0.0}, {}), "mgtta": ({}, {"mgg": MGG}),
    "palm": ({}, {}), "law": ({}, {}),
}


@pytest.mark.parametrize("base", sorted(BASES))
def test_a_batch_of_one_runs_through_every_wrapped_method(base):
    base_config, context = BASES[base]
    method = build_method("nanoadapt", TinyBNNet(), {"base": base, "base_config": base_config,
                                                     "accumulation_steps": 2},
                          batch_size=1, **{k: f() for k, f in context.items()})
    before = copy.deepcopy(method.model.state_dict())
    for x in batches(5, batch_size=1):
        logits = method(x)
        assert logits.shape == (1, 10) and bool(torch.isfinite(logits).all())
    assert all(bool(torch.isfinite(t).all()) for t in method.model.state_dict().values())
    assert method.skipped_updates == 0
    changed = [k for k, v in method.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("dbc_mean" in k for k in changed)  # the statistics follow the stream
    if base in ("tent", "mgtta"):  # (the others filter samples: at N=1 an update is not certain)
        assert any(k.endswith(("weight", "bias")) for k in changed), base  # and the parameters moved


def test_tent_with_the_learned_optimizer_underneath():
    mgg = MGG()
    method = build_method("nanoadapt", TinyBNNet(), {"accumulation_steps": 2},
                          optimizer_factory=mgg_optimizer_factory(mgg, 1e-2))
    assert isinstance(method.optimizer, MGGOptimizer)
    params = method.base_method.collect_params()
    theta0 = [p.detach().clone() for p in params]
    for i, x in enumerate(batches(4, batch_size=1), start=1):
        method(x)
        moved = any(not torch.equal(p, t) for p, t in zip(params, theta0))
        assert moved == (i >= 2)
    assert method.optimizer.state  # the MGG's moments and memory advanced
    method.reset()
    assert not method.optimizer.state and all(torch.equal(p, t) for p, t in zip(params, theta0))


def test_reset_restores_statistics_accumulation_and_base_state():
    method = build_method("nanoadapt", TinyBNNet(), {"accumulation_steps": 3})
    source = copy.deepcopy({"model": method.model.state_dict(), "extra": method.extra_state()})
    xs = batches(4, batch_size=2)
    outs = [method(x) for x in xs]
    assert method.extra_state()["accumulated_batches"] == 1
    method.reset()
    assert_same_state(method.model.state_dict(), source["model"], "model")
    assert_same_state(method.extra_state(), source["extra"], "extra")
    torch.manual_seed(0)
    again = [method(x) for x in xs]
    fresh = build_method("nanoadapt", TinyBNNet(), {"accumulation_steps": 3})
    torch.manual_seed(0)
    for a, b in zip(again, [fresh(x) for x in xs]):
        torch.testing.assert_close(a, b)
    del outs


def test_lr_is_scaled_to_the_images_behind_one_update():
    method = build_method("nanoadapt", TinyBNNet(), {"accumulation_steps": 8}, batch_size=1)
    assert method.base_method.config.lr == pytest.approx(1e-3 * 8 / 200)
    assert method.lr_scaling["batch_size"] == 8 and method.lr_scaling["lr"] == pytest.approx(4e-5)
    tuned = build_method("nanoadapt", TinyBNNet(), {"lr": 2e-3, "lr_batch_size": 4}, batch_size=1)
    assert tuned.base_method.config.lr == pytest.approx(5e-4) and tuned.lr_scaling["factor"] == 0.25


# ---- real data: error at N=1 ----------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Batch-1 steps are a few hundred tiny ops: intra-op threads only add synchronisation
    (and on a shared machine, contention), so the real-data tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _real_stream(corruption: str = "gaussian_noise", n: int = 48):
    from metatta.data.benchmark_files import read_cifar_c
    from metatta.models import load_source_model

    checkpoint = cache_root() / "models" / "resnet_fmnist.pt"
    root = cache_root() / "fashion_mnist_c-n10000-s0-v2"
    if not checkpoint.is_file() or not (root / f"{corruption}.npy").is_file():
        pytest.skip("the cached Fashion-MNIST-C source model / benchmark files are not built here")
    domain = read_cifar_c(root, [corruption], [5], num_images=n)[0]
    x = torch.from_numpy(np.ascontiguousarray(domain.images)).permute(0, 3, 1, 2).float().div(255)
    return load_source_model(checkpoint), x, torch.from_numpy(domain.labels)


def _error_at_batch_one(method, x, y) -> float:
    torch.manual_seed(0)
    wrong = sum(int(method(x[i : i + 1]).argmax(1).item() != y[i]) for i in range(len(x)))
    return 100.0 * wrong / len(x)


def test_error_at_batch_size_one_is_below_plain_tent(one_thread):
    model, x, y = _real_stream()
    tent = _error_at_batch_one(build_method("tent", copy.deepcopy(model), batch_size=1), x, y)
    nano = _error_at_batch_one(build_method("nanoadapt", copy.deepcopy(model), batch_size=1), x, y)
    assert nano < tent - 20, (nano, tent)


# ---- config files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nanoadapt", "delta"])
def test_config_file_equals_dataclass_defaults(name):
    from metatta.config import build_dataclass, load_config
    from metatta.methods import method_class

    path = Path(__file__).resolve().parents[1] / "configs" / "methods" / f"{name}.yaml"
    cls = method_class(name)
    assert build_dataclass(cls.Config, load_config(path), where=name) == cls.Config()


def test_experiment_config_parses():
    from metatta.config import load_config
    from metatta.experiment import experiment_config

    cfg = experiment_config(load_config(ROOT / "configs" / "fmnist_c" / "nanoadapt.yaml"))
    assert cfg.stream.batch_size == 1 and [s.label or s.name for s in cfg.methods][-1] == "tent+nanoadapt"


# ---- the Ray Tune search, per batch size -----------------------------------------------------------------------
def _tune_module():
    return load_script("launch/tune_nanoadapt.py")


def test_default_search_config_gives_one_search_per_batch_size_on_held_out_compositions():
    from metatta.config import load_config

    searches = _tune_module().batch_size_searches(load_config(ROOT / "configs" / "fmnist_c" / "tune_nanoadapt.yaml"))
    assert [s.stream.batch_size for s in searches] == [1, 4]
    assert [s.register_as for s in searches] == ["nanoadapt_settings_n1", "nanoadapt_settings_n4"]
    assert all(s.method_config["lr_batch_size"] == s.stream.batch_size for s in searches)
    assert {"dbc_momentum", "num_views", "accumulation_steps", "lr"} == set(searches[0].space)
    held_out = {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert searches[0].validation.corruptions == [] and len(searches[0].validation.compositions) == 12
    assert all(step.split("-")[0] in held_out for c in searches[0].validation.compositions for step in c.split("+"))


def test_bad_batch_sizes_are_refused():
    from metatta.config import ConfigError

    with pytest.raises(ConfigError, match="search.batch_sizes"):
        _tune_module().batch_size_searches({"method": "nanoadapt", "batch_sizes": [0],
                                             "space": {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}}})


def test_search_per_batch_size_end_to_end(tmp_path, ray_session, mlflow_uri, source_checkpoint):
    from metatta.experiment import experiment_config, method_config, with_settings

    data = {
        "name": "tune_nano", "method": "nanoadapt", "batch_sizes": [1, 4], "method_config": {"base": "tent"},
        "space": {"dbc_momentum": {"type": "uniform", "low": 0.9, "high": 0.99},
                  "num_views": {"type": "int", "low": 0, "high": 2},
                  "accumulation_steps": {"type": "choice", "values": [1, 2]},
                  "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}},
        "benchmark": {"name": "fashion_mnist_c", "num_images": 8},
        "validation": {"corruptions": HELD_OUT, "severities": [5], "seeds": [0, 1]},
        "divergence": {"max_window_error": None, "on_collapse": False},  # an untrained model, near chance
        "source": {"checkpoint": str(source_checkpoint)}, "stream": {"setting": "continual", "seed": 0},
        "num_samples": 1, "max_concurrent": 1, "report_every": 4, "asha": {"grace_period": 1},
        "device": "cpu", "output_dir": str(tmp_path / "out"), "register_as": "nano_settings",
    }
    outcomes = _tune_module().run_searches(data)
    assert sorted(outcomes) == [1, 4]
    for b, outcome in outcomes.items():
        assert len(outcome.trials) == 2 and outcome.trials[0]["trial_id"] == "default"
        assert outcome.trials[0]["config"]["lr"] is None  # the default: the base's own lr
        assert outcome.registered_version == "1" and outcome.promoted
        assert outcome.best_config["lr_batch_size"] == b
    exp = with_settings(experiment_config({"methods": [{"name": "bn"}]}), "nanoadapt",
                        "models:/nano_settings_n1@champion")
    tuned = method_config(exp.methods[-1])
    assert tuned["lr_batch_size"] == 1 and tuned["lr"] == outcomes[1].best_params["lr"]


def test_launcher_refuses_bad_settings_as_a_user_error(capsys):
    from metatta.cli import USER_ERROR_STATUS, run_main

    module = _tune_module()
    config = str(ROOT / "configs" / "fmnist_c" / "tune_nanoadapt.yaml")
    assert run_main(module.main, ["--config", config, "batch_sizes=[0]"]) == USER_ERROR_STATUS
    assert "search.batch_sizes" in capsys.readouterr().err
    assert run_main(module.main, ["--config", config, "space.num_views.low=-1"]) == USER_ERROR_STATUS
    assert "search.space (low end): nanoadapt: config.num_views must be >= 0, got -1" in capsys.readouterr().err


def test_the_runner_builds_the_inputs_of_the_wrapped_base():
    from metatta.experiment import MethodSpec, required_inputs

    assert required_inputs(MethodSpec(name="nanoadapt", config={"base": "eata"})) == ("fisher_batches",)
    assert "mgg" in required_inputs(MethodSpec(name="nanoadapt", config={"base": "mgtta"}))
    assert required_inputs(MethodSpec(name="nanoadapt")) == ()  # tent needs nothing
    assert required_inputs(MethodSpec(name="eata")) == ("fisher_batches",)


# ---- benchmarks/nanoadapt.py: tuned rows per batch size ------------------------------------------
def _nanoadapt_benchmark():
    return load_script("benchmarks/nanoadapt.py")


def test_benchmark_adds_a_tuned_row_only_at_the_batch_size_it_was_tuned_for():
    bench = _nanoadapt_benchmark()
    tuned = bench.parse_tuned(["1=models:/nanoadapt_settings_n1@champion", "4=/tmp/best.yaml"])
    assert tuned == {1: "models:/nanoadapt_settings_n1@champion", 4: "/tmp/best.yaml"}
    at_one = bench.rows_for(1, tuned.get(1))
    tuned_rows = [r for r in at_one if r.get("label") == "tent+nanoadapt (tuned)"]
    assert tuned_rows == [{"name": "nanoadapt", "label": "tent+nanoadapt (tuned)",
                           "settings": "models:/nanoadapt_settings_n1@champion"}]
    assert any(r.get("label") == "tent+nanoadapt" and "settings" not in r for r in at_one)
    assert not any("(tuned)" in r.get("label", "") for r in bench.rows_for(16, tuned.get(16)))


@pytest.mark.parametrize("entry", ["models:/x@champion", "one=/tmp/x.yaml", "4="])
def test_benchmark_refuses_a_tuned_entry_without_its_batch_size(entry):
    with pytest.raises(SystemExit, match="--tuned expects BATCH_SIZE=PATH_OR_URI"):
        _nanoadapt_benchmark().parse_tuned([entry])
