# kogpt2-pipeline. `make` lists the targets.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
MODEL  ?=
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.DEFAULT_GOAL := help
.PHONY: help install test test-all test-fast lint format typecheck demo report bench clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  Variables: MODEL=path/to/kogpt2_folder (fine-tune it in 'make demo'), RUN=$(RUN)"

$(STAMP): setup.py pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv with the package and dev tools (idempotent)

test: $(STAMP) ## Run the test suite (installs first; about 10 minutes on 2 cores)
	$(PY) -m pytest -q -ra -m "not long" tests

test-all: $(STAMP) ## The test suite and the tests marked long
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP) ## Run the tests not marked slow
	$(PY) -m pytest -q -ra -m "not slow" tests

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check kogpt2 pipelines tests benchmarks
	$(VENV)/bin/ruff format --check kogpt2 pipelines tests benchmarks

format: $(STAMP) ## ruff format and autofix
	$(VENV)/bin/ruff check --fix kogpt2 pipelines tests benchmarks
	$(VENV)/bin/ruff format kogpt2 pipelines tests benchmarks

typecheck: $(STAMP) ## mypy on kogpt2/ and pipelines/
	$(VENV)/bin/mypy kogpt2 pipelines

demo: $(STAMP) ## The main job on the bundled corpus (MODEL=... to fine-tune a checkpoint)
	$(PY) -m pipelines.demo --run $(RUN) $(if $(MODEL),--model $(MODEL),)

report: $(STAMP) ## Rebuild report.html of a run folder (RUN=...)
	$(VENV)/bin/kogpt2 report --run $(RUN)

bench: $(STAMP) ## Run the benchmarks (quiet machine please); figures go to docs/BENCHMARKS.md by hand
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/generate_pipeline.py

clean: ## Remove caches and build outputs (keeps .venv and runs/)
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
