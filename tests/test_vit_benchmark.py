"""benchmarks/vit.py: its rows (ViT settings, MGTTA at the MGG's test config, lr sweep), the report
and target functions on fake Results, and one tiny end to end run (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from metatta.data.benchmark_files import fashion_mnist_c
from metatta.evaluation import Result
from metatta.learned.mgg import MGG, save_mgg
from metatta.models.checkpoint import checkpoint_hash
from metatta.source import train_source
from repo_scripts import ROOT, load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/vit.py")


def fake(method: str, curve_a: list[float], curve_b: list[float] | None = None, ips: float = 100.0) -> Result:
    """A Result over two corruptions a, b whose per-batch errors are the given curves."""
    curve_b = curve_a if curve_b is None else curve_b
    errors = list(curve_a) + list(curve_b)
    domains = {"a-5": sum(curve_a) / len(curve_a), "b-5": sum(curve_b) / len(curve_b)}
    return Result(method=method, domain_errors=domains, mean_error=sum(domains.values()) / 2, ece=1.0,
                  images_per_second=ips, peak_memory_mb=0.0, num_images=64 * len(errors), adapted_parameters=10,
                  error_over_stream=errors, batch_domains=["a-5"] * len(curve_a) + ["b-5"] * len(curve_b),
                  protocol={"setting": "episodic"})


def fake_runs() -> dict[str, list[Result]]:
    flat = [40.0] * 10
    episodic = [
        fake("source", flat),
        fake("tent", [40, 38, 36, 34, 32, 30, 30, 30, 30, 30]),  # mean 33, final 30 (first at batch 6)
        fake("sar", [35.0] * 10),
        fake("mgtta", [36, 31, 29, 29, 29, 29, 29, 29, 29, 29]),  # mean 29.9, reaches 30 early
        fake("tent lr x3", [31.0] * 10),
        fake("tent lr x10", [50.0] * 10),
        fake("mgtta lr x10", [29.0] * 10),
    ]
    continual = [fake("source", flat), fake("tent", [20.0] * 10)]
    return {"episodic": episodic, "continual": continual}


# ---- rows -----------------------------------------------------------------------------------------
def test_rows_use_the_vit_settings_files_and_skip_mgtta_without_an_mgg(bench):
    rows, skipped = bench.method_rows(bench.METHODS, None, lr_sweep=True, mgg_under=["tent"])
    by_label = {r["label"]: r for r in rows}
    assert "mgtta" in skipped and "tent+mgg" in skipped and "mgtta" not in by_label
    for name in ("tent", "sar", "eata", "deyo", "cotta"):
        assert by_label[name]["settings"] == str(ROOT / "configs" / "methods" / f"{name}_vit.yaml")
    assert all("settings" not in by_label[n] for n in ("source", "palm", "law"))  # no published ViT setting
    # the sweep: x3 and x10 of each method's ViT lr (tent: TentConfig's 1e-3, eata/deyo: their files' 1e-3)
    for name in ("tent", "eata", "deyo"):
        assert by_label[f"{name} lr x3"]["config"]["lr"] == pytest.approx(3e-3)
        assert by_label[f"{name} lr x10"]["config"]["lr"] == pytest.approx(1e-2)
        assert by_label[f"{name} lr x10"]["settings"] == by_label[name]["settings"]
    assert "sar lr x3" not in by_label


def test_mgtta_rows_take_the_mgg_test_config(bench, tmp_path):
    train_config = {"test_lr": 2e-3, "loss": "entropy+stats", "stats_lambda": 0.4}
    adapter = save_mgg(MGG(), tmp_path / "mgg", extra={"train_config": train_config})
    rows, skipped = bench.method_rows(["tent", "mgtta"], str(adapter), lr_sweep=True, mgg_under=["tent"])
    by_label = {r["label"]: r for r in rows}
    assert not skipped
    assert by_label["mgtta"]["adapter"] == str(adapter)
    assert by_label["mgtta"]["config"]["lr"] == 2e-3 and by_label["mgtta"]["config"]["loss"] == "entropy+stats"
    assert by_label["mgtta lr x10"]["config"]["lr"] == pytest.approx(2e-2)
    under = by_label["tent+mgg"]
    assert under["config"] == {"optimizer": "mgg", "lr": 2e-3} and under["adapter"] == str(adapter)
    assert under["settings"].endswith("tent_vit.yaml")
    rows, _ = bench.method_rows(["source"], str(adapter), lr_sweep=False, mgg_under=["eata"])  # eata not a row
    assert rows[1]["label"] == "eata+mgg" and rows[1]["settings"].endswith("eata_vit.yaml")


# ---- report and targets ---------------------------------------------------------------------------
def test_targets_on_fake_results(bench):
    found = bench.targets(fake_runs(), window=1)
    spread = found["spread (episodic)"]
    assert spread["best"] == "mgtta" and spread["value"] == pytest.approx(40 - 29.9) and spread["met"]
    gap = found["mgtta vs best gradient baseline (episodic)"]
    assert gap["best"] == "tent" and gap["value"] == pytest.approx(33.0 - 29.9) and gap["met"]
    reach = found["batches to Tent's final error (episodic)"]
    assert reach["tent_final_error"] == 30.0 and reach["threshold"] == 6 and reach["value"] == 3 and reach["met"]
    assert found["tent lr x10 vs x1 (episodic)"]["value"] == pytest.approx(50 - 33) and not \
        found["tent lr x10 vs x1 (episodic)"]["met"]
    assert found["mgtta lr x10 vs x1 (episodic)"]["met"]
    assert found["spread (continual)"]["value"] == 20.0
    assert "mgtta vs best gradient baseline (continual)" not in found


def test_a_missing_mgtta_is_reported_as_not_measured(bench):
    runs = {"episodic": [r for r in fake_runs()["episodic"] if not r.method.startswith("mgtta")]}
    found = bench.targets(runs)
    assert found["mgtta vs best gradient baseline (episodic)"]["met"] is None
    assert "not measured" in "\n".join(bench.target_lines(found))


def test_tables_and_report_files(bench, tmp_path):
    runs = fake_runs()
    curve = bench.curve_table(bench.main_results(runs["episodic"]), window=1)
    assert curve.splitlines()[0] == "| method | batch 1 | batch 2 | batch 4 | batch 8 | batch 10 |"
    assert "| tent | 40.0 | 38.0 | 34.0 | 30.0 | 30.0 |" in curve
    assert bench.curve_at([10.0, 20.0, 30.0], 3, window=2) == 25.0 and bench.curve_at([10.0, 20.0], 1) == 10.0
    summary = bench.summary_table(runs)
    assert summary.splitlines()[0].startswith("| method | error episodic | img/s episodic | error continual |")
    assert "lr x" not in summary and "**29.9**" in summary
    assert "| tent | 33.0 | 31.0 | 50.0 |" in bench.sweep_table(runs["episodic"])
    text = bench.report(runs, [], ["benchmarks/vit.py"], {}, "vit_fake", tmp_path, 640, 64)
    assert "Fashion-MNIST-C, 2 corruptions at severity 5, batch 64, 640 images" in text
    assert "Targets (issue 20):" in text and (tmp_path / "vit_fake.png").stat().st_size > 5_000
    record = json.loads((tmp_path / "vit_fake.json").read_text())
    assert record["error_curve"]["episodic"]["tent"][0] == 40.0 and record["targets"]
    assert bench.result_stem("vit", 1000) == "vit" and bench.result_stem("vit", 10000) == "vit_n10000"


# ---- end to end -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_end_to_end(bench, tmp_path):
    """A tiny ViT source trained here, 2 corruptions x 64 images, every row, the sweep, MGTTA and tent+mgg."""
    checkpoint = train_source({"model": "vit_tiny_fmnist", "model_kwargs": {"patch_size": 7, "embed_dim": 16,
                                                                           "depth": 2, "num_heads": 2},
                               "dataset": "fashion_mnist", "num_classes": 10, "in_channels": 1, "epochs": 1,
                               "batch_size": 128, "optimizer": "adamw", "lr": 2e-3, "num_train_images": 2000,
                               "num_test_images": 200, "feature_stats_images": 200, "device": "cpu",
                               "output": str(tmp_path / "vit.pt")}).checkpoint
    root = fashion_mnist_c(root=tmp_path / "fmnist_c", num_images=64, corruptions=["gaussian_noise", "contrast"])
    adapter = save_mgg(MGG(), tmp_path / "mgg", extra={
        "source_checkpoint": str(checkpoint), "source_checkpoint_sha256": checkpoint_hash(checkpoint),
        "train_config": {"test_lr": 1e-3, "loss": "auto"}})
    runs = bench.main(["--num-images", "64", "--batch-size", "32", "--source-checkpoint", str(checkpoint),
                       "--benchmark-root", str(root), "--corruptions", "gaussian_noise", "contrast",
                       "--mgg", str(adapter), "--mgg-under", "tent", "--lr-sweep", "--fisher-images", "64",
                       "--device", "cpu", "--name", "vit_tiny", "--out", str(tmp_path / "out")])
    labels = [r.method for r in runs["episodic"]]
    assert labels[:9] == ["source", "tent", "sar", "eata", "deyo", "cotta", "palm", "law", "mgtta"]
    assert "tent+mgg" in labels and "mgtta lr x10" in labels and set(runs) == {"episodic", "continual"}
    for r in runs["episodic"]:
        assert list(r.domain_errors) == ["gaussian_noise-5", "contrast-5"] and r.num_images == 128
    mgtta = next(r for r in runs["episodic"] if r.method == "mgtta")
    assert mgtta.protocol["method_config"]["loss"] == "auto" and mgtta.adapted_parameters > 0
    record = json.loads((tmp_path / "out" / "vit_tiny_n64.json").read_text())
    assert set(record["error_curve"]) == {"episodic", "continual"} and record["targets"]
    text = (tmp_path / "out" / "vit_tiny_n64.md").read_text()
    assert "Targets (issue 20):" in text and "| mgtta |" in text


def test_vit_optimizer_rows_step_the_same_parameters_with_the_named_optimizers():
    ablation = load_script("benchmarks/vit_optimizer.py")
    rows = ablation.optimizer_rows(1e-2)
    assert list(rows)[0] == "MGG (lr 0.01)" and rows["MGG (lr 0.01)"] == (1e-2, None)
    param = [torch.nn.Parameter(torch.zeros(3))]
    for label, (lr, factory) in list(rows.items())[1:]:
        optimizer = factory(param)
        kind = torch.optim.SGD if label.startswith("SGD") else torch.optim.Adam
        assert isinstance(optimizer, kind) and optimizer.param_groups[0]["lr"] == lr
        assert kind is torch.optim.Adam or optimizer.param_groups[0]["momentum"] == ablation.MOMENTUM
