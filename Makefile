# The two commands (README.md, "The two commands"), from a fresh clone or an existing one:
#
#   make demo    set up $(VENV), then the main job: the example acceptance tests on the bundled demo model,
#                writing $(REPORT)
#   make test    set up $(VENV), then the test suite (the fast part; `make test-slow` runs the slow rest)
#
# Setting up creates the virtual environment if it is missing, upgrades pip, installs $(TORCH) first, then the
# project in editable mode with its `dev` extra. It runs again only when pyproject.toml or one of the variables
# below that choose packages changes; otherwise it costs nothing.
#
# Variables (`make demo TORCH=torch==2.13.0`):
#   TORCH        the torch requirement(s), installed before anything else. Default: `torch`, pip's default
#                build for the machine, which on Linux x86-64 is a CUDA build of several GB.
#   TORCH_INDEX  a package index used for the torch install alone, e.g. PyTorch's CPU-only index.
#   VENV         the virtual environment's directory (default .venv); CI uses its own.
#   PYTHON       the interpreter that creates it (default python3, which must be 3.10 or newer).
#   EXTRA        more requirements installed with the project, e.g. "sae-lens==6.5.1".
#   PIP_FLAGS    more pip flags for every install, e.g. --quiet.
#   PYTEST_ARGS  more pytest arguments, e.g. "-x tests/test_engine.py".
#   REPORT       the main job's HTML report (default saecheck-report.html).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
TORCH_INDEX ?=
EXTRA ?=
PIP_FLAGS ?=
PYTEST_ARGS ?=
REPORT ?= saecheck-report.html

VENV_PYTHON := $(VENV)/bin/python
# Written when the environment is set up; older than pyproject.toml or the package choice means "set up again".
STAMP := $(VENV)/.saecheck-installed
# The package choice (torch, its index, the extras), rewritten only when it changes.
CHOICE := $(VENV)/.saecheck-packages
CHOICE_TEXT := torch=$(strip $(TORCH)) torch_index=$(strip $(TORCH_INDEX)) extra=$(strip $(EXTRA))

# Each requirement single-quoted, so that `torch>=2.5` or `pyarrow<18` is no shell redirection.
quote = $(foreach word,$(1),'$(word)')

# pytest, with a plain word for exit code 5: a run that must execute tests and collected none fails.
define pytest
	$(VENV_PYTHON) -m pytest $(1) || { status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make: pytest ran no test (exit code 5), which counts as a failure" >&2; fi; \
	  exit $$status; }
endef

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-slow test-all lint typecheck docs dist FORCE

help:
	@echo "make demo       set up $(VENV), then the example acceptance tests on the demo, writing $(REPORT)"
	@echo "make test       set up $(VENV), then the test suite (slow end-to-end tests deselected)"
	@echo "make test-slow  set up $(VENV), then only the slow end-to-end tests (CI runs both)"
	@echo "make test-all   set up $(VENV), then every test"
	@echo "make lint       set up $(VENV), then ruff check and ruff format --check"
	@echo "make typecheck  set up $(VENV), then mypy on the package (configured in pyproject.toml)"
	@echo "make docs       set up $(VENV), install the docs extra, then build the site strictly (mkdocs build --strict)"
	@echo "make dist       set up $(VENV), then build the sdist and wheel into dist/ and check them (twine check)"
	@echo "make setup      only set up $(VENV)"
	@echo "Choose the torch build with TORCH=... (and TORCH_INDEX=...); see the top of this Makefile."

setup: $(STAMP)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

$(CHOICE): FORCE | $(VENV)/pyvenv.cfg
	@printf '%s\n' '$(CHOICE_TEXT)' | cmp -s - $@ || printf '%s\n' '$(CHOICE_TEXT)' > $@

$(STAMP): pyproject.toml $(CHOICE) $(VENV)/pyvenv.cfg
	$(VENV_PYTHON) -m pip install $(PIP_FLAGS) --upgrade pip
	$(VENV_PYTHON) -m pip install $(PIP_FLAGS) $(if $(strip $(TORCH_INDEX)),--index-url '$(strip $(TORCH_INDEX))') $(call quote,$(TORCH))
	$(VENV_PYTHON) -m pip install $(PIP_FLAGS) -e '.[dev]' $(call quote,$(EXTRA))
	@touch $@

demo: setup
	$(call pytest,examples --saecheck-report $(REPORT) $(PYTEST_ARGS))

test: setup
	$(call pytest,$(PYTEST_ARGS))

test-slow: setup
	$(call pytest,--run-slow -m slow $(PYTEST_ARGS))

test-all: setup
	$(call pytest,--run-slow $(PYTEST_ARGS))

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV_PYTHON) -m mypy

docs: setup
	$(VENV_PYTHON) -m pip install $(PIP_FLAGS) -e '.[docs]'
	$(VENV_PYTHON) -m mkdocs build --strict --site-dir $(VENV)/site

dist: setup
	rm -rf dist
	$(VENV_PYTHON) -m build --outdir dist .
	$(VENV_PYTHON) -m twine check --strict dist/*

FORCE:
