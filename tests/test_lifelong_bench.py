"""benchmarks/lifelong.py's work-dir memory: probed speeds and guard thresholds survive a resume."""
import json

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
