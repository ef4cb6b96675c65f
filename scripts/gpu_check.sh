#!/usr/bin/env bash
# The checks that need a CUDA GPU (CI has none): the CUDA tests, then benchmarks/gpu.py
# (GPU vs CPU in one run: Fashion-MNIST-C building, Source/BN/Tent evaluation, MGG
# meta-training through Ray actors). Writes benchmarks/results/gpu.{json,md}.
#   bash scripts/gpu_check.sh [benchmarks/gpu.py options]     (PYTHON=..., PYTEST_ARGS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" -k cuda ${PYTEST_ARGS:-tests}
"$PY" benchmarks/gpu.py "$@"
