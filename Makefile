# Two commands for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup data demo test test-slow benchmark reproduce clean

setup: $(STAMP)

# Installs against the versions the tests last passed with; pyproject keeps ranges.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

data:
	@bash scripts/get_fashion_mnist.sh

demo: setup data
	$(PY) launch/demo.py

test: setup data
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

benchmark: setup data
	$(PY) benchmarks/baselines.py

# Re-runs a README table (benchmarks/results/$(TABLE).json) and fails if a mean error moved > 0.1.
TABLE ?= baselines
reproduce: setup data
	$(PY) benchmarks/reproduce.py benchmarks/results/$(TABLE).json

clean:
	rm -rf .cache outputs mlflow.db mlruns
