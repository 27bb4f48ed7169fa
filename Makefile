# Set-up and the everyday commands. `make repro` and `make test` work on a fresh machine: they create
# the virtual environment first if it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Stage commands in dvc.yaml say `python`: the venv's, whatever the caller's PATH.
export PATH := $(BIN):$(PATH)

# Each test tier prints its wall time at its end, and appends it to $(TIMES) when that is set
# (.ci/run sums them up). pytest's --durations lists each tier's slowest tests.
TIMES ?= /dev/null
timed = start=$$(date +%s); $(2) || exit $$?; \
	echo "tier $(1): $$(( $$(date +%s) - start )) s" | tee -a $(TIMES)

# Root installs Debian packages itself; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser repro test test-fast test-e2e lint docs docs-build clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,team,spark]'
	@test -x "$$JAVA_HOME/bin/java" || command -v java >/dev/null || echo 'note: Spark (mnist-vae score --engine spark) needs Java 17 or 21: apt-get install openjdk-17-jre-headless (Debian), or set JAVA_HOME'
	$(BIN)/python -m mnist_vae.evaluation.plots  # the offline page template of `dvc plots show`
	touch $@

repro: install  ## the whole pipeline: download, train, evaluate
	dvc repro

test: test-fast test-e2e  ## the whole test suite: the unit tier, then the end-to-end tier (what CI runs)

test-fast: install  ## unit tests only (tests/unit: tiny models, no real process; under 30 s on 2 cores)
	@$(call timed,unit,pytest tests/unit --durations=25)

# Headless Chromium and its driver, from Debian, for the demo's browser test (tests/e2e/test_demo.py);
# installed only when missing, so CI runs that test rather than skipping it.
browser:  ## Debian's chromium and chromium-driver, when missing
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# Two workers: much of an end-to-end test is waiting for a server or a child process. A module's
# tests stay on one worker (its module fixtures are made once), handed out heaviest first.
test-e2e: install browser  ## the end-to-end tier (tests/e2e: real processes, servers, `dvc repro`, a browser)
	@$(call timed,e2e,pytest tests/e2e -n 2 --dist loadfile --no-loadscope-reorder --durations=25)

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
