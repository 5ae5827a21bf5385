# metarun — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: help install install-test run test test-quick bench lint docs docs-build clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-13s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed ## create .venv and install metarun (torch 2.14.1, torchvision 0.29.1, ...)

install-test: $(VENV)/.installed-test ## install metarun with its test extras

run: install ## set up and run the default experiment (MAML on sinusoids); ARGS='...' adds overrides
	$(VENV)/bin/metarun $(ARGS)

# Two pytest workers (one per core, one intra-op thread each: tests/conftest.py); TEST_WORKERS=0 runs in-process.
# --dist loadgroup: the tests sharing a module fixture of their module run on one worker
# (tests/grouping.py), so the fixture runs once instead of once per worker.
TEST_WORKERS ?= 2

test: install-test ## set up and run the test suite (reads Omniglot from METARUN_DATA_DIR)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-quick: install-test ## the quick tier: every test not marked slow (under 3 minutes)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

bench: install ## throughput and the results tables: every algorithm on Omniglot and sinusoids (long; not part of CI)
	bash scripts/bench.sh

lint: install-test ## ruff lint and format check, mypy on the plain-Python modules (pyproject.toml), byte-compile
	$(VENV)/bin/ruff check metarun scripts tests
	$(VENV)/bin/ruff format --check metarun scripts tests
	$(VENV)/bin/mypy
	$(PY) -m compileall -q metarun scripts tests

docs: install-test ## serve the documentation site (docs/) at http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

docs-build: install-test ## build the documentation into site/, strictly (a broken link fails), as CI does
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .cache site
