"""PALM's Ray Tune search: launch/tune.py, whose default config is configs/fmnist_c/tune_palm.yaml
(this name is kept for the commands that use it).

    python launch/tune_palm.py --config configs/fmnist_c/tune_palm.yaml num_samples=8
"""
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launch/ and trainers/ are not installed

from launch.tune import main
from metatta.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
