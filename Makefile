# Set-up and the everyday commands. `make repro` and `make test` work on a fresh machine: they create
# the virtual environment first if it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Stage commands in dvc.yaml say `python`: the venv's, whatever the caller's PATH.
export PATH := $(BIN):$(PATH)

.PHONY: install repro test test-fast lint docs docs-build clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,team]'
	$(BIN)/python -m mnist_vae.plots  # the offline page template of `dvc plots show`
	touch $@

repro: install  ## the whole pipeline: download, train, evaluate
	dvc repro

test: install  ## the whole test suite, end-to-end runs included
	pytest

test-fast: install  ## unit tests only (tests/unit: no real processes, under 30 s on 2 cores)
	pytest tests/unit

lint: install  ## what CI and the pre-commit hooks check: ruff's lint rules and format, mypy on src/
	ruff check src tests pipeline
	ruff format --check src tests pipeline
	mypy

docs: install  ## the docs site on http://127.0.0.1:8000, rebuilt on every save
	mkdocs serve

docs-build: install  ## the docs site into site/; a broken link or a page missing from the nav fails it
	mkdocs build --strict

clean:  ## pipeline outputs and the embedded MLflow store (not the DVC cache)
	rm -rf data models reports metrics.json mlflow.db mlruns mlartifacts
