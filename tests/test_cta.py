"""CTA: the trainer's stages (plain functions and Ray Train), resume, registry, adapter checks, adaptation."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metatta import tracking
from metatta.config import load_config
from metatta.data.types import DomainData
from metatta.experiment import ExperimentConfig, MethodSpec, checked_adapter, method_context, with_adapter
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.ssl import load_network
from metatta.ssl.stages import cta_train_config, load_stage_state, stage_files
from metatta.ssl.training import stage_spec
from trainers.cta import fit_stage_on_ray, train_cta

CTA_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fmnist_c" / "cta.yaml"

WIDTHS = [4, 8, 8]


def write_source(path, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("resnet_fmnist", 10, 1, widths=WIDTHS)
    return save_checkpoint(path, model, model_name="resnet_fmnist", model_kwargs={"widths": WIDTHS}, num_classes=10,
                           in_channels=1, dataset="fashion_mnist")


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    return write_source(tmp_path_factory.mktemp("src") / "tiny.pt")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 128).astype(np.int64)


@pytest.fixture(scope="module")
def domains(data):
    return [DomainData("fog", 5, data[0][:32], data[1][:32])]


def config(tmp_path, checkpoint, **overrides):
    values = {"name": "t", "method": "cta", "source_checkpoint": str(checkpoint), "checkpoint_dir": str(tmp_path / "ck"),
              "simclr": {"epochs": 1, "batch_size": 16}, "align": {"epochs": 1, "batch_size": 16},
              "head_hidden": 8, "projection_dim": 8, "mlflow": False, "register_as": None, "device": "cpu",
              "progress": False, "val_batch_size": 16, "num_workers": 2, "method_config": {"steps": 1}}
    values.update(overrides)
    return cta_train_config(values)


def test_config_errors(tmp_path, source_checkpoint, domains):
    with pytest.raises(ValueError, match="method"):
        config(tmp_path, source_checkpoint, method="byol")
    with pytest.raises(ValueError, match="train_cta.simclr"):
        config(tmp_path, source_checkpoint, simclr={"epochs": 0})
    with pytest.raises(ValueError, match="unknown corruption"):
        config(tmp_path, source_checkpoint, val_corruptions=["fog", "nope"])
    with pytest.raises(ValueError, match="no batch"):
        train_cta(config(tmp_path, source_checkpoint, simclr={"batch_size": 512}), use_ray=False,
                  data=(np.zeros((8, 28, 28, 1), np.uint8), np.zeros(8, np.int64)), domains=domains)


def test_validation_images_are_read_before_any_training(tmp_path, source_checkpoint, data, monkeypatch):
    """A benchmark that cannot give the validation images fails before the first stage trains."""
    def fail(*args, **kwargs):
        raise AssertionError("a stage trained before the validation images were checked")

    monkeypatch.setattr("metatta.ssl.training.run_stage", fail)
    cfg = config(tmp_path, source_checkpoint, benchmark_root=str(tmp_path / "no_benchmark"))
    with pytest.raises(FileNotFoundError, match="no_benchmark"):
        train_cta(cfg, use_ray=False, data=data)


def test_a_relative_checkpoint_dir_is_resolved_in_the_driver(tmp_path, source_checkpoint, monkeypatch):
    """Ray Train workers run elsewhere: the stage checkpoints must go where the driver reads them."""
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, source_checkpoint, checkpoint_dir="outputs/rel")
    assert cfg.checkpoint_dir == str(tmp_path / "outputs" / "rel")
    assert cta_train_config(cfg) == cfg  # idempotent


def test_alignment_stage_lowers_its_loss_and_raises_agreement(tmp_path, source_checkpoint, data, domains):
    cfg = config(tmp_path, source_checkpoint, align={"epochs": 4, "batch_size": 16, "lr": 3e-3})
    outcome = train_cta(cfg, use_ray=False, data=data, domains=domains)
    align = outcome.history["align"]
    assert len(outcome.history["simclr"]) == 1 and len(align) == 4
    assert align[-1]["loss"] < align[0]["loss"] and align[-1]["cosine"] > align[0]["cosine"]
    # The classifier is the source model's, untouched; the adapter says what it was trained for.
    net, info = load_network(outcome.adapter_dir, kind="cta")
    source = torch.load(source_checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(net.classifier.weight, source["fc.weight"])
    assert info["source_checkpoint_sha256"] and info["epochs"] == {"simclr": 1, "align": 4}
    assert 0 <= outcome.validation_error <= 100 and 0 <= outcome.unadapted_validation_error <= 100


@pytest.mark.parametrize("align", [{"feature_weight": 1.0}, {"simclr_weight": 1.0}])
def test_alignment_options_train_what_they_say(tmp_path, source_checkpoint, data, domains, align):
    """feature_weight adds the norm-aware term (the projector stays frozen); simclr_weight trains the
    projector on SimCLR views alongside the alignment."""
    cfg = config(tmp_path, source_checkpoint, align={"epochs": 2, "batch_size": 16, "lr": 3e-3, **align})
    outcome = train_cta(cfg, use_ray=False, data=data, domains=domains)
    simclr_net = torch.load(stage_files(cfg)["simclr"], weights_only=True)["model"]
    projector = {k: v for k, v in outcome.network.state_dict().items() if k.startswith("heads.projector")}
    changed = any(not torch.equal(v, simclr_net[k]) for k, v in projector.items())
    epoch = outcome.history["align"][-1]
    assert changed == ("simclr_weight" in align) and ("simclr" in epoch) == ("simclr_weight" in align)
    assert {"infonce", "feature_matching", "norm_ratio", "cosine"} <= set(epoch)
    if "feature_weight" in align:
        assert epoch["loss"] == pytest.approx(epoch["infonce"] + epoch["feature_matching"], rel=1e-5)


def test_alignment_option_errors(tmp_path, source_checkpoint):
    for bad in ({"feature_weight": -1.0}, {"simclr_weight": -0.5}):
        with pytest.raises(ValueError, match="feature_weight and simclr_weight"):
            config(tmp_path, source_checkpoint, align=bad)
    with pytest.raises(ValueError, match="align.augment"):
        config(tmp_path, source_checkpoint, align={"augment": "strong"})


def test_alignment_inputs_follow_the_augment_option(tmp_path, source_checkpoint):
    from metatta.ssl.objectives import stage_inputs

    x = torch.rand(4, 1, 28, 28)
    for augment, simclr_weight, count in (("light", 0.0, 1), ("simclr", 0.0, 1), ("light", 1.0, 3)):
        cfg = config(tmp_path, source_checkpoint, align={"augment": augment, "simclr_weight": simclr_weight})
        inputs = stage_inputs("align", x, torch.zeros(4, dtype=torch.long), cfg, torch.Generator().manual_seed(0))
        assert len(inputs) == count and all(t.shape == x.shape for t in inputs)
    # the same random stream, another augmentation
    light, = stage_inputs("align", x, None, config(tmp_path, source_checkpoint), torch.Generator().manual_seed(0))
    strong, = stage_inputs("align", x, None, config(tmp_path, source_checkpoint, align={"augment": "simclr"}),
                           torch.Generator().manual_seed(0))
    assert not torch.equal(light, strong)


def test_two_worker_ray_train_run(tmp_path, source_checkpoint, data, ray_session):
    """One stage as a Ray Train TorchTrainer with 2 workers (gloo, DDP) on a few steps."""
    cfg = config(tmp_path, source_checkpoint, num_workers=2)
    fit_stage_on_ray(stage_spec(cfg, str(source_checkpoint), data, stage="simclr"), cfg)
    state = load_stage_state(stage_files(cfg)["simclr"])
    (epoch,) = state["history"]
    assert state["epoch"] == 1 and epoch["workers"] == 2.0
    assert np.isfinite(epoch["loss"]) and epoch["samples_per_second"] > 0


class Interrupted(RuntimeError):
    pass


@pytest.mark.parametrize("stage", ["simclr", "align"])
def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path, source_checkpoint, data, domains, stage):
    cfg = config(tmp_path, source_checkpoint, simclr={"epochs": 2, "batch_size": 16},
                 align={"epochs": 2, "batch_size": 16})
    reference = train_cta(dataclasses.replace(cfg, name="whole"), use_ray=False, data=data, domains=domains)

    def interrupt(at_stage, epoch, metrics):
        if at_stage == stage and epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_cta(cfg, use_ray=False, data=data, domains=domains, on_epoch=interrupt)
    files = stage_files(cfg)
    assert load_stage_state(files[stage])["epoch"] == 1
    seen = []
    resumed = train_cta(cfg, resume=True, use_ray=False, data=data, domains=domains,
                        on_epoch=lambda s, e, m: seen.append((s, e)))
    assert seen == ([("simclr", 2), ("align", 1), ("align", 2)] if stage == "simclr" else [("align", 2)])
    for key, value in reference.network.state_dict().items():  # as if it had never stopped
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no stage checkpoint"):
        train_cta(dataclasses.replace(cfg, name="never"), resume=True, use_ray=False, data=data, domains=domains)


def test_registry_round_trip_and_evaluation_inputs(tmp_path, source_checkpoint, data, domains, mlflow_uri):
    cfg = config(tmp_path, source_checkpoint, mlflow=True, register_as="cta_t")
    outcome = train_cta(cfg, use_ray=False, data=data, domains=domains)
    assert outcome.registered_version == "1" and outcome.promoted
    again = train_cta(dataclasses.replace(cfg, name="t2"), use_ray=False, data=data, domains=domains)
    assert again.registered_version == "2" and not again.promoted  # same error: the champion stays
    uri = "models:/cta_t@champion"
    path = tracking.download_adapter(uri, tmp_path / "dl")
    net, info = load_network(path, kind="cta")
    for key, value in outcome.network.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    assert info["validation_error"] == outcome.validation_error
    run = tracking.client().get_run(outcome.run_id)
    assert "simclr/loss" in run.data.metrics and "align/cosine" in run.data.metrics

    experiment = ExperimentConfig(methods=[MethodSpec("source"), MethodSpec("tent")])
    cfg_eval = with_adapter(experiment, uri)
    assert [(s.name, s.adapter) for s in cfg_eval.methods] == [("source", None), ("tent", None), ("cta", uri)]
    spec = cfg_eval.methods[-1]
    context = method_context(spec, cfg_eval, source_checkpoint, torch.device("cpu"), {})
    from metatta.methods import build_method

    method = build_method("cta", build_model("resnet_fmnist", 10, 1, widths=WIDTHS), {"steps": 1}, **context)
    assert method(torch.rand(8, 1, 28, 28)).shape == (8, 10)


def test_an_adapter_built_for_another_source_model_is_refused(tmp_path, source_checkpoint, data, domains):
    outcome = train_cta(config(tmp_path, source_checkpoint), use_ray=False, data=data, domains=domains)
    other = write_source(tmp_path / "other.pt", seed=1)
    spec = MethodSpec("cta", adapter=str(outcome.adapter_dir))
    assert checked_adapter(spec, source_checkpoint, "cta") == outcome.adapter_dir
    with pytest.raises(ValueError, match="was trained for source checkpoint"):
        method_context(spec, ExperimentConfig(methods=[spec]), other, torch.device("cpu"), {})
    with pytest.raises(ValueError, match="not 'ttt'"):
        method_context(MethodSpec("ttt", adapter=str(outcome.adapter_dir)), ExperimentConfig(methods=[spec]),
                       source_checkpoint, torch.device("cpu"), {})
    info = json.loads((outcome.adapter_dir / "adapter.json").read_text())
    assert info["kind"] == "cta" and info["source_model"]["model_kwargs"] == {"widths": WIDTHS}


def test_a_stage_checkpoint_of_another_source_is_refused_on_resume(tmp_path, source_checkpoint, data, domains):
    cfg = config(tmp_path, source_checkpoint, simclr={"epochs": 2, "batch_size": 16})

    def stop(stage, epoch, metrics):
        raise Interrupted

    with pytest.raises(Interrupted):
        train_cta(cfg, use_ray=False, data=data, domains=domains, on_epoch=stop)
    other = write_source(tmp_path / "other.pt", seed=1)
    with pytest.raises(ValueError, match="another source model"):
        train_cta(dataclasses.replace(cfg, source_checkpoint=str(other)), resume=True, use_ray=False, data=data,
                  domains=domains)


# ---- test-time adaptation on real data --------------------------------------------------------
def _fashion_mnist(split: str, n: int):
    from metatta.data.clean import load_clean

    try:
        images, labels = load_clean("fashion_mnist", split)
    except (FileNotFoundError, OSError, RuntimeError) as e:
        pytest.skip(f"needs Fashion-MNIST: {e}")
    return np.asarray(images[:n]), np.asarray(labels[:n])


@pytest.mark.slow
def test_cta_reduces_error_versus_its_unadapted_encoder_on_a_corrupted_stream(tmp_path):
    """A small source model and CTA network trained on 4,000 clean images with the alignment of
    configs/fmnist_c/cta.yaml; a stream of 600 test images with Gaussian noise (std 0.3). CTA's
    online SimCLR updates must lower the error of the aligned encoder they start from (steps 0).

    Measured (2026-12-04): 47.67% at 0 steps, 47.00 at 5, 46.33 at 20: 4 and 8 images of 600, so
    this checks the direction, not a size. With the alignment's NT-Xent term off (simclr_weight 0,
    the earlier default) the steps hurt (45.50 / 46.50 / 46.33), and the test was a strict xfail."""
    from metatta.evaluation import evaluate
    from metatta.methods import build_method
    from metatta.source import train_source

    train = _fashion_mnist("train", 4000)
    source = train_source({"epochs": 2, "num_train_images": 4000, "num_test_images": 500, "feature_stats_images": 100,
                           "output": str(tmp_path / "source.pt"), "progress": False, "device": "cpu"},
                          load_split=lambda dataset, split: train if split == "train" else _fashion_mnist("test", 500))
    shipped = load_config(CTA_CONFIG)["align"]
    align = {key: shipped[key] for key in ("temperature", "feature_weight", "simclr_weight", "augment")}
    cfg = config(tmp_path, source.checkpoint, simclr={"epochs": 3, "batch_size": 128},
                 align={"epochs": 3, "batch_size": 128, **align}, head_hidden=64, projection_dim=32)
    images, labels = _fashion_mnist("test", 1600)
    rng = np.random.default_rng(0)
    noisy = np.clip(images[1000:] / 255.0 + rng.normal(0, 0.3, images[1000:].shape), 0, 1)
    stream_domain = DomainData("gaussian_noise", 5, (noisy * 255).round().astype(np.uint8), labels[1000:])
    outcome = train_cta(cfg, use_ray=False, data=train, domains=[stream_domain])

    from metatta.data.streams import build_stream

    errors = {}
    for steps in (0, 5, 20):
        torch.manual_seed(0)
        method = build_method("cta", copy_net(outcome.network), {"steps": steps, "lr": 1e-4})
        errors[steps] = evaluate(method, build_stream([stream_domain], "continual", 100, seed=0), progress=False).mean_error
    assert errors[5] < errors[0] and errors[20] < errors[0], errors


def copy_net(net):
    import copy

    return copy.deepcopy(net)


def test_digits_are_never_flipped(tmp_path, source_checkpoint, monkeypatch):
    """Issue #24.9: hflip auto resolves from the source model's dataset (a mirrored 2 is no digit);
    with hflip false no augmentation of any stage mirrors an image."""
    from metatta.ssl import training
    from metatta.ssl.objectives import stage_inputs

    x = torch.rand(8, 1, 28, 28)
    no_flip = config(tmp_path, source_checkpoint, crop_padding=0, hflip=False)
    light, _, _, _ = stage_inputs("joint", x, torch.zeros(8, dtype=torch.long), no_flip, torch.Generator().manual_seed(0))
    assert torch.equal(light, x)  # no padding to crop and no flip: the images themselves
    flipped, _, _, _ = stage_inputs("joint", x, torch.zeros(8, dtype=torch.long),
                                    dataclasses.replace(no_flip, hflip=True), torch.Generator().manual_seed(0))
    assert not torch.equal(flipped, x)
    seen = {}

    def stop(cfg, *args):
        seen["hflip"] = cfg.hflip
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "stage_spec", stop)
    digits_source = save_checkpoint(tmp_path / "digits.pt", build_model("resnet_fmnist", 10, 1, widths=WIDTHS),
                                    model_name="resnet_fmnist", model_kwargs={"widths": WIDTHS}, num_classes=10,
                                    in_channels=1, dataset="digits")
    for source, expected in ((digits_source, False), (source_checkpoint, True)):
        with pytest.raises(KeyboardInterrupt):
            train_cta(config(tmp_path, source), use_ray=False, domains=[DomainData("fog", 5, np.zeros((4, 28, 28, 1),
                                                                                                     np.uint8),
                                                                                   np.zeros(4, np.int64))])
        assert seen["hflip"] is expected
