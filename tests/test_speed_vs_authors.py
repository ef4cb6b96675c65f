"""benchmarks/speed_vs_authors.py: the pieces that need no checkout of the authors' code (a stand-in
checkout with their layout), and, when METATTA_PALM_REPO names a checkout of sarthaxxxxx/PALM, their
methods built and stepped through the harness's shims."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torchvision import transforms

from repo_scripts import load_script
from test_methods import TinyBNNet

harness = load_script("benchmarks/speed_vs_authors.py")

# A stand-in for their classification/ tree: the same imports and the same CUDA counter in __init__.
FAKE_BASE = """
import torch
from models.model import ResNetDomainNet126
class TTAMethod(torch.nn.Module):
    def __init__(self, cfg, model, num_classes):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.pointer = torch.tensor([0], dtype=torch.long).cuda()
    def forward(self, x):
        return self.forward_and_adapt(x)
"""
FAKE_METHOD = """
import torch
from methods.base import TTAMethod
from augmentations.transforms_cotta import get_tta_transforms
class {name}(TTAMethod):
    @torch.enable_grad()
    def forward_and_adapt(self, x):
        return self.model(x)
"""


@pytest.fixture
def clean_modules():
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("methods", "augmentations", "models"):
            del sys.modules[name]
    for name in ("methods", "augmentations", "models"):
        if name not in before:
            sys.modules.pop(name, None)


def fake_checkout(root: Path) -> Path:
    methods, augmentations = root / "classification" / "methods", root / "classification" / "augmentations"
    methods.mkdir(parents=True)
    augmentations.mkdir()
    (methods / "base.py").write_text(FAKE_BASE)
    for file, name in (("ours", "OURS"), ("law", "LAW"), ("tent", "Tent"), ("norm", "Norm")):
        (methods / f"{file}.py").write_text(FAKE_METHOD.format(name=name))
    (augmentations / "transforms_cotta.py").write_text("def get_tta_transforms(name):\n    return None\n")
    return root


def test_a_missing_checkout_is_named():
    with pytest.raises(FileNotFoundError, match="--palm-repo: no classification/methods/base.py"):
        harness.import_authors(Path("/nonexistent/PALM"))


def test_their_packages_are_imported_despite_this_folders_methods_module(tmp_path, clean_modules):
    authors = harness.import_authors(fake_checkout(tmp_path))
    assert [cls.__name__ for cls in authors.values()] == ["OURS", "LAW", "Tent", "Norm"]
    run = harness.authors_runner(authors["palm"], "palm", TinyBNNet(), 8, 16)  # .cuda() is the identity here
    assert run(torch.rand(8, 3, 16, 16)).shape == (8, 10)


def test_their_transforms_are_padded_and_cropped_for_the_stream_image_size():
    method = type("M", (), {})()
    method.transforms = transforms.Compose([transforms.Pad(16, padding_mode="edge"), transforms.CenterCrop(32)])
    harness.fit_transforms(method, 28)
    assert method.transforms(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)


def test_rounds_alternate_and_the_summary_gives_errors_and_ratios():
    batches = [(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), "fog-5")]
    calls = []

    def side(name, predicted):
        def build():
            calls.append(name)
            return lambda x: torch.nn.functional.one_hot(torch.full((len(x),), predicted), 2).float()
        return build

    summary = harness.compare("palm", side("metatta", 0), side("authors", 1), batches, rounds=3, seed=0)
    assert calls == ["metatta", "authors", "authors", "metatta", "metatta", "authors"]
    assert summary["error_metatta"] == summary["error_authors"] == 50.0
    assert len(summary["ratios"]) == 3 and summary["ratio_min"] <= summary["ratio_median"] <= summary["ratio_max"]
    protocol = {"command": ["benchmarks/speed_vs_authors.py"], "rounds": 3, "threads": 1, "num_images": 4,
                "corruptions": ["fog"], "batch_size": 4, "checkpoint": "c.pt", "metatta_config": {"precision": "bf16"}}
    text = harness.report([summary], protocol)
    assert "| palm | 50.00 | 50.00 |" in text and "'precision': 'bf16'" in text


def test_metatta_overrides_are_parsed_and_bad_ones_refused():
    parser = harness.argparse.ArgumentParser()
    assert harness.parse_overrides(["precision=bf16", "lr=1e-3"], parser) == {"precision": "bf16", "lr": 1e-3}
    with pytest.raises(SystemExit):
        harness.parse_overrides(["precision"], parser)


@pytest.mark.skipif(not os.environ.get("METATTA_PALM_REPO"), reason="METATTA_PALM_REPO names no checkout of PALM")
@pytest.mark.parametrize("method", harness.METHODS)
def test_the_authors_methods_step_through_the_shims(method, clean_modules):
    authors = harness.import_authors(Path(os.environ["METATTA_PALM_REPO"]))
    run = harness.authors_runner(authors[method], method, TinyBNNet(in_channels=1), 16, 28)
    torch.manual_seed(0)
    assert torch.isfinite(run(torch.rand(16, 1, 28, 28))).all()
