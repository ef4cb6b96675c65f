"""Tests of the baseline TTA methods (source, bn, tent, eata/eta, sar, cotta), SAM and
CoTTA's augmentation, on a tiny BN CNN (10 classes, 16x16 inputs)."""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatta.config import build_dataclass, load_config
from metatta.methods import available_methods, build_method, method_class
from metatta.methods.augment import CoTTAAugment, cotta_augment
from metatta.methods.common import softmax_entropy
from metatta.methods.sam import SAM
from metatta.methods.sar import AUTHORS_EXCLUDED_MODULES, top_layers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"
BASELINES = ["source", "bn", "tent", "eata", "eta", "sar", "cotta"]
GRADIENT_METHODS = ["tent", "eata", "eta", "sar", "cotta"]
NUM_CLASSES = 10

# Settings that make every gradient method update on the tiny net within a few batches
# (SAR's recovery is switched off where a test needs the adapted weights to stay).
FAST = {
    "tent": {"lr": 0.01},
    "eata": {"lr": 0.05},
    "eta": {"lr": 0.05},
    "sar": {"lr": 0.05, "reset_threshold": 0.0},
    "cotta": {"lr": 0.01, "num_augmentations": 2},
    "deyo": {"lr": 0.05, "plpd_threshold": -1.0},
    "rpl": {"lr": 0.01},
    "memo": {"num_augmentations": 4, "episodic": False},  # episodic: every image resets, no state to compare
    "ttaug": {"num_augmentations": 4},
    "rotta": {"lr": 0.01, "memory_size": 16, "update_frequency": 16},  # an update on every batch of 16
    "rmt": {"lr": 0.01, "warmup_samples": 16, "projection_dim": 8},
    "roid": {"lr": 0.01},
    "cmf": {"lr": 0.01},
    "santa": {"lr": 0.01, "projection_dim": 8},
    "adacontrast": {"lr": 0.01, "queue_size": 64, "refine_after": 16},
}


class TinyBNNet(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU (stride 2), global pool, linear; confident enough that
    a good share of samples pass the 0.4 ln C entropy filters."""

    def __init__(self, seed: int = 0, in_channels: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.layer1 = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, NUM_CLASSES)
        with torch.no_grad():
            self.fc.weight.mul_(36.0)
            for bn in (self.layer1[1], self.layer2[1]):  # non-trivial source statistics and affines
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(x))
        return self.fc(h.mean((2, 3)))


def batches(n: int, batch_size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch_size, 3, 16, 16, generator=g) for _ in range(n)]


def build(name: str, model: nn.Module | None = None, **overrides) -> tuple:
    model = model if model is not None else TinyBNNet()
    return build_method(name, model, overrides), model


def fisher_batches(n: int = 2) -> list[torch.Tensor]:
    return batches(n, batch_size=8, seed=7)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same_state(a, b, where: str = "state") -> None:
    """Exact equality of nested dicts / lists of tensors, numbers and None."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


# ---- registry, configs ---------------------------------------------------------------------
def test_registry_has_every_baseline_and_rejects_unknown_names():
    assert set(BASELINES) <= set(available_methods())
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method("nope", TinyBNNet())


def test_unknown_context_and_config_fields_are_rejected():
    with pytest.raises(TypeError, match="foo"):
        build_method("tent", TinyBNNet(), foo=1)
    with pytest.raises(ValueError, match="lrr"):
        build_method("tent", TinyBNNet(), {"lrr": 1.0})


@pytest.mark.parametrize("name", BASELINES)
def test_config_file_equals_dataclass_defaults(name):
    cls = method_class(name)
    from_file = build_dataclass(cls.Config, load_config(CONFIG_DIR / f"{name}.yaml"), where=name)
    assert from_file == cls.Config()


def test_published_defaults():
    tent, eata, sar, cotta = (method_class(n).Config() for n in ("tent", "eata", "sar", "cotta"))
    assert (tent.optimizer, tent.lr, tent.steps, tent.episodic) == ("adam", 1e-3, 1, False)
    assert (eata.optimizer, eata.lr, eata.d_margin, eata.fisher_alpha, eata.entropy_factor) == ("sgd", 0.005, 0.4, 1.0, 0.4)
    assert (sar.optimizer, sar.lr, sar.momentum, sar.rho, sar.reset_threshold) == ("sgd", 0.00025, 0.9, 0.05, 0.2)
    assert (cotta.optimizer, cotta.lr, cotta.teacher_momentum, cotta.restore_prob, cotta.aug_threshold,
            cotta.num_augmentations) == ("adam", 1e-3, 0.999, 0.01, 0.92, 32)


# ---- source and BN -------------------------------------------------------------------------
def test_source_equals_the_model_and_never_changes_it():
    reference = TinyBNNet()
    method, model = build("source", channels_last=False)  # the same memory layout: bitwise equal
    before = copy.deepcopy(model.state_dict())
    for x in batches(3):
        torch.testing.assert_close(method(x), reference(x), rtol=0, atol=0)
    assert_same_state(model.state_dict(), before)
    assert method.optimizer is None and method.adapted_parameter_count() == 0


def test_bn_equals_a_manual_batch_statistics_forward():
    reference = TinyBNNet()
    method, _ = build("bn")

    def manual(x):
        h = x
        for layer in (reference.layer1, reference.layer2):
            conv, bn = layer[0], layer[1]
            h = conv(h)
            mean = h.mean((0, 2, 3), keepdim=True)
            var = h.var((0, 2, 3), unbiased=False, keepdim=True)
            h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
            h = h.relu()
        return reference.fc(h.mean((2, 3)))

    for x in batches(2):
        with torch.no_grad():
            torch.testing.assert_close(method(x), manual(x), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(method(x), reference(x), atol=1e-3)  # differs from source statistics


# ---- Tent ----------------------------------------------------------------------------------
def test_tent_adapts_only_norm_affines_and_lowers_entropy_on_a_repeated_batch():
    method, model = build("tent", lr=0.01)
    before = params_of(model)
    x = batches(1)[0]
    entropies = [softmax_entropy(method(x)).mean().item() for _ in range(15)]
    changed = {k for k, v in params_of(model).items() if not torch.equal(v, before[k])}
    assert changed == {"layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}
    assert entropies[-1] < entropies[0] - 0.05


def test_tent_needs_norm_layers():
    with pytest.raises(ValueError, match="normalization"):
        build_method("tent", nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, NUM_CLASSES)))


# ---- every method: reset, episodic, batch size 1, optimizer factory ----------------------------
def _build_with_context(name: str, **overrides):
    model = TinyBNNet()
    context = {"fisher_batches": fisher_batches()} if name == "eata" else {}
    return build_method(name, model, {**FAST.get(name, {}), **overrides}, **context), model


@pytest.mark.parametrize("name", BASELINES)
def test_reset_restores_the_exact_source_state(name):
    method, model = _build_with_context(name)
    model_state = copy.deepcopy(model.state_dict())
    extra = copy.deepcopy(method.extra_state())
    optim_state = copy.deepcopy(method.optimizer.state_dict()) if method.optimizer else None
    torch.manual_seed(0)
    for x in batches(3):
        method(x)
    if name in GRADIENT_METHODS:
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, model_state[k])]
        assert changed, f"{name} did not adapt"
    method.reset()
    assert_same_state(model.state_dict(), model_state, "model")
    assert_same_state(method.extra_state(), extra, "extra_state")
    if optim_state is not None:
        assert_same_state(method.optimizer.state_dict(), optim_state, "optimizer")


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_episodic_calls_on_the_same_batch_give_the_same_output(name):
    x = batches(1)[0]
    episodic, _ = _build_with_context(name, episodic=True)
    continual, _ = _build_with_context(name)
    outputs = {"episodic": [], "continual": []}
    for kind, method in (("episodic", episodic), ("continual", continual)):
        for _ in range(3):
            torch.manual_seed(0)  # CoTTA's augmentation and restore draw random numbers
            outputs[kind].append(method(x))
    torch.testing.assert_close(outputs["episodic"][0], outputs["episodic"][2], rtol=0, atol=0)
    assert not torch.equal(outputs["continual"][0], outputs["continual"][2])


@pytest.mark.parametrize("name", BASELINES)
def test_batch_size_one_works(name):
    # BatchNorm2d then normalizes over the 16x16 (and 8x8) positions of the single image.
    method, _ = _build_with_context(name)
    for x in batches(3, batch_size=1):
        with torch.no_grad():  # adapting methods re-enable gradients themselves
            logits = method(x)
        assert logits.shape == (1, NUM_CLASSES) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_optimizer_factory_is_used(name):
    built = []

    def factory(params):
        built.append(torch.optim.SGD(params, lr=0.05))
        return built[-1]

    model = TinyBNNet()
    context = {"fisher_batches": fisher_batches()} if name == "eata" else {}
    method = build_method(name, model, FAST[name], optimizer_factory=factory, **context)
    assert len(built) == 1
    optimizer = method.optimizer.base_optimizer if name == "sar" else method.optimizer
    assert optimizer is built[0]
    before = params_of(model)
    for x in batches(2):
        with torch.no_grad():  # as an evaluation loop may call it; the method enables gradients
            method(x)
    assert any(not torch.equal(v, before[k]) for k, v in params_of(model).items())


# ---- EATA ----------------------------------------------------------------------------------
def _confident(cls: int, margin: float = 12.0) -> torch.Tensor:
    row = torch.zeros(NUM_CLASSES)
    row[cls] = margin
    return row


def test_eata_selects_low_entropy_then_non_redundant_samples():
    method, _ = build("eta")
    e0 = 0.4 * math.log(NUM_CLASSES)
    logits = torch.stack([_confident(0), torch.zeros(NUM_CLASSES), _confident(3), _confident(1, margin=1.5)])
    logits.requires_grad_(True)
    entropy = softmax_entropy(logits.detach())
    loss = method.loss(None, logits)
    assert method.last_selection.tolist() == (entropy < e0).tolist() == [True, False, True, False]
    loss.backward()
    assert (logits.grad[1] == 0).all() and (logits.grad[3] == 0).all()
    assert logits.grad[0].abs().sum() > 0
    # Reweighting: loss = mean H / exp(H - E0) over the selected samples.
    sel = entropy[entropy < e0]
    torch.testing.assert_close(loss.detach(), (sel * torch.exp(e0 - sel)).mean())
    # The moving average now points between classes 0 and 3: a sample like those is
    # redundant, a confident sample of another class is not.
    second = torch.stack([_confident(0), _confident(7)]).requires_grad_(True)
    moving = method.moving_probs.clone()
    method.loss(None, second)
    cos = F.cosine_similarity(moving.unsqueeze(0), second.detach().softmax(1), dim=1)
    assert cos[0] > 0.4 > cos[1]
    assert method.last_selection.tolist() == [False, True]
    # Nothing reliable: no update.
    assert method.loss(None, torch.zeros(3, NUM_CLASSES, requires_grad=True)) is None


def test_eata_redundancy_filter_drops_samples_like_the_moving_average():
    method, _ = build("eta")
    same = torch.stack([_confident(2)] * 4).requires_grad_(True)
    assert method.loss(None, same) is not None  # first batch seeds the average
    assert method.loss(None, same.detach().clone().requires_grad_(True)) is None  # cos ~ 1 >= 0.4
    assert method.last_selection.sum() == 0


def test_eata_fisher_is_zero_at_the_source_and_grows_with_adaptation():
    method = build_method("eata", TinyBNNet(), FAST["eata"], fisher_batches=fisher_batches())
    assert method.uses_fisher
    assert method.fisher_penalty().item() == 0.0
    for x in batches(3):
        method(x)
    assert method.fisher_penalty().item() > 0.0
    # Tuple batches ((x, y), as a data loader gives) work too.
    pairs = [(x, torch.zeros(len(x), dtype=torch.long)) for x in fisher_batches()]
    assert build_method("eata", TinyBNNet(), fisher_batches=pairs).uses_fisher


def test_eata_without_fisher_batches_is_eta_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="metatta.methods.eata"):
        method = build_method("eata", TinyBNNet())
    assert not method.uses_fisher and "ETA" in caplog.text
    assert method.fisher_penalty().item() == 0.0
    assert method_class("eata").context_inputs == ("fisher_batches",)
    assert method_class("eta").context_inputs == ()


@pytest.mark.parametrize("bad, match", [([], "empty"), ([torch.rand(3, 16, 16)], r"fisher_batches\[0\]"),
                                        ([torch.zeros(2, 3, 16, 16, dtype=torch.uint8)], r"fisher_batches\[0\]")])
def test_eata_rejects_bad_fisher_batches(bad, match):
    with pytest.raises(ValueError, match=match):
        build_method("eata", TinyBNNet(), fisher_batches=bad)


# ---- SAR -----------------------------------------------------------------------------------
def test_sar_recovers_to_the_source_when_the_ema_falls_below_the_threshold():
    # threshold above any entropy: the first update's EMA triggers a recovery
    method, model = build("sar", lr=0.05, reset_threshold=100.0)
    source = params_of(model)
    method(batches(1)[0])
    assert method.recoveries == 1
    assert_same_state(params_of(model), source)
    assert method.ema is not None  # the authors' code keeps the EMA through a recovery
    cleared, _ = build("sar", lr=0.05, reset_threshold=100.0, clear_ema_on_recovery=True)
    cleared(batches(1)[0])
    assert cleared.recoveries == 1 and cleared.ema is None
    # threshold 0: never recovers, the weights move
    kept, model = build("sar", lr=0.05, reset_threshold=0.0)
    kept(batches(1)[0])
    assert kept.recoveries == 0 and kept.ema is not None
    assert any(not torch.equal(v, source[k]) for k, v in params_of(model).items())


def test_sar_ema_follows_the_second_loss():
    method, _ = build("sar", lr=0.05, reset_threshold=0.0)
    x1, x2 = batches(2)
    method(x1)
    first = method.ema
    method(x2)
    assert method.ema != first and 0.0 < method.ema < 0.4 * math.log(NUM_CLASSES)


def test_sar_excluded_modules_keep_top_layers_frozen():
    # Default: the top quarter of the stages (here layer2 of layer1..2) is not adapted.
    method, model = build("sar", lr=0.05, reset_threshold=0.0)
    adapted = {id(p) for g in method.optimizer.param_groups for p in g["params"]}
    assert adapted == {id(model.layer1[1].weight), id(model.layer1[1].bias)}
    before = params_of(model)
    for x in batches(2):
        method(x)
    after = params_of(model)
    assert torch.equal(after["layer2.1.weight"], before["layer2.1.weight"])
    assert not torch.equal(after["layer1.1.weight"], before["layer1.1.weight"])
    everything, model = build("sar", excluded_modules=[])
    assert everything.adapted_parameter_count() == 4 * 8
    with pytest.raises(ValueError, match="excluded_modules"):
        build("sar", excluded_modules=["layer1", "layer2"])


def test_sar_top_layers_reproduce_the_authors_choice():
    import timm
    import torchvision

    resnet50 = torchvision.models.resnet50()
    assert top_layers(resnet50) == ["layer4"]
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=12,
                                                           num_heads=2, num_classes=NUM_CLASSES)
    assert top_layers(vit) == ["blocks.9", "blocks.10", "blocks.11", "norm"]
    assert set(top_layers(vit)) == set(AUTHORS_EXCLUDED_MODULES) - {"layer4"}
    wrapped = nn.Sequential()
    wrapped.add_module("net", resnet50)
    assert top_layers(wrapped) == ["net.layer4"]
    assert top_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))) == []


def test_sar_top_layers_of_the_project_models():
    models = pytest.importorskip("metatta.models")
    expected = {
        ("resnet_fmnist", 1): ["stages.2"],
        ("wrn16_4", 3): ["block3", "bn1"],
        ("vit_tiny_fmnist", 1): ["vit.blocks.4", "vit.blocks.5", "vit.norm"],
    }
    for (name, channels), top in expected.items():
        assert top_layers(models.build_model(name, NUM_CLASSES, channels)) == top, name


def test_sar_step_is_entropy_at_the_perturbed_weights():
    """One SAR step with plain SGD equals the update computed by hand."""
    method, model = build("sar", lr=0.1, momentum=0.0, reset_threshold=0.0, rho=0.05)
    reference = copy.deepcopy(model)
    x = batches(1)[0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref_params = [dict(reference.named_parameters())[n] for n in names]
    e0 = 0.4 * math.log(NUM_CLASSES)
    entropy = softmax_entropy(reference(x))
    mask = entropy < e0
    grads = torch.autograd.grad(entropy[mask].mean(), ref_params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(ref_params, grads):
            p.add_(0.05 * g / (norm + 1e-12))
    entropy2 = softmax_entropy(reference(x))[mask]
    loss2 = entropy2[entropy2 < e0].mean()
    grads2 = torch.autograd.grad(loss2, ref_params)
    start = params_of(model)
    method(x)
    after = params_of(model)
    for n, g2 in zip(names, grads2):
        torch.testing.assert_close(after[n], start[n] - 0.1 * g2, rtol=1e-4, atol=1e-6)


# ---- SAM -----------------------------------------------------------------------------------
def test_sam_step_matches_its_formula_and_lowers_the_sharpness_aware_loss():
    A = torch.diag(torch.tensor([1.0, 10.0]))
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    rho, lr = 0.05, 0.02
    sam = SAM(torch.optim.SGD([w], lr=lr), rho=rho)

    def loss_at(v):
        return 0.5 * v @ A @ v

    def sharpness_aware(v):  # L(v + rho g / ||g||), SAM's first-order inner maximum
        g = A @ v
        return loss_at(v + rho * g / g.norm())

    values = []
    for _ in range(20):
        with torch.no_grad():
            v = w.detach().clone()
            g = A @ v
            expected = v - lr * (A @ (v + rho * g / g.norm()))
            values.append(sharpness_aware(v).item())
        sam.zero_grad()
        loss_at(w).backward()
        sam.step(lambda: loss_at(w).backward())
        torch.testing.assert_close(w.detach(), expected)
    assert all(b < a for a, b in zip(values, values[1:]))
    assert not sam.perturbed


def test_sam_restores_exactly_and_validates():
    w = nn.Parameter(torch.randn(5))
    sam = SAM(torch.optim.SGD([w], lr=0.1))
    start = w.detach().clone()
    (w ** 2).sum().backward()
    sam.first_step(zero_grad=True)
    assert not torch.equal(w.detach(), start) and w.grad is None
    with pytest.raises(RuntimeError):
        sam.first_step()
    sam.unperturb()
    assert torch.equal(w.detach(), start)
    with pytest.raises(ValueError):
        SAM(torch.optim.SGD([w], lr=0.1), rho=-1.0)
    with pytest.raises(TypeError):
        SAM(object())
    assert sam.state_dict() == sam.base_optimizer.state_dict()


# ---- CoTTA ---------------------------------------------------------------------------------
def test_cotta_teacher_is_the_ema_of_the_student():
    method, model = build("cotta", lr=0.01, restore_prob=0.0, aug_threshold=0.0)
    teacher_before = {k: v.clone() for k, v in method.teacher.named_parameters()}
    method(batches(1)[0])
    m = 0.999
    student = dict(model.named_parameters())
    for k, t in method.teacher.named_parameters():
        torch.testing.assert_close(t, m * teacher_before[k] + (1 - m) * student[k].detach())
    assert any(not torch.equal(t, teacher_before[k]) for k, t in method.teacher.named_parameters())


def test_cotta_output_is_the_teacher_prediction_and_augments_below_the_threshold(monkeypatch):
    x = batches(1)[0]
    plain, _ = build("cotta", aug_threshold=0.0)  # anchor confidence is never below 0
    bn, _ = build("bn")
    torch.testing.assert_close(plain(x), bn(x))  # teacher = source model on batch statistics
    augmented, _ = build("cotta", aug_threshold=1.01, num_augmentations=3, batched_views=False)  # the loop
    calls = []
    original = augmented.augment.forward
    monkeypatch.setattr(augmented.augment, "forward", lambda inp: calls.append(1) or original(inp))
    out = augmented(x)
    assert len(calls) == 3 and out.shape == (len(x), NUM_CLASSES)


def test_cotta_adapts_all_parameters():
    method, model = build("cotta", lr=0.01, restore_prob=0.0, aug_threshold=0.0)
    assert method.adapted_parameter_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("p_restore", [0.0, 0.3, 1.0])
def test_cotta_stochastic_restore_probability(p_restore):
    method, model = build("cotta", restore_prob=p_restore)
    source = params_of(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(0)
    method.stochastic_restore()
    restored = sum((p == source[n]).sum().item() for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert abs(restored / total - p_restore) < 0.05
    if p_restore == 1.0:
        assert_same_state(params_of(model), source)


def test_cotta_rejects_bad_settings():
    with pytest.raises(ValueError, match="restore_prob"):
        build("cotta", restore_prob=1.5)
    with pytest.raises(ValueError, match="num_augmentations"):
        build("cotta", num_augmentations=0)


# ---- CoTTA augmentation --------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (1, 3, 224, 224)])
def test_cotta_augment_shapes_range_and_determinism(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a = cotta_augment(x, generator=torch.Generator().manual_seed(1))
    b = cotta_augment(x, generator=torch.Generator().manual_seed(1))
    c = cotta_augment(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


def test_cotta_augment_is_mild_and_soft_is_milder():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 8, 8, generator=g)
    x = F.interpolate(base, size=32, mode="bilinear", align_corners=False)  # smooth image
    strong = torch.stack([(cotta_augment(x) - x).abs().mean() for _ in range(30)]).mean()
    soft = torch.stack([(cotta_augment(x, soft=True) - x).abs().mean() for _ in range(30)]).mean()
    assert soft < strong < 0.3


@pytest.mark.parametrize("bad", [torch.rand(3, 32, 32), torch.rand(2, 2, 32, 32),
                                 torch.zeros(2, 3, 32, 32, dtype=torch.uint8)])
def test_cotta_augment_rejects_bad_batches(bad):
    with pytest.raises(ValueError, match="cotta_augment"):
        CoTTAAugment()(bad)


@pytest.mark.parametrize("name", ["bn", "tent"])
def test_channels_last_is_a_layout_only_change(name):
    x = batches(1)[0]
    fast, _ = build(name)
    plain, _ = build(name, channels_last=False)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.model.parameters() if p.dim() == 4)
    for _ in range(2):
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
