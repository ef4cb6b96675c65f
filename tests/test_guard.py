import math

import pytest
import torch
from torch import nn

from metatta.methods.guard import CollapseGuard, GuardConfig, agreement, marginal_entropy, reference_model


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
