"""The library installs and evaluates without its distributed extras (ray, mlflow, optuna):
every method adapts through `evaluate` in a process where importing them fails."""
import subprocess
import sys
import textwrap

BLOCKED = ("ray", "mlflow", "optuna")

SCRIPT = textwrap.dedent(f"""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError("blocked for the test: " + name)

    sys.meta_path.insert(0, Block())

    import torch
    from metatta.data.types import Batch
    from metatta.evaluation import evaluate
    from metatta.methods import available_methods, build_method
    from metatta.models import build_model
    import metatta.experiment, metatta.reporting  # noqa: F401  (import without the extras)

    class Stream:
        setting, resets_per_domain = "continual", False
        def __init__(self, batches): self.batches = batches
        def __iter__(self): return iter(self.batches)
        def __len__(self): return len(self.batches)

    torch.manual_seed(0)
    batches = [Batch(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), "noise-5") for _ in range(2)]
    for name in ("source", "bn", "tent", "sar", "cotta"):
        model = build_model("resnet_fmnist", num_classes=10, in_channels=1)
        result = evaluate(build_method(name, model), Stream(batches), progress=False)
        assert result.num_images == 16, result
    assert not any(m.split(".")[0] in {BLOCKED!r} for m in sys.modules)
    print("ok", len(available_methods()))
""")


def test_library_evaluates_without_ray_mlflow_optuna():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
