# Everything a fresh machine needs: `make demo` runs the ENN example end to end,
# `make test` runs the test suite. Both set up what is missing first.
# `make demo DEMO_ARGS="--generations 2 --population 4"` is the reduced demo CI runs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo ui test lint services services-stop bench image clean

setup: $(STAMP)

$(STAMP): pyproject.toml runner_image/pyproject.toml constraints.txt
	@echo "==> creating $(VENV) and installing the provider, the runner and test tools (a minute or two)"
	@$(PYTHON) -c 'import sys, tarfile; sys.exit(not hasattr(tarfile, "data_filter"))' \
		|| { echo "$(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'), which lacks tarfile's extraction filters (PEP 706): the runner needs 3.10.12+, 3.11.4+ or 3.12+. Install one (pyenv, or uv python install 3.12) and run: make PYTHON=/path/to/python3.12 $(MAKECMDGOALS)" >&2; exit 1; }
	@test -x $(BIN)/python || { $(PYTHON) -m devtools.system && $(PYTHON) -m venv $(VENV); }
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.5"
	@$(UV) pip install --quiet --python $(BIN)/python --constraint constraints.txt --compile-bytecode \
		--editable runner_image --editable ".[dev]"
	@touch $@

demo: setup
	@$(BIN)/python -m devtools.demo $(DEMO_ARGS)

ui: setup
	@$(BIN)/python -m devtools.demo ui

test: setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	@$(BIN)/ruff check runner_image airflow_provider_studio dags devtools tests bench

services: setup
	@$(BIN)/python -m devtools.services start

services-stop:
	@test ! -x $(BIN)/python || $(BIN)/python -m devtools.services stop

bench: setup
	@$(BIN)/python bench/runner_overhead.py
	@$(BIN)/python bench/scrape_collect.py
	@$(BIN)/python bench/faults.py
	@$(BIN)/python bench/pickup_latency.py
	@$(BIN)/python bench/pod_cold_start.py
	@$(BIN)/python bench/scrape_throughput.py
	@$(BIN)/python bench/memo_rerun.py
	@$(BIN)/python bench/generation_scale.py

image: setup
	@$(BIN)/python -m devtools.image build

clean: services-stop
	rm -rf $(VENV) .local .cache
