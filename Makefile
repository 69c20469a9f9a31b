# `make demo` and `make test` set everything up (once) and run. Re-running reinstalls nothing.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.makd-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# pip's chatter goes to a log, shown only if a step fails.
LOG := $(VENV)/install.log
QUIET := >>$(LOG) 2>&1 || { cat $(LOG); echo "error: installation failed (log: $(LOG))"; exit 1; }

.PHONY: demo test setup data bench evidence clean

demo: setup data
	$(BIN)/makd demo

test: setup data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

# uv installs in parallel: ~30 s where pip took ~3 minutes. Local wheel folders of this kind of machine (torch
# 2.14.1 and its CUDA libraries lie there) are searched first when they exist; elsewhere packages come from PyPI.
# --compile-bytecode: uv compiles the whole site-packages once at install. Without it every command that imports
# torch recompiles its sources when PYTHONDONTWRITEBYTECODE is set (CI, containers, this machine): ~2 s more.
FIND_LINKS := $(foreach d,$(wildcard /opt/pypi-more/files /opt/pypi/files /opt/wheels),--find-links $(d))
UV := $(BIN)/uv pip install --compile-bytecode --python $(BIN)/python $(FIND_LINKS)

$(STAMP): pyproject.toml requirements/torch.txt requirements/tools.txt requirements/data-packages.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: about a minute)"
	@: > $(LOG)
	@$(PIP) install -q -r requirements/tools.txt $(QUIET)
	@$(UV) -r requirements/torch.txt -e '.[test]' $(QUIET)
	@$(UV) --no-deps -r requirements/data-packages.txt $(QUIET)
	@$(BIN)/python -c "import makd, torch, torchvision, timm" || { echo "error: installation incomplete"; exit 1; }
	@touch $@

data:
	@scripts/ensure-fashion-mnist.sh

bench: setup data
	@for script in benchmarks/[!_]*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache

# The evidence behind docs/evidence.md: hours on 2 CPU cores; resumes where it stopped.
evidence: setup data
	$(BIN)/python scripts/evidence.py
