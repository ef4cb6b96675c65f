"""benchmarks/fidelity_methods.py: the pieces that need no reference checkout (the model split,
the source batches, the config comparison, the summary); one small end-to-end comparison runs
when METATTA_REFERENCE_REPO names a checkout of mariodoebler/test-time-adaptation."""
from __future__ import annotations

import copy
import importlib
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from metatta.data.benchmark_files import read_cifar_c
from metatta.methods import build_method
from metatta.methods.augment import CoTTAAugment
from metatta.methods.roid import roid_augment
from metatta.models import build_model
from repo_scripts import load_script

fidelity = load_script("benchmarks/fidelity_methods.py")


def cfg(**sections):
    return types.SimpleNamespace(**{k: types.SimpleNamespace(**v) for k, v in sections.items()})


def test_split_up_model_gives_the_classifier_input_and_shares_weights():
    model = build_model("resnet_fmnist", 10, 1).eval()
    features, classifier = fidelity.split_up_model(model)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(classifier(features(x)), model(x), atol=1e-6)
    assert classifier is model.fc and features.model is model
    with pytest.raises(ValueError, match="forward_features"):
        fidelity.split_up_model(torch.nn.Linear(2, 2))


def test_source_batches_carry_their_batch_size():
    batches = fidelity.SourceBatches([(torch.zeros(4, 1, 2, 2), torch.zeros(4)), (torch.zeros(2, 1, 2, 2), torch.zeros(2))])
    assert batches.batch_size == 4 and len(list(iter(batches))) == 2


def test_config_mismatches_name_each_differing_field():
    ours = build_method("tent", build_model("resnet_fmnist", 10, 1), {}).config
    theirs = cfg(OPTIM={"METHOD": "Adam", "LR": 1e-3, "WD": 0.0, "BETA": 0.9}, MODEL={"EPISODIC": False})
    assert fidelity.config_mismatches("tent", ours, theirs) == []
    theirs.OPTIM.LR, theirs.OPTIM.METHOD = 2e-3, "SGD"
    found = fidelity.config_mismatches("tent", ours, theirs)
    assert any("optimizer" in m for m in found) and any("OPTIM.LR" in m for m in found)
    assert fidelity.config_mismatches("tent", ours, theirs, adapts=False) == []  # e.g. Source, BN, LAME


def eata_cfg(fisher_alpha=1.0, num_samples=2000, method="Adam"):
    return cfg(OPTIM={"METHOD": method, "LR": 1e-3, "WD": 0.0, "BETA": 0.9, "MOMENTUM": 0.9},
               MODEL={"EPISODIC": False}, EATA={"MARGIN_E0": 0.4, "D_MARGIN": 0.4, "FISHER_ALPHA": fisher_alpha},
               SOURCE={"NUM_SAMPLES": num_samples}, SAR={"RESET_CONSTANT_EM": 0.2})


def test_eata_and_eta_configs_map_onto_their_cfg_including_whether_the_fisher_term_is_on():
    model = build_model("resnet_fmnist", 10, 1)
    eata = build_method("eata", model, fidelity.METHODS["eata"].ours_config).config
    assert fidelity.config_mismatches("eata", eata, eata_cfg()) == []
    # their ETA is EATA with FISHER_ALPHA 0; ours is use_fisher false (fisher_alpha then unused)
    eta = build_method("eta", model, fidelity.METHODS["eta"].ours_config).config
    assert fidelity.config_mismatches("eta", eta, eata_cfg(fisher_alpha=0.0)) == []
    assert any("use_fisher" in m for m in fidelity.config_mismatches("eta", eta, eata_cfg()))
    assert any("use_fisher" in m for m in fidelity.config_mismatches("eata", eata, eata_cfg(num_samples=-1)))
    # RDumb: ETA with a reset schedule (their MODEL.RESET_AFTER_NUM_UPDATES)
    rdumb = build_method("eta", model, fidelity.METHODS["rdumb"].ours_config).config
    theirs = eata_cfg(fisher_alpha=0.0)
    theirs.MODEL.RESET_AFTER_NUM_UPDATES = 1000
    assert fidelity.config_mismatches("rdumb", rdumb, theirs) == []
    theirs.MODEL.RESET_AFTER_NUM_UPDATES = 0
    assert any("reset_every" in m for m in fidelity.config_mismatches("rdumb", rdumb, theirs))
    # metatta's own EATA defaults (the paper's SGD, lr 0.005) are not their cfg's
    found = fidelity.config_mismatches("eata", build_method("eata", model, {}).config, eata_cfg())
    assert any("optimizer" in m for m in found) and any("OPTIM.LR" in m for m in found)


def test_sar_is_checked_against_the_sgd_their_code_builds_and_its_constants():
    model = build_model("resnet_fmnist", 10, 1)
    pair = fidelity.METHODS["sar"]
    sar = build_method("sar", model, pair.ours_config).config
    # their cfg says Adam, their SAR builds SAM around SGD regardless
    assert fidelity.config_mismatches("sar", sar, eata_cfg(), their_optimizer=pair.their_optimizer) == []
    assert any("optimizer" in m for m in fidelity.config_mismatches("sar", sar, eata_cfg()))
    # constants of their code: rho 0.05, the EMA cleared by their reset()
    authors = build_method("sar", model, {**pair.ours_config, "clear_ema_on_recovery": False, "rho": 0.1}).config
    found = fidelity.config_mismatches("sar", authors, eata_cfg(), their_optimizer="sgd")
    assert any(m.startswith("clear_ema_on_recovery") for m in found) and any(m.startswith("rho") for m in found)


def test_adapted_parameter_names_follow_the_model_order():
    model = build_model("resnet_fmnist", 10, 1)
    named = dict(model.named_parameters())
    picked = [named["fc.weight"], named["stages.0.0.bn1.bias"]]
    assert fidelity.adapted_parameter_names(model, picked) == ["stages.0.0.bn1.bias", "fc.weight"]
    # metatta's SAR default leaves out the top stage; the harness's setting adapts every BN layer
    # (their 'layer4' rule matches nothing on this ResNet)
    default = build_method("sar", build_model("resnet_fmnist", 10, 1), {})
    harness = build_method("sar", build_model("resnet_fmnist", 10, 1), fidelity.METHODS["sar"].ours_config)
    names = {k: fidelity.adapted_parameter_names(m.model, [p for g in m.optimizer.param_groups for p in g["params"]])
             for k, m in (("default", default), ("harness", harness))}
    assert not any(n.startswith("stages.2") for n in names["default"])
    every_bn = [f"{n}.{w}" for n, m in harness.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                for w in ("weight", "bias")]
    assert names["harness"] == every_bn and any(n.startswith("stages.2") for n in every_bn)


def test_resets_inside_forward_are_counted_and_the_harness_own_are_not():
    class Recovering(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                self.reset()  # like SAR's recovery
            return x

        def reset(self):
            pass

    method = Recovering()
    counter = fidelity.count_resets_in_forward(method)
    method(torch.ones(1))
    method(-torch.ones(1))
    method.reset()  # the harness's reset at a corruption boundary
    method(torch.ones(1))
    assert counter["count"] == 2


def test_ours_set_parses_yaml_values_and_refuses_a_missing_value():
    assert fidelity.parse_assignments(["clear_ema_on_recovery=false", "lr=0.001", "excluded_modules=[]"]) == {
        "clear_ema_on_recovery": False, "lr": 1e-3, "excluded_modules": []}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        fidelity.parse_assignments(["lr"])


def test_summary_reports_means_ranges_and_the_largest_difference():
    runs = {"ours": [{"a": 10.0, "b": 20.0}, {"a": 12.0, "b": 20.0}],
            "theirs": [{"a": 11.0, "b": 23.0}, {"a": 11.0, "b": 25.0}]}
    s = fidelity.summarize(runs)
    a, b = s["rows"]
    assert a["ours"] == 11.0 and a["ours_range"] == (10.0, 12.0) and a["difference"] == 0.0
    assert b["theirs"] == 24.0 and s["max_abs_difference"] == 4.0
    assert s["mean"] == {"ours": 15.5, "theirs": 17.5}


REFERENCE = os.environ.get("METATTA_REFERENCE_REPO")


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE, reason="set METATTA_REFERENCE_REPO to a checkout of mariodoebler/test-time-adaptation")
@pytest.mark.parametrize("method", ["tent", "eata", "sar", "cotta", "bn_ema"])
def test_method_agrees_with_the_reference_on_a_small_stream(method):
    pytest.importorskip("yacs")
    conf = fidelity.load_reference(Path(REFERENCE), fidelity.reference_source_loader)
    source = fidelity.load_source_model(fidelity.cache_root() / "models" / "resnet_fmnist.pt")
    domains = read_cifar_c(fidelity.cache_root() / "fashion_mnist_c-n10000-s0-v2", ["fog"], [5], num_images=100)
    run = fidelity.run_pair(method, "continual", 50, "shared", 0, conf=conf, checkout=Path(REFERENCE),
                            source=copy.deepcopy(source), domains=domains, warmup_samples=0, channels_last=False)
    assert run["config_mismatches"] == []
    assert run["errors"]["ours"] == run["errors"]["theirs"]
    assert run["predictions_differing"] == {"fog-5": 0}


@pytest.mark.skipif(not REFERENCE, reason="set METATTA_REFERENCE_REPO to a checkout of mariodoebler/test-time-adaptation")
def test_our_augmentations_draw_what_theirs_draw_for_a_seed():
    """CoTTA's augmentation (RoTTA, RMT, SANTA) and ROID's: from the same seed, metatta's and the
    reference's transforms give the same images (float rounding apart)."""
    fidelity.load_reference(Path(REFERENCE), fidelity.reference_source_loader)
    cotta = importlib.import_module("augmentations.transforms_cotta")
    x = torch.rand(8, 1, 28, 28)
    pairs = [(cotta.get_tta_transforms((28, 28)), CoTTAAugment()),
             (cotta.get_tta_transforms((28, 28), padding_mode="reflect", cotta_augs=False), roid_augment)]
    for theirs, ours in pairs:
        for seed in range(5):
            torch.manual_seed(seed)
            np.random.seed(seed)
            a = theirs(x)
            torch.manual_seed(seed)
            np.random.seed(seed)
            assert torch.allclose(a, ours(x), atol=1e-5)
