"""benchmarks/lifelong.py's work-dir memory: probed speeds and guard thresholds survive a resume."""
import argparse
import json

import pytest

from tests.repo_scripts import load_script

lifelong = load_script("benchmarks/lifelong.py")


def test_remembered_computes_once_and_reads_back(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"images_per_second": 1234.5}

    path = tmp_path / "work" / "tent.speed.json"
    assert lifelong.remembered(path, compute) == {"images_per_second": 1234.5}
    assert lifelong.remembered(path, lambda: {"images_per_second": 1.0}) == {"images_per_second": 1234.5}
    assert calls == [1]
    assert json.loads(path.read_text()) == {"images_per_second": 1234.5}


def test_a_work_dir_calibrated_for_another_source_checkpoint_or_rule_is_refused(tmp_path):
    args = argparse.Namespace(calibration_images=40_000, guard_calibration="pooled", guard_thresholds_from=None,
                              difficulty="medium", calibration_difficulty=None)
    calibrated_on = {"images_per_method": 40_000, "source_sha256": "a" * 64, "calibration": "pooled"}
    lifelong.check_calibration(calibrated_on, tmp_path, args, "a" * 64)
    with pytest.raises(SystemExit, match="another source checkpoint"):
        lifelong.check_calibration(calibrated_on, tmp_path, args, "b" * 64)
    with pytest.raises(SystemExit, match="another source checkpoint"):  # calibrated before the hash was kept
        lifelong.check_calibration({"images_per_method": 40_000}, tmp_path, args, "b" * 64)
    with pytest.raises(SystemExit, match="--calibration-images 20000"):
        lifelong.check_calibration(calibrated_on, tmp_path, argparse.Namespace(**{**vars(args),
                                                                                "calibration_images": 20_000}), "a" * 64)
    hard = argparse.Namespace(**{**vars(args), "difficulty": "hard"})
    with pytest.raises(SystemExit, match="calibrated on medium held-out streams, not --calibration-difficulty hard"):
        lifelong.check_calibration({**calibrated_on, "difficulty": "medium"}, tmp_path, hard, "a" * 64)
    lifelong.check_calibration({**calibrated_on, "difficulty": "medium"}, tmp_path,
                               argparse.Namespace(**{**vars(hard), "calibration_difficulty": "medium"}), "a" * 64)
    with pytest.raises(SystemExit, match="--guard-calibration per-method"):
        lifelong.check_calibration(calibrated_on, tmp_path, argparse.Namespace(**{**vars(args),
                                                                                "guard_calibration": "per-method"}),
                                   "a" * 64)


def test_reused_thresholds_are_marked_checked_against_the_checkpoint_and_kept_to_their_work_dir(tmp_path):
    report = tmp_path / "lifelong_medium.json"
    calibrated_on = {"images_per_method": 40_000, "source_sha256": "a" * 64, "calibration": "per-method"}
    tent = {"quantile": 0.5, "min_agreement": 0.93, "min_marginal_entropy": 0.957, "window": 8}
    report.write_text(json.dumps({"thresholds": {"pooled": {"calibration": "per-method", "calibrated_on": calibrated_on},
                                                 "tent": tent}}))
    reused = lifelong.thresholds_from(str(report), "a" * 64)
    assert reused["tent"] == tent
    work = tmp_path / "work"  # the same calibration read from the run's work dir
    work.mkdir()
    (work / "guard_thresholds.json").write_text(json.dumps({"calibration": "per-method", "calibrated_on": calibrated_on}))
    (work / "guard_thresholds.tent.json").write_text(json.dumps(tent))
    from_work = lifelong.thresholds_from(str(work), "a" * 64)
    assert from_work["tent"] == tent and from_work["pooled"]["calibrated_on"]["reused_from"] == str(work)
    marked = reused["pooled"]["calibrated_on"]
    assert marked == {**calibrated_on, "reused_from": str(report)}
    with pytest.raises(SystemExit, match="another source checkpoint"):
        lifelong.thresholds_from(str(report), "b" * 64)
    assert lifelong.without_thresholds(reused, ["source", "bn", "tent", "cotta"], "both") == ["cotta"]
    assert lifelong.without_thresholds(reused, ["cotta"], "unguarded") == []
    pooled = {"pooled": {"min_agreement": 0.83, "min_marginal_entropy": 0.94, "window": 8}}
    assert lifelong.without_thresholds(pooled, ["cotta"], "both") == []
    # the work dir remembers where its thresholds came from: whatever --calibration-images says
    args = argparse.Namespace(calibration_images=123, guard_calibration="per-method", guard_thresholds_from=str(report))
    lifelong.check_calibration(marked, tmp_path, args, "a" * 64)
    with pytest.raises(SystemExit, match="calibrated here"):
        lifelong.check_calibration(calibrated_on, tmp_path, args, "a" * 64)
    with pytest.raises(SystemExit, match="reused from"):
        lifelong.check_calibration(marked, tmp_path, argparse.Namespace(**{**vars(args), "guard_thresholds_from": None}),
                                   "a" * 64)


def test_per_method_guard_records_are_read_back_and_reported(tmp_path):
    (tmp_path / "guard_thresholds.json").write_text(json.dumps({"calibration": "per-method", "calibrated_on": {}}))
    tent = {"quantile": 0.1, "min_agreement": 0.9, "min_marginal_entropy": 0.95, "window": 8,
            "candidates": {"0.0": {"windows_above_reference": 3, "windows": 16, "mean_error": 13.2},
                           "0.1": {"windows_above_reference": 1, "windows": 16, "mean_error": 12.9}}}
    (tmp_path / "guard_thresholds.tent.json").write_text(json.dumps(tent))
    records = lifelong.guard_records(tmp_path)
    assert set(records) == {"pooled", "tent"} and records["tent"] == tent
    text = lifelong.guard_text(records)
    assert "| tent | 0.1 | 0.9 | 0.95 | - | q 0.0: 3/16 (13.20), q 0.1: 1/16 (12.90) |" in text
    (tmp_path / "guard_thresholds.tent.json").write_text(json.dumps({**tent, "check_every": 2,
                                                                     "relative_marginal": True}))
    assert "| 0.95 | check_every 2, relative_marginal True | q 0.0" in lifelong.guard_text(lifelong.guard_records(tmp_path))
    pooled = {"pooled": {"min_agreement": 0.83, "min_marginal_entropy": 0.94, "window": 8}}
    assert "agreement >= 0.83" in lifelong.guard_text(pooled)


def test_guard_rows_split_a_method_over_processes():
    assert lifelong.row_variants("cotta", "both") == (False, True)
    assert lifelong.row_variants("cotta", "unguarded") == (False,)
    assert lifelong.row_variants("cotta", "guarded") == (True,)
    assert lifelong.row_variants("bn", "both") == (False,)  # nothing to guard
    assert lifelong.row_variants("bn", "guarded") == ()


def test_a_per_method_calibration_length_off_the_batch_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lifelong.main(["--calibration-images", "1000", "--batch-size", "64", "--work-dir", str(tmp_path / "w")])
    assert "--calibration-images 1000 must be a multiple of --batch-size 64" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, message", [
    (["--guard-check-every", "0"], "check_every must be an integer >= 1"),
    (["--guard-reference-confidence", "1.5"], "reference_confidence must be a number in [0, 1]"),
    (["--guard-check-every", "2", "--guard-calibration", "pooled"], "--guard-check-every: options of a per-method"),
    (["--guard-relative-marginal", "--guard-calibration", "pooled"],
     "--guard-relative-marginal: options of a per-method"),
    (["--guard-reference-confidence", "0.9", "--guard-thresholds-from", "x"],
     "--guard-reference-confidence: options of a per-method"),
])
def test_bad_guard_options_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        lifelong.main([*argv, "--work-dir", str(tmp_path / "w")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_reused_thresholds_from_nothing_or_another_json_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="neither a lifelong work dir"):
        lifelong.thresholds_from(str(tmp_path / "missing"), "a" * 64)
    with pytest.raises(SystemExit, match="neither a lifelong work dir"):
        lifelong.thresholds_from(str(tmp_path), "a" * 64)  # a directory, but no run's
    other = tmp_path / "search.json"
    other.write_text(json.dumps({"trials": []}))
    with pytest.raises(SystemExit, match="without the `thresholds` of a lifelong report"):
        lifelong.thresholds_from(str(other), "a" * 64)


def test_a_reset_guard_takes_a_records_thresholds():
    record = {"min_agreement": 0.93, "min_marginal_entropy": 0.96, "window": 8, "quantile": 0.5, "candidates": {}}
    assert lifelong.reset_guard(record) == {"action": "reset", "min_agreement": 0.93, "min_marginal_entropy": 0.96,
                                            "window": 8}
    options = {"check_every": 2, "reference_confidence": 0.9, "relative_marginal": True}
    assert lifelong.reset_guard({**record, **options}) == {**lifelong.reset_guard(record), **options}


def test_a_remembered_method_calibration_with_other_options_or_candidates_is_refused(tmp_path):
    path = tmp_path / "guard_thresholds.tent.json"
    record = {"quantile": 0.5, "min_agreement": 0.9, "min_marginal_entropy": 0.95, "window": 8, "check_every": 2,
              "candidates": {"0.25": {}, "0.5": {}}}
    args = argparse.Namespace(guard_check_every=2, guard_reference_confidence=None, guard_relative_marginal=None,
                              guard_quantiles=[0.5, 0.25])
    lifelong.check_method_record(record, path, args)
    with pytest.raises(SystemExit, match=r"calibrated with guard options \{'check_every': 2\}, not this command's "
                                         r"\{'check_every': 8\}"):
        lifelong.check_method_record(record, path, argparse.Namespace(**{**vars(args), "guard_check_every": 8}))
    with pytest.raises(SystemExit, match="not this command's none"):
        lifelong.check_method_record(record, path, argparse.Namespace(**{**vars(args), "guard_check_every": None}))
    with pytest.raises(SystemExit, match=r"candidate quantiles \[0.25, 0.5\], not --guard-quantiles \[0.5, 0.75\]"):
        lifelong.check_method_record(record, path, argparse.Namespace(**{**vars(args), "guard_quantiles": [0.75, 0.5]}))
