"""MethodConfig.precision: the model's forward under autocast (bf16), float32 everywhere else;
the default (fp32) leaves the model untouched, so PALM's and LAW's results do not change. And the
NHWC gradient at the ResNet's pool (a speedup) leaves PALM's and LAW's steps bit-identical."""
from __future__ import annotations

import copy

import pytest
import torch

from metatta.methods import build_method
from metatta.methods.common import autocast_forward
from metatta.models import build_model
from metatta.models.resnet import ResNet

from test_methods import TinyBNNet, batches


@pytest.mark.parametrize("name", ["palm", "law"])
def test_default_precision_adds_no_hook_and_is_bit_identical_to_the_plain_model(name):
    a = build_method(name, TinyBNNet(), {"channels_last": False})
    b = build_method(name, TinyBNNet(), {"channels_last": False, "precision": "fp32"})
    assert not a.model._forward_hooks and not a.model._forward_pre_hooks
    for x in batches(3):
        torch.manual_seed(0)
        out_a = a(x)
        torch.manual_seed(0)
        assert torch.equal(out_a, b(x))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["palm", "law", "tent"])
def test_bf16_keeps_logits_parameters_and_optimizer_state_float32_and_close(name):
    plain = build_method(name, TinyBNNet(), {"channels_last": False})
    half = build_method(name, TinyBNNet(), {"channels_last": False, "precision": "bf16"})
    for x in batches(3):
        torch.manual_seed(0)
        expected = plain(x)
        torch.manual_seed(0)
        got = half(x)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert all(v.dtype == torch.float32 for s in half.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())
    assert half.skipped_updates == 0
    assert not torch.is_autocast_cpu_enabled()  # left after every forward


def test_a_deep_copy_has_hooks_of_its_own_and_autocast_is_left_when_forward_raises():
    model = TinyBNNet()
    autocast_forward(model, torch.bfloat16)
    twin = copy.deepcopy(model)
    x = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    with pytest.raises(RuntimeError):
        model(torch.rand(2, 5, 16, 16))  # wrong channel count
    assert not torch.is_autocast_cpu_enabled()


def test_unknown_precision_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"palm: config.precision must be 'fp32' or 'bf16', got 'fp16'"):
        build_method("palm", TinyBNNet(), {"precision": "fp16"})


class PlainPoolResNet(ResNet):
    """The ResNet forward without the NHWC gradient hook at the pool (the code before the speedup)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


@pytest.mark.parametrize("name", ["palm", "law"])
def test_the_nhwc_pool_gradient_leaves_palm_and_law_bit_identical(name):
    model = build_model("resnet8", num_classes=10, in_channels=1)
    plain = PlainPoolResNet(num_classes=10, in_channels=1, blocks=(1, 1, 1), widths=(16, 32, 64))
    plain.load_state_dict(model.state_dict())
    hooked_method, plain_method = build_method(name, model), build_method(name, plain)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.rand(16, 1, 12, 12, generator=g)
        torch.manual_seed(1)
        expected = plain_method(x)
        torch.manual_seed(1)
        assert torch.equal(hooked_method(x), expected)
    for p, q in zip(hooked_method.model.parameters(), plain_method.model.parameters()):
        assert torch.equal(p, q)
