"""benchmarks/gpu.py: its report from a measured record, and its refusal to run without CUDA."""
import pytest
import torch

from repo_scripts import load_script


@pytest.fixture(scope="module")
def gpu_bench():
    return load_script("benchmarks/gpu.py")


def record():
    build = {"images_per_corruption": 100, "seconds": {"gpu": 2.0, "cpu": 30.0}, "cpu_over_gpu": 15.0,
             "mean_abs_level_difference": {"fog": 0.01, "glass_blur": 0.2}, "pixels_differing": {"fog": 0.01, "glass_blur": 0.1}}
    evaluation = [{"method": m, "device": d, "batch_size": 64, "mean_error": e, "images_per_second": s}
                  for m, e in (("bn", 22.5), ("tent", 22.4)) for d, s in (("gpu", 8000.0), ("cpu", 2000.0))]
    meta = [{"K": k, "device": d, "actors": a, "unroll_steps_per_second": r}
            for k in (1, 4) for d, base in (("gpu", 40.0), ("cpu", 10.0)) for a, r in ((1, base), (2, 1.5 * base))]
    return {"command": ["benchmarks/gpu.py"], "gpu": "NVIDIA H200", "torch": "2.11", "corruption_build": build,
            "evaluation": evaluation, "meta_training": meta}


def test_report_tabulates_ratios_measured_in_one_run(gpu_bench):
    text = gpu_bench.report(record())
    assert "2.0 s on the GPU, 30.0 s on the CPU (15.0x); largest mean |GPU - CPU| 0.200 levels (glass_blur)" in text
    assert "| tent | 64 | 22.40 | 22.40 | 8000 | 2000 | 4.0x |" in text
    assert "| 4 | 40.0 | 60.0 | 1.50x | 10.0 | 15.0 | 1.50x | 4.0x |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_cuda(gpu_bench):
    with pytest.raises(SystemExit, match="needs CUDA"):
        gpu_bench.main(["--out", "unused"])
