"""Meta-training options beyond the paper (issue #9): the learned step scale, long unrolls
with the outer loss over all steps or the last, the supervised outer loss and its held-out
set from the clean training split, the non-finite guards, and config validation."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from metatta.adaptation_speed import batches_to_reach, batches_to_within, error_curve
from metatta.data.benchmark_files import image_seeds
from metatta.evaluation import Result
from metatta.learned.heldout import build_heldout_train_set, corrupt_uint8
from metatta.learned.mgg import MGG, load_mgg, save_mgg
from metatta.learned.optimizer import MGGOptimizer
from metatta.learned.unroll import Trajectory, unroll
from metatta.learned.meta_training import average, guarded_step, mgg_train_config

from test_learned import random_mgg, tiny_batches, tiny_model
from fake_data import serve_train_split_only

LABELS = torch.tensor([0, 1, 2, 3])


def labelled(batches):
    return [(x, LABELS) for x in batches]


# ---- the learned step scale -------------------------------------------------------------------
def test_learned_step_scale_is_off_by_default_and_saved_with_the_mgg(tmp_path):
    assert MGG().log_step_scale is None and MGG().step_scale() == 1.0
    assert "log_step_scale" not in MGG().state_dict()  # the paper's MGG: weights unchanged
    mgg = MGG(learned_step_size=True, init_log_step_scale=math.log(3.0))
    assert mgg.step_scale_value() == pytest.approx(3.0) == float(mgg.step_scale().detach())
    loaded = load_mgg(save_mgg(mgg, tmp_path / "a"))
    assert loaded.learned_step_size and loaded.hparams()["learned_step_size"]
    assert torch.equal(loaded.log_step_scale, mgg.log_step_scale)
    assert not load_mgg(save_mgg(MGG(), tmp_path / "b")).learned_step_size
    with pytest.raises(ValueError, match="init_log_step_scale"):
        MGG(learned_step_size=True, init_log_step_scale=float("inf"))


def test_optimizer_steps_by_the_learned_scale():
    plain = random_mgg()
    scaled = MGG(learned_step_size=True, init_log_step_scale=math.log(4.0))
    scaled.load_state_dict({**plain.state_dict(), "log_step_scale": scaled.log_step_scale.detach()})
    moves = []
    for mgg in (plain, scaled):
        p = torch.nn.Parameter(torch.ones(5))
        opt = MGGOptimizer([p], mgg, lr=0.01)
        p.grad = torch.linspace(-1, 1, 5)
        opt.step()
        moves.append(p.detach() - 1)
    torch.testing.assert_close(moves[1], 4 * moves[0])
    assert moves[0].abs().sum() > 0

    from metatta.methods.base import build_method

    method = build_method("mgtta", tiny_model(), {"lr": 0.01}, mgg=scaled)  # the test-time method applies it too
    assert method.optimizer.mgg.step_scale_value() == pytest.approx(4.0)


def test_learned_step_scale_gets_a_meta_gradient_and_moves():
    torch.manual_seed(0)
    mgg = MGG(learned_step_size=True)
    model = tiny_model()
    result = unroll(mgg, Trajectory(copy.deepcopy(model)), tiny_batches(3), K=2, inner_lr=0.3)
    assert result.grads["log_step_scale"].abs() > 0
    assert result.metrics["step_scale"] == pytest.approx(1.0)
    opt = torch.optim.Adam(mgg.parameters(), lr=0.05)
    for seed in range(5):
        out = unroll(mgg, Trajectory(copy.deepcopy(model)), tiny_batches(3, seed=seed), K=2, inner_lr=0.3)
        for n, p in mgg.named_parameters():
            p.grad = out.grads[n]
        opt.step()
    assert abs(mgg.log_step_scale.item()) > 0.1  # 5 Adam steps of 0.05 in a consistent direction


# ---- long unrolls: meta-gradient against finite differences -----------------------------------
def replaying(mgg: MGG, recorded: list) -> MGG:
    """A copy of `mgg` that feeds itself the recorded gradients instead of the ones it is given.

    The unroll treats gradient features as data (stop-gradient); replaying them makes the
    meta-loss a function of the MGG's weights alone, whose finite differences must then equal
    the unroll's meta-gradient."""
    probe = copy.deepcopy(mgg)
    calls = iter(recorded)
    probe.directions = lambda grads, states: MGG.directions(probe, next(calls), states)
    return probe


def recording(mgg: MGG) -> tuple[MGG, list]:
    recorded = []
    spy = copy.deepcopy(mgg)

    def directions(grads, states):
        recorded.append([g.clone() for g in grads])
        return MGG.directions(spy, grads, states)

    spy.directions = directions
    return spy, recorded


def central_difference(meta_loss, mgg: MGG, direction: dict[str, torch.Tensor], h: float = 1e-6) -> float:
    """(f(w + h u) - f(w - h u)) / 2h for the MGG's weights w and a direction u (name -> tensor)."""
    values = []
    for sign in (1, -1):
        probe = copy.deepcopy(mgg)
        with torch.no_grad():
            for name, p in probe.named_parameters():
                if name in direction:
                    p.add_(sign * h * direction[name])
        values.append(meta_loss(probe))
    return (values[0] - values[1]) / (2 * h)


@pytest.mark.parametrize("outer_loss, over, reduction, per_tensor", [
    ("lookahead", "all", "mean", True), ("lookahead", "last", "mean", False), ("supervised", "all", "sum", False),
])
def test_k8_meta_gradient_matches_central_finite_differences(outer_loss, over, reduction, per_tensor):
    """float64, tiny model. One random direction per weight tensor for the paper's outer loss
    (every tensor's gradient checked), one joint direction over all weights for the others."""
    K, inner_lr = 8, 0.3
    model = tiny_model(dtype=torch.float64)
    mgg = random_mgg(dtype=torch.float64, learned_step_size=True)
    batches = labelled(tiny_batches(K + 1, dtype=torch.float64))
    options = dict(K=K, inner_lr=inner_lr, outer_loss=outer_loss, outer_loss_over=over, reduction=reduction)
    spy, recorded = recording(mgg)
    result = unroll(spy, Trajectory(copy.deepcopy(model), backend="func"), batches, **options)
    assert len(recorded) == K and not result.skipped
    assert result.grads["log_step_scale"].abs() > 1e-8

    def meta_loss(weights: MGG) -> float:
        return unroll(replaying(weights, recorded), Trajectory(copy.deepcopy(model), backend="func"),
                      batches, **options).meta_loss

    assert meta_loss(mgg) == pytest.approx(result.meta_loss, rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    u = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in mgg.named_parameters()}
    groups = [[n] for n in u] if per_tensor else [list(u)]
    for names in groups:
        fd = central_difference(meta_loss, mgg, {n: u[n] for n in names})
        analytic = sum((result.grads[n] * u[n]).sum().item() for n in names)
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10), names
        assert abs(analytic) > 1e-8, names


def test_outer_loss_options_combine_the_steps_as_documented():
    model, mgg, batches = tiny_model(), random_mgg(), labelled(tiny_batches(4))
    runs = {key: unroll(mgg, Trajectory(copy.deepcopy(model)), batches, K=3, inner_lr=0.3, **kw)
            for key, kw in {"mean": {}, "sum": {"reduction": "sum"}, "last": {"outer_loss_over": "last"},
                            "sup": {"outer_loss": "supervised"}}.items()}
    assert runs["sum"].meta_loss == pytest.approx(3 * runs["mean"].meta_loss, rel=1e-6)
    assert runs["last"].meta_loss == pytest.approx(runs["mean"].metrics["outer_loss_last"], rel=1e-6)
    # supervised: the same trajectory (inner steps see the unsupervised gradient), another outer loss
    assert runs["sup"].metrics["tta_loss_last"] == pytest.approx(runs["mean"].metrics["tta_loss_last"], rel=1e-6)
    assert runs["sup"].meta_loss != pytest.approx(runs["mean"].meta_loss, rel=1e-3)
    with pytest.raises(ValueError, match="needs labelled batches"):
        unroll(mgg, Trajectory(copy.deepcopy(model)), tiny_batches(2), outer_loss="supervised")
    for option, value in (("outer_loss", "ce"), ("outer_loss_over", "first"), ("reduction", "max")):
        with pytest.raises(ValueError, match=option):
            unroll(mgg, Trajectory(copy.deepcopy(model)), tiny_batches(2), **{option: value})


# ---- non-finite guards ----------------------------------------------------------------------------
def nan_on_call(mgg: MGG, bad_call: int) -> MGG:
    """A copy of `mgg` whose `bad_call`-th directions (0-based) are NaN."""
    probe = copy.deepcopy(mgg)
    count = iter(range(10**6))

    def directions(grads, states):
        d, s = MGG.directions(probe, grads, states)
        return ([torch.full_like(x, float("nan")) for x in d] if next(count) == bad_call else d), s

    probe.directions = directions
    return probe


def test_a_non_finite_inner_update_is_skipped_and_the_unroll_goes_on():
    model, mgg, batches = tiny_model(), random_mgg(), tiny_batches(4)
    traj = Trajectory(copy.deepcopy(model))
    result = unroll(nan_on_call(mgg, 1), traj, batches, K=3, inner_lr=0.3)
    assert result.metrics["skipped_inner_updates"] == 1 and not result.skipped
    assert all(torch.isfinite(g).all() for g in result.grads.values())
    assert sum(g.abs().sum() for g in result.grads.values()) > 0  # steps 1 and 3 still train the MGG
    assert all(torch.isfinite(t).all() for t in traj.theta) and traj.primed

    # every update non-finite (an infinite step scale): params stay at the source, nothing to learn
    huge = MGG(learned_step_size=True, init_log_step_scale=1000.0)
    traj = Trajectory(copy.deepcopy(model))
    result = unroll(huge, traj, batches, K=3, inner_lr=0.3)
    assert result.metrics["skipped_inner_updates"] == 3
    assert all(torch.equal(t, s) for t, s in zip(traj.theta, traj.source_theta))


def test_a_non_finite_truncation_is_skipped_and_restarts_the_trajectory():
    model, mgg = tiny_model(), random_mgg()
    batches = tiny_batches(3)
    batches[2] = batches[2].clone()
    batches[2][0, 0, 0, 0] = float("nan")  # the outer loss of step 2 is NaN
    traj = Trajectory(copy.deepcopy(model))
    result = unroll(mgg, traj, batches, K=2, inner_lr=0.3)
    assert result.skipped and result.metrics["skipped_unroll"] == 1 and result.metrics["trajectory_restarted"] == 1
    assert all(torch.equal(g, torch.zeros_like(g)) for g in result.grads.values())
    assert not traj.primed and all(torch.equal(t, s) for t, s in zip(traj.theta, traj.source_theta))


def test_the_learner_averages_finite_unrolls_only_and_undoes_non_finite_steps():
    ok = {"grads": {"w": torch.ones(2)}, "metrics": {"meta_loss": 1.0, "skipped_inner_updates": 2.0}, "skipped": False}
    bad = {"grads": {"w": torch.zeros(2)}, "metrics": {"meta_loss": float("nan"), "skipped_inner_updates": 1.0},
           "skipped": True}
    grads, metrics = average([ok, bad])
    assert torch.equal(grads["w"], torch.ones(2)) and metrics["meta_loss"] == 1.0
    assert metrics["skipped_unrolls"] == 1 and metrics["skipped_inner_updates"] == 3
    assert average([bad])[0] is None

    mgg = random_mgg()
    opt = torch.optim.Adam(mgg.parameters(), lr=0.1)
    before = copy.deepcopy(mgg.state_dict())
    nan_grads = {n: torch.full_like(p, float("nan")) for n, p in mgg.named_parameters()}
    assert guarded_step(mgg, opt, nan_grads, 1.0)["skipped_meta_step"] == 1
    assert guarded_step(mgg, opt, None, 1.0)["skipped_meta_step"] == 1
    assert all(torch.equal(v, before[k]) for k, v in mgg.state_dict().items()) and not opt.state
    grads = {n: torch.ones_like(p) for n, p in mgg.named_parameters()}
    assert guarded_step(mgg, opt, grads, 1.0)["skipped_meta_step"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in mgg.state_dict().items())


# ---- the held-out set from the clean training split -------------------------------------------
@pytest.fixture
def train_split_only(monkeypatch):
    """Clean Fashion-MNIST whose test split cannot be read; returns the list of splits asked for."""
    return serve_train_split_only(monkeypatch, 300)


def test_heldout_set_is_built_from_the_training_split_and_records_its_provenance(train_split_only):
    images, labels, asked = train_split_only
    held = build_heldout_train_set(["speckle_noise", "saturate"], 5, 20, seed=3)
    assert asked == ["train"]
    prov = held.provenance
    assert (prov["dataset"], prov["split"], prov["severity"], prov["seed"]) == ("fashion_mnist", "train", 5, 3)
    assert prov["num_clean_images"] == 300 and list(prov["corruptions"]) == ["speckle_noise", "saturate"]
    blocks = [np.array(v) for v in prov["corruptions"].values()]
    assert all(len(b) == 20 and b.min() >= 0 and b.max() < 300 for b in blocks)
    assert not set(blocks[0]) & set(blocks[1])  # the corruptions share no clean image
    for domain, idx in zip(held.domains, blocks):  # every row is that clean training image, corrupted
        seeds = image_seeds(3, domain.corruption, 5, 300)[idx]
        assert np.array_equal(domain.images, corrupt_uint8(images[idx], domain.corruption, 5, seeds))
        assert np.array_equal(domain.labels, labels[idx]) and domain.severity == 5
    assert not np.array_equal(held.domains[0].images, images[blocks[0]])
    with pytest.raises(ValueError, match="benchmark corruptions"):
        build_heldout_train_set(["fog"], 5, 4)
    with pytest.raises(ValueError, match="need 800 clean images"):
        build_heldout_train_set(["speckle_noise", "saturate"], 5, 400)


# ---- config validation ------------------------------------------------------------------------------
BASE = dict(source_checkpoint="unused.pt", corruptions=["speckle_noise", "gaussian_blur"], train_images=16,
            batch_size=2, num_actors=2, mlflow=False, register_as=None)


@pytest.mark.parametrize("override, field", [
    ({"outer_loss": "ce"}, "train_mgg.outer_loss"),
    ({"outer_loss_over": "first"}, "train_mgg.outer_loss_over"),
    ({"outer_reduction": "max"}, "train_mgg.outer_reduction"),
    ({"train_data": "test"}, "train_mgg.train_data"),
    ({"backend": "jax"}, "train_mgg.backend"),
    ({"inner_lr": 0.0}, "train_mgg.inner_lr"),
    ({"init_log_step_scale": 1.0}, "train_mgg.learned_step_size"),
    ({"learned_step_size": True, "init_log_step_scale": float("nan")}, "train_mgg.init_log_step_scale"),
    ({"outer_loss": "supervised"}, "train_mgg.train_data"),
    ({"unroll_steps": 2}, "train_mgg.unroll_steps"),  # 4 images per actor and corruption: 2 batches, not 3
    ({"learned_step_size": "yes"}, "train_mgg.learned_step_size"),
    ({"inner_lr": 1e-3, "inner_lr_max": 1e-4}, "train_mgg.inner_lr_max"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        mgg_train_config({**BASE, **override})


def test_paper_config_pins_todays_defaults():
    from pathlib import Path

    from metatta.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "fmnist_c"
    paper = mgg_train_config(load_config(root / "mgg_paper.yaml"))
    default = mgg_train_config(load_config(root / "mgg.yaml"))
    assert (paper.unroll_steps, paper.learned_step_size, paper.outer_loss, paper.train_data) == \
        (1, False, "lookahead", "benchmark")
    assert (paper.inner_lr, paper.test_lr, paper.train_images, paper.batch_size, paper.epochs) == \
        (1e-4, 1e-3, 128, 2, 40)
    assert paper.name != default.name  # the default is no longer the paper: see the next test
    for variant in ("mgg_learned_step", "mgg_k16", "mgg_supervised"):
        mgg_train_config(load_config(root / f"{variant}.yaml"))


def test_default_config_is_the_variant_the_held_out_comparison_chose():
    """configs/fmnist_c/mgg.yaml is the best variant of benchmarks/results/mgg_heldout.json (lowest mean
    held-out error), field for field, up to where the benchmark put its runs and its seed."""
    import json
    from pathlib import Path

    from metatta.config import load_config
    from repo_scripts import load_script

    repo = Path(__file__).resolve().parents[1]
    record = json.loads((repo / "benchmarks" / "results" / "mgg_heldout.json").read_text())
    best = load_script("benchmarks/mgg_heldout.py").best_variant(record["variants"])
    assert best == record["best"]
    # through today's config class: options added after the measurement take their defaults,
    # which keep the behaviour it was measured with
    measured = vars(mgg_train_config(next(r["config"] for r in record["variants"] if r["variant"] == best)))
    default = vars(mgg_train_config(load_config(repo / "configs" / "fmnist_c" / "mgg.yaml")))
    ignored = {"name", "checkpoint_dir", "register_as", "mlflow", "seed"}
    assert {k: v for k, v in default.items() if k not in ignored} == \
        {k: v for k, v in measured.items() if k not in ignored}


# ---- the benchmark's batches-to-final and lr-sweep helpers ----------------------------------------
def test_batches_to_within_of_the_error_curve():
    errors = [30.0, 20.0, 10.0, 10.0, 10.0, 40.0, 20.0, 10.0, 10.0, 10.0]  # two domains of 5 batches
    result = Result.__new__(Result)
    result.error_over_stream, result.batch_domains = errors, ["a"] * 5 + ["b"] * 5
    assert error_curve(result) == [35.0, 20.0, 10.0, 10.0, 10.0]
    assert batches_to_within([35.0, 20.0, 10.0, 10.0, 10.0], 0.2, window=1) == (3, 10.0)
    assert batches_to_within([35.0, 20.0, 10.0, 10.0, 10.0], 0.2, window=2) == (4, 10.0)


def test_benchmark_lr_sweep_rows_and_result_names():
    from metatta.experiment import MethodSpec
    from repo_scripts import load_script

    bench = load_script("benchmarks/mgtta.py")
    rows = bench.lr_sweep_specs([MethodSpec("bn"), MethodSpec("tent"), MethodSpec("mgtta", label="mgtta (K=1)",
                                                                                  config={"lr": 2e-3})], [1, 10])
    assert [(r.label, r.config["lr"]) for r in rows] == [("tent lr x10", pytest.approx(1e-2)),
                                                         ("mgtta (K=1) lr x10", pytest.approx(2e-2))]
    assert bench.result_stem(bench.parse_args([])) == "mgtta"  # the README's run
    assert bench.result_stem(bench.parse_args(["--num-images", "10000", "--setting", "continual"])) == \
        "mgtta_n10000_continual"
    assert bench.result_stem(bench.parse_args(["--config", "configs/fmnist_c/mgg_k16.yaml",
                                               "--lr-multipliers", "1", "10"])) == "mgtta_mgg_k16_lr_sweep"


def test_the_loss_an_mgg_is_meta_trained_on_is_the_one_it_is_tested_with():
    from metatta.learned.meta_training import make_loss, mgtta_config

    cfg = mgg_train_config({**BASE, "loss": "entropy", "reliable_entropy_factor": 0.4, "test_lr": 2e-3})
    assert make_loss(cfg, None, torch.nn.Linear(2, 2)).reliable_factor == 0.4
    assert mgtta_config(cfg) == {"lr": 2e-3, "loss": "entropy", "stats_lambda": 0.4, "reliable_entropy_factor": 0.4}
    assert mgtta_config(mgg_train_config(BASE))["reliable_entropy_factor"] is None  # the paper's loss


def test_benchmark_mgg_under_rows_step_the_baseline_with_the_mgg(tmp_path):
    from metatta.experiment import MethodSpec
    from repo_scripts import load_script

    bench = load_script("benchmarks/mgtta.py")
    row = bench.mgg_under(MethodSpec("eata", config={"d_margin": 0.3}), 4, tmp_path / "adapter", 1e-3)
    assert (row.name, row.label, row.adapter) == ("eata", "eata+mgg (K=4)", str(tmp_path / "adapter"))
    assert row.config == {"d_margin": 0.3, "optimizer": "mgg", "lr": 1e-3}
    swept = bench.lr_sweep_specs([row], [1, 10])
    assert [(r.label, r.config["lr"], r.config["optimizer"]) for r in swept] == \
        [("eata+mgg (K=4) lr x10", pytest.approx(1e-2), "mgg")]
    assert bench.result_stem(bench.parse_args(["--mgg-under", "eata", "sar"])) == "mgtta_mgg_under"
    with pytest.raises(SystemExit):
        bench.parse_args(["--mgg-under", "cotta"])


def test_batches_to_reach_a_target_error():
    curve = [35.0, 20.0, 12.0, 10.0, 10.0]
    assert batches_to_reach(curve, 12.0, window=1) == 3
    assert batches_to_reach(curve, 10.5, window=2) == 5  # (10 + 10) / 2 at batches 4-5
    assert batches_to_reach(curve, 9.0, window=1) is None


def test_benchmark_defaults_to_the_configs_epochs_and_k():
    from repo_scripts import load_script

    bench = load_script("benchmarks/mgtta.py")
    args = bench.parse_args([])
    assert (args.epochs, args.unrolls) == (None, None)  # the config's epochs and K


def test_benchmark_scaling_runs_get_the_images_long_unrolls_need():
    from repo_scripts import load_script

    bench = load_script("benchmarks/mgtta.py")
    base = {"corruptions": ["a", "b", "c", "d"], "train_images": 128, "batch_size": 2}
    assert bench.images_for(base, 1) == 128
    assert bench.images_for(base, 16) == 17 * 2 * 2 * 4
    cfg = mgg_train_config({**BASE, "corruptions": ["speckle_noise", "gaussian_blur", "spatter", "saturate"],
                            "train_images": bench.images_for({**base, "train_images": 16}, 16), "unroll_steps": 16})
    assert cfg.unroll_steps == 16  # passes the trainer's check


def test_benchmark_reuses_a_trained_adapter(tmp_path):
    from repo_scripts import load_script

    bench = load_script("benchmarks/mgtta.py")
    directory = save_mgg(MGG(), tmp_path / "adapter", extra={"train_config": {"unroll_steps": 4, "num_actors": 2},
                                                             "steps": 120, "validation_error": 26.5})
    k, (outcome, stats) = bench.reused_adapter(str(directory))
    assert (k, outcome.adapter_dir, stats["learner_steps"], stats["validation_error"]) == (4, directory, 120, 26.5)
    assert bench.parse_args(["--adapter", str(directory)]).adapter == str(directory)
