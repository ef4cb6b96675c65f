"""An experiment checks every row before any row runs: a bad method config or a row without the
trained adapter it needs is refused before the Source and BN rows above it have run."""
import pytest


# ---- every row is checked before any row runs (issue 24, item 6) ------------------------------------
BAD_ROWS = [
    ({"name": "tent", "config": {"steps": -1}}, r"tent: config\.steps must be an integer >= 1, got -1"),
    ({"name": "eata", "config": {"lr": -0.001}}, r"eata: config\.lr must be a finite number >= 0, got -0\.001"),
    ({"name": "nanoadapt", "config": {"base": "sar", "base_config": {"rho": -1.0}}},
     r"sar: config\.rho must be >= 0, got -1\.0"),
    ({"name": "mgtta"}, r"method mgtta: needs a trained adapter"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[r["name"] for r, _ in BAD_ROWS])
def test_a_bad_row_is_refused_before_any_row_runs(row, message, monkeypatch):
    import metatta.experiment as experiment

    def no_work(*args, **kwargs):
        raise AssertionError("work started before every row was checked")

    for name in ("load_domains", "source_model", "evaluate", "build_row_method"):
        monkeypatch.setattr(experiment, name, no_work)
    rows = [{"name": "source"}, {"name": "bn"}, row]
    if row["name"] != "mgtta":  # a missing adapter can still be given after parsing (--adapter)
        with pytest.raises(ValueError, match=rf"methods\[2\]: {message}"):
            experiment.experiment_config({"methods": rows})
    cfg = experiment.ExperimentConfig(methods=[experiment.MethodSpec(**r) for r in rows], mlflow=False)
    with pytest.raises(ValueError, match=rf"methods\[2\]: {message}"):
        experiment.run_experiment(cfg)
