"""Source networks, the model factory, checkpoints and clean feature statistics."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from metatta.models import MODEL_REGISTRY, build_model, known_models, load_external_weights, load_source_model
from metatta.models.checkpoint import (
    CheckpointError, checkpoint_hash, header_path, load_feature_stats, read_header, save_checkpoint,
)
from metatta.models.feature_stats import FeatureRecorder, compute_feature_stats, feature_samples, feature_taps
from metatta.models.normalize import Normalize, NormalizedModel
from metatta.models.resnet import BasicBlock, ResNet, ShortcutConv, keep_channels_last_in_backward
from metatta.models.wideresnet import WideBasicBlock


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _images(b: int, c: int, hw: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, hw, hw, generator=torch.Generator().manual_seed(seed))


# ---- forward shapes ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, in_channels, hw",
    [
        ("resnet_fmnist", 1, 28), ("resnet_fmnist", 3, 32), ("resnet20_cifar", 3, 32), ("resnet18_cifar", 3, 32),
        ("resnet18_cifar", 1, 28), ("wrn16_4", 3, 32), ("wrn16_4", 1, 28), ("vit_tiny_fmnist", 1, 28),
    ],
)
def test_forward_shape(name, in_channels, hw):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(_images(3, in_channels, hw))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_wrn28_10_is_the_standard_architecture():
    model = build_model("wrn28_10", 10, 3)
    # RobustBench's Standard WRN-28-10 has 36,479,194 parameters.
    assert sum(p.numel() for p in model.parameters()) == 36_479_194
    assert len(feature_taps(model)) == 12
    names = set(model.state_dict())
    for key in ("conv1.weight", "block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight",
                "block3.layer.3.conv2.weight", "bn1.running_mean", "fc.weight", "fc.bias"):
        assert key in names, key
    with torch.no_grad():
        assert model.eval()(_images(1, 3, 32)).shape == (1, 10)


def test_vit_uses_layernorm_and_no_batchnorm():
    model = build_model("vit_tiny_fmnist", 10, 1)
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(feature_taps(model)) == 6


def test_resnet_depth_and_width_are_configurable():
    model = build_model("resnet_fmnist", 10, 1, blocks=[2, 1], widths=[8, 24])
    assert len(model.blocks()) == 3
    assert model.fc.in_features == 24
    with pytest.raises(ValueError, match="equally long"):
        ResNet(blocks=[1, 1], widths=[8])
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model("wrn28_10", 10, 3, depth=27)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("vit_tiny_fmnist", 10, 1, patch_size=5)


# ---- normalization inside the model ------------------------------------------------------------
def test_normalize_module():
    norm = Normalize([0.5, 0.25], [0.5, 2.0])
    x = torch.ones(2, 2, 3, 3)
    y = norm(x)
    assert torch.allclose(y[:, 0], torch.full((2, 3, 3), 1.0))
    assert torch.allclose(y[:, 1], torch.full((2, 3, 3), 0.375))
    assert {"mean", "std"} <= {k for k, _ in norm.named_buffers()}
    assert not list(norm.parameters())
    with pytest.raises(ValueError, match="expected images"):
        norm(torch.ones(2, 3, 3, 3))
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match="equally long"):
        Normalize([0.0, 1.0], [1.0])


@pytest.mark.parametrize("name, in_channels, hw", [("resnet_fmnist", 1, 28), ("wrn16_4", 3, 32),
                                                   ("vit_tiny_fmnist", 1, 28)])
def test_models_normalize_their_input(name, in_channels, hw):
    """The first layer after Normalize sees (x - mean) / std, and the buffers are saved with the weights."""
    model = build_model(name, 10, in_channels, mean=[0.3] * in_channels, std=[0.2] * in_channels).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen = []
    first_conv.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = _images(2, in_channels, hw)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen[0], (x - 0.3) / 0.2)
    assert "normalize.mean" in model.state_dict() and "normalize.std" in model.state_dict()


# ---- factory --------------------------------------------------------------------------------
def test_factory_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*resnet_fmnist.*wrn28_10.*timm:<name>"):
        build_model("resnet9000", 10, 1)
    with pytest.raises(ValueError, match="bad keyword"):
        build_model("resnet_fmnist", 10, 1, not_an_option=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet_fmnist", 0, 1)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("resnet_fmnist", 10, 0)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm:not_a_model_xyz", 10, 3)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_model("torchvision:not_a_model_xyz", 10, 3)
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("torchvision:resnet18", 10, 1)
    assert set(MODEL_REGISTRY) <= set(known_models())


def test_timm_and_torchvision_names_build_offline(no_network):
    torch.manual_seed(0)
    timm_model = build_model("timm:resnet10t", 10, 1).eval()
    assert isinstance(timm_model, NormalizedModel)
    tv_model = build_model("torchvision:resnet18", 10, 3).eval()
    with torch.no_grad():
        assert timm_model(_images(2, 1, 28)).shape == (2, 10)
        assert tv_model(_images(2, 3, 32)).shape == (2, 10)
    # torchvision ResNets: the taps are the residual blocks
    assert len(feature_taps(tv_model)) == 8


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_timm_loads_a_local_weights_file(tmp_path, no_network, suffix):
    torch.manual_seed(0)
    source = build_model("timm:resnet10t", 5, 3).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": source.net.state_dict()}, path)
    torch.manual_seed(1)
    loaded = build_model("timm:resnet10t", 5, 3, checkpoint=str(path)).eval()
    x = _images(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model("timm:resnet10t", 5, 3, checkpoint=str(tmp_path / "missing.pt"))


def test_robustbench_style_checkpoint_loads_into_wrn(tmp_path):
    """RobustBench saves {'state_dict': {'module.<key>': ...}} without normalization buffers."""
    torch.manual_seed(0)
    source = build_model("wrn16_4", 10, 3).eval()
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.startswith("normalize.")}
    path = tmp_path / "Standard.pt"
    torch.save({"state_dict": state, "epoch": 200}, path)
    target = load_external_weights(build_model("wrn16_4", 10, 3), path).eval()
    x = _images(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    with pytest.raises(ValueError, match="does not fit"):
        load_external_weights(build_model("wrn16_4", 10, 3, widen_factor=2), path)


# ---- checkpoints --------------------------------------------------------------------------
def _save(tmp_path, name="resnet_fmnist", in_channels=1, **kwargs):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels, **kwargs)
    model.train()
    with torch.no_grad():  # move BN running stats away from their defaults
        model(_images(8, in_channels, 28))
    model.eval()
    stats = compute_feature_stats(model, _images(16, in_channels, 28, seed=3))
    path = save_checkpoint(tmp_path / "src" / "model.pt", model, model_name=name, model_kwargs=kwargs,
                           num_classes=10, in_channels=in_channels, dataset="fashion_mnist", clean_test_error=8.5,
                           train_time_s=12.0, feature_stats=stats)
    return model, path, stats


@pytest.mark.parametrize("name, kwargs", [("resnet_fmnist", {}), ("resnet_fmnist", {"widths": [8, 16, 24]}),
                                          ("vit_tiny_fmnist", {"depth": 2, "embed_dim": 32})])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name, kwargs):
    model, path, stats = _save(tmp_path, name, **kwargs)
    loaded = load_source_model(path)
    assert not loaded.training
    x = _images(4, 1, 28, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    header = read_header(path)
    assert header["model"] == name and header["model_kwargs"] == kwargs
    assert header["num_classes"] == 10 and header["in_channels"] == 1 and header["dataset"] == "fashion_mnist"
    assert header["clean_test_error"] == 8.5 and header["train_time_s"] == 12.0
    assert header["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint_hash(path)
    loaded_stats = load_feature_stats(path)
    assert loaded_stats.keys() == stats.keys()
    for k in stats:
        assert torch.equal(loaded_stats[k], stats[k])


def test_checkpoint_errors_name_the_file(tmp_path):
    _, path, _ = _save(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_source_model(tmp_path / "nothere.pt")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        checkpoint_hash(tmp_path / "nothere.pt")

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: no longer matches its header
    with pytest.raises(CheckpointError, match="model.pt.*truncated"):
        load_source_model(path)

    # truncated, with a header that was rewritten to match: torch cannot read it
    header = json.loads(header_path(path).read_text())
    header["weights_sha256"] = checkpoint_hash(path)
    header_path(path).write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="cannot read source checkpoint .*model.pt"):
        load_source_model(path)

    header_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="model.pt.json"):
        load_source_model(path)


class _Payload:
    """Not a tensor: a weights-only load must refuse to unpickle it."""


def test_checkpoint_loading_never_unpickles_objects(tmp_path):
    _, path, _ = _save(tmp_path)
    torch.save({"format": "metatta.source.v1", "state_dict": {}, "feature_stats": {}, "evil": _Payload()}, path)
    header = json.loads(header_path(path).read_text())
    header["weights_sha256"] = checkpoint_hash(path)
    header_path(path).write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_source_model(path)


def test_header_must_be_json_serialisable(tmp_path):
    model = build_model("resnet_fmnist", 10, 1)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", model, model_name="resnet_fmnist", num_classes=10, in_channels=1,
                        extra={"bad": object()})


# ---- feature taps and statistics ------------------------------------------------------------------
def test_feature_taps_per_architecture():
    assert all(isinstance(t, BasicBlock) for t in feature_taps(build_model("resnet_fmnist", 10, 1)))
    assert len(feature_taps(build_model("resnet20_cifar", 10, 3))) == 9
    assert all(isinstance(t, WideBasicBlock) for t in feature_taps(build_model("wrn16_4", 10, 3)))
    generic = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4), nn.LayerNorm(4))
    assert [type(t) for t in feature_taps(generic)] == [nn.BatchNorm2d, nn.LayerNorm]
    with pytest.raises(ValueError, match="no known feature taps"):
        feature_taps(nn.Sequential(nn.Linear(2, 2)))


def test_feature_samples_by_rank():
    x4 = torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2)
    s = feature_samples(x4)
    assert s.shape == (8, 3)
    assert torch.equal(s[:, 1], x4[:, 1].reshape(-1))  # channel 1 over batch and positions
    tokens = torch.randn(2, 5, 4)
    assert torch.equal(feature_samples(tokens, class_token=True), tokens[:, 0])
    assert torch.allclose(feature_samples(tokens, class_token=False), tokens.mean(1))
    with pytest.raises(ValueError, match="unsupported shape"):
        feature_samples(torch.zeros(1, 1, 1, 1, 1))


def test_recorder_shapes_for_resnet_and_vit():
    resnet = build_model("resnet_fmnist", 10, 1)
    with FeatureRecorder(resnet) as rec:
        resnet(_images(3, 1, 28))
    assert [tuple(f.shape) for f in rec.features] == [(3 * 28 * 28, 16), (3 * 14 * 14, 32), (3 * 7 * 7, 64)]
    vit = build_model("vit_tiny_fmnist", 10, 1, depth=3, embed_dim=48, num_heads=3)
    with FeatureRecorder(vit) as rec:
        vit(_images(3, 1, 28))
    assert [tuple(f.shape) for f in rec.features] == [(3, 48)] * 3
    # the CLS token of each block's output
    block_out = []
    handle = vit.vit.blocks[1].register_forward_hook(lambda m, i, o: block_out.append(o))
    vit(_images(3, 1, 28))
    handle.remove()
    with FeatureRecorder(vit) as rec:
        vit(_images(3, 1, 28))
    torch.testing.assert_close(rec.features[1], block_out[0][:, 0])
    # hooks are gone after the block
    n = len(rec.features)
    vit(_images(3, 1, 28))
    assert len(rec.features) == n


@pytest.mark.parametrize("name", ["resnet_fmnist", "vit_tiny_fmnist"])
def test_recorded_stats_keep_the_graph(name):
    model = build_model(name, 10, 1).train()
    with FeatureRecorder(model) as rec:
        model(_images(4, 1, 28))
    loss = sum(((mean - 1.0) ** 2).mean() + ((std - 0.5) ** 2).mean() for mean, std in rec.stats())
    loss.backward()
    norm_grads = [m.weight.grad for m in model.modules()
                  if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight.grad is not None]
    assert norm_grads and any(g.abs().sum() > 0 for g in norm_grads)


def _direct_stats(model, images):
    """Reference: the whole set in one forward, hooks on the taps, torch.std_mean."""
    outs = []
    handles = [t.register_forward_hook(lambda m, i, o: outs.append(o)) for t in feature_taps(model)]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    ref = {}
    for i, o in enumerate(outs):
        rows = o.permute(0, 2, 3, 1).reshape(-1, o.shape[1]) if o.dim() == 4 else o[:, 0] if o.dim() == 3 else o
        ref[f"std.{i}"], ref[f"mean.{i}"] = torch.std_mean(rows.double(), dim=0)
    return ref


@pytest.mark.parametrize("name", ["resnet_fmnist", "vit_tiny_fmnist"])
def test_compute_feature_stats_matches_direct_computation(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 1)
    model.train()
    images = _images(24, 1, 28, seed=7)
    ref = _direct_stats(model, images)
    model.train()
    for batch_size in (5, 24):
        stats = compute_feature_stats(model, images, batch_size=batch_size)
        assert model.training  # mode restored
        assert stats.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(stats[k].double(), ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # an iterable of (x, y) batches gives the same
    loader = [(images[i : i + 10], torch.zeros(10)) for i in range(0, 24, 10)]
    stats = compute_feature_stats(model, loader)
    for k in ref:
        torch.testing.assert_close(stats[k].double(), ref[k], rtol=1e-4, atol=1e-5, msg=k)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), batch_size=st.integers(1, 12), seed=st.integers(0, 1000))
def test_pooled_stats_do_not_depend_on_batching(n, batch_size, seed):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3, elementwise_affine=False), nn.Linear(3, 3))
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    with torch.no_grad():
        feats = model[2](model[1](model[0](x)))
    std, mean = torch.std_mean(feats.double(), dim=0)
    stats = compute_feature_stats(model, x, batch_size=batch_size)
    torch.testing.assert_close(stats["mean.0"].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["std.0"].double(), std, rtol=1e-5, atol=1e-6)


def test_compute_feature_stats_errors():
    model = build_model("vit_tiny_fmnist", 10, 1, depth=1, embed_dim=32)
    with pytest.raises(ValueError, match="no images"):
        compute_feature_stats(model, [])
    with pytest.raises(ValueError, match="std needs"):
        compute_feature_stats(model, _images(1, 1, 28))
    with pytest.raises(ValueError, match="\\(N, C, H, W\\)"):
        compute_feature_stats(model, torch.zeros(3, 28, 28))



@pytest.mark.parametrize("name", ["resnet8", "wrn16_4"])
def test_nhwc_models_pass_nhwc_gradients_back_through_the_pool_with_the_same_values(name):
    """The pooled features' gradient is made NHWC (the last ReLU's backward is slow on mixed layouts);
    the gradients are bit-identical to those of the plain pool path."""
    model = build_model(name, num_classes=10, in_channels=3).to(memory_format=torch.channels_last).train()
    x = torch.rand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    layouts = []
    features = keep_channels_last_in_backward(model.forward_features(x))
    features.register_hook(lambda g: layouts.append(g.is_contiguous(memory_format=torch.channels_last)))
    params = list(model.parameters())
    hooked = torch.autograd.grad(model.fc(model.pool(features).flatten(1)).sum(), params)
    plain = torch.autograd.grad(model.fc(model.pool(model.forward_features(x)).flatten(1)).sum(), params)
    assert layouts == [True]
    assert all(torch.equal(a, b) for a, b in zip(hooked, plain))
    assert torch.equal(model(x), model.fc(model.pool(model.forward_features(x)).flatten(1)))


# ---- the shortcut projection around oneDNN's AVX2 kernel -----------------------------------
@pytest.mark.parametrize("in_planes, stride", [(1, 2), (4, 2), (7, 3), (8, 2), (16, 2), (4, 1)])
def test_shortcut_conv_equals_the_strided_conv(in_planes, stride):
    """The same outputs bit for bit; gradients summed in another order, equal to float rounding."""
    torch.manual_seed(0)
    ours = ShortcutConv(in_planes, 12, stride)
    plain = nn.Conv2d(in_planes, 12, 1, stride=stride, bias=False)
    plain.load_state_dict(ours.state_dict())  # the same parameter names: checkpoints load either way
    x = _images(6, in_planes, 15).contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for conv in (ours, plain):
        xx = x.clone().requires_grad_(True)
        y = conv(xx)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.arange(y.numel()).view_as(y)).sum(), [xx, conv.weight]))
    assert torch.equal(outs[0], outs[1])
    for ours_grad, plain_grad in zip(*grads):
        torch.testing.assert_close(ours_grad, plain_grad, rtol=0, atol=1e-6 * plain_grad.abs().max().item())


AVX2_TRAINING_STEPS = """
import torch
from metatta.models import build_model
torch.manual_seed(0)
for widths in ([4, 8, 8], [3, 6, 12], [2, 4, 8]):
    model = build_model("resnet_fmnist", 10, 1, widths=widths).to(memory_format=torch.channels_last)
    for _ in range(10):
        x = torch.rand(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        model(x).logsumexp(1).mean().backward()
print("ok")
"""


def test_narrow_resnets_train_in_nhwc_on_avx2_only_cpus():
    """oneDNN's strided 1x1 backward-data kernel for AVX2 corrupts the heap for 2-7 input channels
    (it crashed CTA's and TTT's training tests on AVX2-only CI machines); `ShortcutConv` avoids it.
    ONEDNN_MAX_CPU_ISA picks the AVX2 kernels on any x86 CPU."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", AVX2_TRAINING_STEPS], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
