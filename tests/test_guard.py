import copy
import math

import pytest
import torch
from torch import nn

from metatta.data.fashion_mnist import load_fashion_mnist
from metatta.data.types import Batch
from metatta.evaluation import evaluate
from metatta.methods import build_method
from metatta.methods.guard import (CollapseGuard, GuardConfig, agreement, marginal_entropy, reference_model,
                                  relative_marginal_entropy)


def tiny_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def test_marginal_entropy_is_one_for_uniform_and_zero_for_one_class():
    uniform = torch.eye(5).repeat(4, 1) * 50  # every class equally often, confidently
    one_class = torch.zeros(20, 5)
    one_class[:, 2] = 50
    assert marginal_entropy(uniform) == pytest.approx(1.0, abs=1e-6)
    assert marginal_entropy(one_class) == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(2, 4)
    half[0, 0] = half[1, 1] = 50  # two classes of four: log 2 / log 4
    assert marginal_entropy(half) == pytest.approx(math.log(2) / math.log(4), abs=1e-6)


def test_agreement_counts_matching_argmax():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert agreement(a, b) == 0.75


def test_agreement_can_count_only_the_references_confident_predictions():
    model_logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    reference_logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.1, 0.0], [0.0, 0.1]])  # confident, confident, not, not
    assert agreement(model_logits, reference_logits) == 0.5
    assert agreement(model_logits, reference_logits, reference_confidence=0.9) == 0.5  # 1 of the 2 confident
    assert agreement(model_logits[2:], reference_logits[2:], reference_confidence=0.9) is None


def test_a_batch_without_a_confident_reference_prediction_adds_no_agreement():
    model = tiny_bn_model()
    guard = CollapseGuard(GuardConfig(min_marginal_entropy=None, min_agreement=0.5, window=2, check_every=1,
                                      reference_confidence=1.0), source=model)
    x = torch.rand(8, 1, 8, 8)  # the tiny reference is never certain: no agreement, never fires
    assert not any(guard.observe(x, reference_model(model)(x).roll(1, dims=1)) for _ in range(4))
    assert guard.state()["agreements"] == []


def test_relative_marginal_entropy_reads_the_method_against_the_reference():
    balanced = torch.eye(5).repeat(4, 1) * 50
    two_classes = torch.zeros(20, 5)
    two_classes[:10, 0] = two_classes[10:, 1] = 50
    assert relative_marginal_entropy(two_classes, two_classes) == pytest.approx(1.0)
    assert relative_marginal_entropy(balanced, two_classes) == pytest.approx(math.log(5) / math.log(2))
    assert relative_marginal_entropy(two_classes, balanced) == pytest.approx(math.log(2) / math.log(5))


def test_the_relative_marginal_is_quiet_when_the_reference_is_as_unbalanced_and_fires_on_a_collapse():
    """A stream whose batches the reference itself puts into two classes: the plain marginal signal
    fires on a model that predicts as the reference does, the relative one only on a collapse."""
    model = tiny_bn_model()
    guard = CollapseGuard(GuardConfig(min_marginal_entropy=0.5, min_agreement=None, window=2, check_every=1,
                                      relative_marginal=True), source=model)
    plain = CollapseGuard(GuardConfig(min_marginal_entropy=0.5, min_agreement=None, window=2, check_every=1),
                          source=model)
    reference = reference_model(model)
    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8)
    ref = reference(x)
    like_reference = torch.full_like(ref, -10.0)  # the reference's top-2 classes per image, nothing else
    top2 = ref.mean(0).topk(2).indices
    like_reference[torch.arange(32), top2[(ref[:, top2[0]] < ref[:, top2[1]]).long()]] = 10.0
    guard.reference = plain.reference = lambda _: like_reference  # a reference as unbalanced as the batch
    assert not any(guard.observe(x, like_reference) for _ in range(4))
    assert any(plain.observe(x, like_reference) for _ in range(4))
    collapsed = torch.full_like(ref, -10.0)
    collapsed[:, top2[0]] = 10.0
    assert [guard.observe(x, collapsed) for _ in range(2)] == [False, True]
    assert len(guard.state()["marginals"]) == 0  # emptied by firing


def test_relative_marginal_thresholds_may_exceed_one_and_need_the_marginal_signal():
    GuardConfig(min_marginal_entropy=1.05, relative_marginal=True).validate()
    with pytest.raises(ValueError, match=r"min_marginal_entropy must be a number in \[0, 1\]"):
        GuardConfig(min_marginal_entropy=1.05).validate()
    with pytest.raises(ValueError, match="relative_marginal reads the class-marginal signal"):
        GuardConfig(min_marginal_entropy=None, relative_marginal=True).validate()
    with pytest.raises(ValueError, match="relative_marginal must be true or false"):
        GuardConfig(relative_marginal="yes").validate()
    with pytest.raises(ValueError, match="source model"):
        CollapseGuard(GuardConfig(min_agreement=None, relative_marginal=True))


def test_reference_uses_batch_statistics_and_is_frozen():
    model = tiny_bn_model()
    reference = reference_model(model)
    bn = reference[1]
    assert bn.running_mean is None and not bn.track_running_stats
    assert not any(p.requires_grad for p in reference.parameters())
    assert model[1].running_mean is not None  # the source model is untouched


def test_guard_fires_on_a_model_driven_to_one_class_and_is_quiet_on_a_clean_stream():
    model = tiny_bn_model()
    guard = CollapseGuard(GuardConfig(min_marginal_entropy=0.2, window=3, check_every=1), source=model)
    torch.manual_seed(1)
    batches = [torch.rand(16, 1, 8, 8) for _ in range(12)]
    reference = reference_model(model)
    for x in batches:  # the method predicts what the BN-adapted source predicts: healthy
        assert not guard.observe(x, reference(x))
    assert guard.fired == 0
    collapsed = torch.zeros(16, 5)
    collapsed[:, 3] = 10.0
    fired = [guard.observe(x, collapsed) for x in batches[:3]]
    assert fired == [False, False, True] and guard.fired == 1
    # the windows start empty again after firing
    assert not guard.observe(batches[0], collapsed)


def test_agreement_alone_fires_when_predictions_stop_matching_the_reference():
    model = tiny_bn_model()
    guard = CollapseGuard(GuardConfig(min_marginal_entropy=None, min_agreement=0.5, window=2, check_every=1),
                          source=model)
    reference = reference_model(model)
    x = torch.rand(32, 1, 8, 8)
    shifted = reference(x).roll(1, dims=1)  # diverse but never the reference's class
    assert [guard.observe(x, shifted) for _ in range(2)] == [False, True]


def test_reference_runs_every_check_every_batches():
    model = tiny_bn_model()
    guard = CollapseGuard(GuardConfig(min_marginal_entropy=None, window=8, check_every=4), source=model)
    calls = []
    guard.reference.register_forward_hook(lambda *args: calls.append(1))
    for _ in range(9):
        guard.observe(torch.rand(4, 1, 8, 8), torch.rand(4, 5))
    assert len(calls) == 3  # batches 0, 4, 8


@pytest.mark.parametrize("change, match", [
    ({"action": "explode"}, "action"),
    ({"min_agreement": 1.5}, "min_agreement"),
    ({"reference_confidence": -0.1}, "reference_confidence"),
    ({"window": 0}, "window"),
    ({"check_every": 2.5}, "check_every"),
    ({"min_agreement": None, "min_marginal_entropy": None}, "both signals are off"),
])
def test_bad_guard_settings_are_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        CollapseGuard(GuardConfig(**change), source=tiny_bn_model(), where="tent guard")


def test_agreement_needs_a_source_model():
    with pytest.raises(ValueError, match="source model"):
        CollapseGuard(GuardConfig())


# ---- worn by a method: the guard and the reset_every schedule in the update loop ----------------



class ListStream:
    setting, resets_per_domain = "continual", False

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.fixture(scope="module")
def clean_fmnist():
    """A small conv net with BN trained briefly on clean Fashion-MNIST, and 1,024 clean test images."""
    images, labels = load_fashion_mnist("train")
    x = torch.from_numpy(images[:4096]).float().div(255).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels[:4096]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for epoch in range(2):
        for i in range(0, len(x), 128):
            loss = nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test_images, test_labels = load_fashion_mnist("test")
    tx = torch.from_numpy(test_images[:1024]).float().div(255).reshape(-1, 1, 28, 28)
    ty = torch.from_numpy(test_labels[:1024]).long()
    batches = [Batch(tx[i:i + 64], ty[i:i + 64], "clean") for i in range(0, 1024, 64)]
    return model, batches


def test_a_clean_stream_leaves_the_full_guard_quiet(clean_fmnist):
    model, batches = clean_fmnist
    guard = {"action": "reset", "min_marginal_entropy": 0.5, "min_agreement": 0.6, "window": 4, "check_every": 1}
    method = build_method("tent", copy_of(model), {"guard": guard})
    result = evaluate(method, ListStream(batches), progress=False)
    assert result.collapse_events == 0 and result.mean_error < 50


def test_the_guard_resets_a_model_driven_to_one_class(clean_fmnist):
    model, batches = clean_fmnist
    guard = {"action": "reset", "min_marginal_entropy": 0.5, "min_agreement": 0.6, "window": 4, "check_every": 1}
    method = build_method("tent", copy_of(model), {"guard": guard})
    source_bias = method.model[4].bias.detach().clone()
    with torch.no_grad():  # drive the last BN layer's output onto whatever feeds class 3
        method.model[4].bias.add_(50 * method.model[8].weight[3].sign())
    logits = [method(b.x) for b in batches[:4]]
    assert method.collapse_events == 1  # fired once the 4-batch window was full
    assert torch.equal(method.model[4].bias, source_bias)  # and reset to the source
    assert all((l.argmax(1) == 3).float().mean() > 0.9 for l in logits)


def test_the_default_watch_warns_and_counts_a_collapse_without_resetting(clean_fmnist, caplog):
    model, batches = clean_fmnist
    method = build_method("tent", copy_of(model), {"lr": 1e3})  # an absurd learning rate
    with torch.no_grad():
        method.model[4].bias.add_(50 * method.model[8].weight[3].sign())
    result = evaluate(method, ListStream(batches), progress=False)
    assert result.collapse_events >= 1 and result.mean_error > 80
    assert "collapse suspected" in caplog.text and "warning only" in caplog.text
    quiet = evaluate(build_method("tent", copy_of(model)), ListStream(batches), progress=False)
    assert quiet.collapse_events == 0


def test_guard_null_switches_the_watch_off(clean_fmnist):
    method = build_method("bn", copy_of(clean_fmnist[0]), {"guard": None})
    assert method.guard is None


@pytest.mark.parametrize("n", [1, 3, 4])
def test_reset_every_resets_exactly_every_n_updates(clean_fmnist, n):
    model, batches = clean_fmnist
    method = build_method("tent", copy_of(model), {"reset_every": n})
    source = [p.detach().clone() for p in method.optimizer.param_groups[0]["params"]]
    for i, batch in enumerate(batches[:9], start=1):
        method(batch.x)
        adapted = method.optimizer.param_groups[0]["params"]
        at_source = all(torch.equal(p, q) for p, q in zip(adapted, source))
        assert at_source == (i % n == 0), i
        assert not method.optimizer.state or i % n != 0  # a fresh optimizer after each reset
    assert method.scheduled_resets == 9 // n


def test_reset_every_counts_steps_and_skips_nonfinite_batches(clean_fmnist):
    model, batches = clean_fmnist
    method = build_method("tent", copy_of(model), {"reset_every": 4, "steps": 2})
    method(batches[0].x)
    nan = batches[1].x.clone()
    nan[0, 0, 0, 0] = float("nan")
    method(nan)  # predicted without adapting: not an update
    assert method.scheduled_resets == 0
    method(batches[2].x)  # 2 + 2 updates
    assert method.scheduled_resets == 1


@pytest.mark.parametrize("config, match", [
    ({"reset_every": 0}, "reset_every"),
    ({"guard": {"action": "explode"}}, "guard"),
    ({"guard": {"window": -1}}, "window"),
])
def test_bad_reset_and_guard_settings_name_the_field(clean_fmnist, config, match):
    with pytest.raises(ValueError, match=match):
        build_method("tent", copy_of(clean_fmnist[0]), config)


def copy_of(model):
    return copy.deepcopy(model)
