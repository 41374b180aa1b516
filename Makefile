# Two entry points for a fresh machine with Python 3.11 and pip:
#   make quickstart   train a tiny model on a phantom breast-ultrasound cohort and release a guarded synthetic set
#   make test         lint and run the test suite
# Override the PyTorch wheel for your platform, e.g. make test TORCH_SPEC="torch==2.5.1"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# test files run in this many worker processes (pytest-xdist; a file's tests share one worker and its fixtures)
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m monai.bundle run --config_file bundles/breast_us_ldit/configs/quickstart.yaml --bundle_root bundles/breast_us_ldit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) .pytest_cache mlruns
