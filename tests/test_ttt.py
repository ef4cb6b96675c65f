"""Joint-training TTT and the update-then-predict loop it shares with CTA (methods/ttt.py, methods/cta.py)."""
import copy

import numpy as np
import pytest
import torch

from metatta.methods import build_method
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.ssl import MultiHeadNet, build_network, load_network
from metatta.ssl.rotation import rotate_batch, rotation_loss

HEADS = {"ttt": {"rotation": [16, 4]}, "cta": {"projector": [16, 8]}}


def network(name: str, seed: int = 0) -> MultiHeadNet:
    torch.manual_seed(seed)
    return build_network(build_model("resnet_fmnist", 10, 1, widths=(4, 8, 8)), HEADS[name])


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def params(net: MultiHeadNet, part: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(net, part).named_parameters()}


def changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name", ["ttt", "cta"])
def test_steps_adapt_the_encoder_only_then_predict(name):
    method = build_method(name, network(name), {"steps": 2, "lr": 1e-2, "episodic": False, "channels_last": False})
    encoder, classifier, heads = (params(method.model, p) for p in ("encoder", "classifier", "heads"))
    x = images()
    torch.manual_seed(0)
    logits = method(x)
    assert logits.shape == (16, 10)
    assert changed(encoder, params(method.model, "encoder")), "the encoder did not move"
    assert not changed(classifier, params(method.model, "classifier"))
    assert not changed(heads, params(method.model, "heads"))
    torch.testing.assert_close(logits, method.predict(x))  # the prediction is the updated encoder's
    assert method.adapted_parameter_count() == sum(p.numel() for p in method.model.encoder.parameters())


@pytest.mark.parametrize("name", ["ttt", "cta"])
def test_zero_steps_predict_with_batch_statistics_and_never_update(name):
    net = network(name)
    method = build_method(name, copy.deepcopy(net), {"steps": 0, "channels_last": False})
    x = images()
    before = params(method.model, "encoder")
    logits = method(x)
    assert not changed(before, params(method.model, "encoder"))
    net.train()  # train-mode BN normalizes with the batch statistics, as the method does
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ttt", "cta"])
def test_episodic_resets_every_batch_and_continual_keeps_the_updates(name):
    x1, x2 = images(seed=1), images(seed=2)
    outputs = {}
    for episodic in (True, False):
        method = build_method(name, network(name), {"steps": 1, "lr": 1e-2, "episodic": episodic})
        torch.manual_seed(0)
        method(x1)
        torch.manual_seed(1)
        outputs[episodic] = method(x2)
    fresh = build_method(name, network(name), {"steps": 1, "lr": 1e-2})
    torch.manual_seed(1)
    torch.testing.assert_close(outputs[True], fresh(x2))  # episodic: as if x1 had never been seen
    assert not torch.allclose(outputs[True], outputs[False])
    method = build_method(name, network(name), {"steps": 1, "lr": 1e-2, "episodic": False})
    start = params(method.model, "encoder")
    method(x1)
    method.reset()
    assert not changed(start, params(method.model, "encoder"))


def test_ttt_test_time_updates_lower_the_rotation_loss():
    method = build_method("ttt", network("ttt"), {"steps": 5, "lr": 1e-2, "episodic": False})
    x = images(32)
    rotated, labels = rotate_batch(x, "expand")

    def loss():
        with torch.no_grad():
            return rotation_loss(method.model(rotated, head="rotation"), labels).item()

    before = loss()
    method(x)
    assert loss() < before


@pytest.mark.parametrize("name", ["ttt", "cta"])
def test_the_network_comes_from_the_context_or_the_model(name):
    net = network(name, seed=3)
    source = build_model("resnet_fmnist", 10, 1, widths=(4, 8, 8))
    method = build_method(name, source, {"steps": 0}, **{f"{name}_model": net})
    assert method.model is net
    assert isinstance(build_method(name, source, {"steps": 1}).model, MultiHeadNet)  # a fresh head: smoke tests
    other = "cta" if name == "ttt" else "ttt"
    with pytest.raises(KeyError, match="no head"):
        build_method(name, source, {}, **{f"{name}_model": network(other)})
    with pytest.raises(TypeError, match="must be a MultiHeadNet"):
        build_method(name, source, {}, **{f"{name}_model": source})
    with pytest.raises(ValueError, match="steps"):
        build_method(name, source, {"steps": -1})


@pytest.mark.parametrize("name", ["ttt", "cta"])
def test_nonfinite_input_and_loss_leave_the_method_unchanged(name):
    method = build_method(name, network(name), {"steps": 1, "lr": 1e-2, "episodic": False})
    method(images(seed=4))
    state = copy.deepcopy(method.model.state_dict())
    method(torch.full((16, 1, 28, 28), float("nan")))
    hook = method.model.register_forward_hook(lambda module, inputs, out: out * float("inf"))
    method(images(seed=5))
    hook.remove()
    assert method.skipped_updates == 2
    for k, v in method.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_cta_with_a_single_image_predicts_without_adapting():
    method = build_method("cta", network("cta"), {"steps": 3, "lr": 1e-2})
    before = params(method.model, "encoder")
    assert method(images(1)).shape == (1, 10)
    assert not changed(before, params(method.model, "encoder"))


# ---- joint training (the trainer's TTT stage) --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet_fmnist", 10, 1, widths=(4, 8, 8))
    path = tmp_path_factory.mktemp("src") / "tiny.pt"
    return save_checkpoint(path, model, model_name="resnet_fmnist", model_kwargs={"widths": [4, 8, 8]},
                           num_classes=10, in_channels=1, dataset="fashion_mnist")


def tiny_data(n: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def test_joint_training_trains_encoder_classifier_and_rotation_head(tmp_path, tiny_source):
    from metatta.data.types import DomainData
    from metatta.ssl.stages import cta_train_config
    from trainers.cta import train_cta

    cfg = cta_train_config({
        "name": "t", "method": "ttt", "source_checkpoint": str(tiny_source), "checkpoint_dir": str(tmp_path),
        "joint": {"epochs": 2, "batch_size": 16, "lr": 1e-2}, "head_hidden": 8, "mlflow": False, "device": "cpu",
        "progress": False, "val_batch_size": 16, "method_config": {"steps": 1}})
    images_, labels = tiny_data()
    domains = [DomainData("fog", 5, images_[:32], labels[:32])]
    outcome = train_cta(cfg, use_ray=False, data=(images_, labels), domains=domains)
    history = outcome.history["joint"]
    assert len(history) == 2 and {"ce", "rotation", "accuracy", "samples_per_second"} <= set(history[0])
    assert history[1]["rotation"] < history[0]["rotation"]
    net, info = load_network(outcome.adapter_dir, kind="ttt")
    assert info["validation_error"] == outcome.validation_error
    source = build_model("resnet_fmnist", 10, 1, widths=(4, 8, 8))
    source.load_state_dict(torch.load(tiny_source, weights_only=True)["state_dict"])
    moved = [k for k, v in net.encoder.state_dict().items() if k in source.state_dict()
             and v.is_floating_point() and not torch.equal(v, source.state_dict()[k])]
    assert moved, "joint training did not move the shared encoder"
