"""benchmarks/lifelong.py's work-dir memory: probed speeds and guard thresholds survive a resume."""
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


def test_a_work_dir_calibrated_for_another_source_checkpoint_is_refused(tmp_path):
    calibrated_on = {"images_per_method": 40_000, "source_sha256": "a" * 64}
    lifelong.check_calibration(calibrated_on, tmp_path, 40_000, "a" * 64)
    with pytest.raises(SystemExit, match="another source checkpoint"):
        lifelong.check_calibration(calibrated_on, tmp_path, 40_000, "b" * 64)
    with pytest.raises(SystemExit, match="another source checkpoint"):  # calibrated before the hash was kept
        lifelong.check_calibration({"images_per_method": 40_000}, tmp_path, 40_000, "b" * 64)
    with pytest.raises(SystemExit, match="--calibration-images 20000"):
        lifelong.check_calibration(calibrated_on, tmp_path, 20_000, "a" * 64)


def test_guard_rows_split_a_method_over_processes():
    assert lifelong.row_variants("cotta", "both") == (False, True)
    assert lifelong.row_variants("cotta", "unguarded") == (False,)
    assert lifelong.row_variants("cotta", "guarded") == (True,)
    assert lifelong.row_variants("bn", "both") == (False,)  # nothing to guard
    assert lifelong.row_variants("bn", "guarded") == ()
