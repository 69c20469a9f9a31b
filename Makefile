# `make demo` and `make test` set everything up (once) and run. Re-running reinstalls nothing.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.makd-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The suite runs on every core, up to 4 (pytest-xdist; one torch thread per worker, tests/conftest.py).
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
PYTEST_ARGS ?=
# pip's chatter goes to a log, shown only if a step fails.
LOG := $(VENV)/install.log
QUIET := >>$(LOG) 2>&1 || { cat $(LOG); echo "error: installation failed (log: $(LOG))"; exit 1; }

.PHONY: demo test setup check lock data bench evidence clean

demo: check data
	$(BIN)/makd demo

test: check data
	$(BIN)/python -m pytest -n $(JOBS) --dist worksteal $(PYTEST_ARGS)

setup: $(STAMP)

# Installs exactly the lock files in requirements/ (README there), with their hashes: a package released after the
# lock changes nothing. uv installs in parallel (~30 s where pip took ~3 minutes); the local wheel folders of this
# kind of machine (torch 2.14.1 and its CUDA libraries lie there, byte-identical to PyPI's) are searched first when
# they exist, elsewhere everything comes from PyPI. --compile-bytecode: uv compiles site-packages once at install;
# without it every command that imports torch recompiles its sources when PYTHONDONTWRITEBYTECODE is set (~2 s).
FIND_LINKS := $(foreach d,$(wildcard /opt/pypi-more/files /opt/pypi/files /opt/wheels),--find-links $(d))
UV_FLAGS := --python $(BIN)/python --compile-bytecode $(FIND_LINKS)
LOCKS := requirements/lock.txt requirements/data-packages.lock.txt
COMPILE := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock"

$(STAMP): pyproject.toml $(LOCKS) requirements/tools.lock.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the locked packages into $(VENV) (the first time: about a minute)"
	@: > $(LOG)
	@$(PIP) install -q --require-hashes -r requirements/tools.lock.txt $(QUIET)
	@$(BIN)/uv pip sync $(UV_FLAGS) --require-hashes $(LOCKS) $(QUIET)
	@$(BIN)/uv pip install $(UV_FLAGS) --no-deps --no-build-isolation -e . $(QUIET)
	@touch $@

# Every package the tests need is there, importable, at its locked version: a broken install fails here with one
# line naming the package, instead of showing as skipped tests; the next `make` then installs the lock again.
check: setup
	@$(BIN)/python scripts/check_install.py || { rm -f $(STAMP); exit 1; }

# The deliberate upgrade: the newest versions pyproject.toml and requirements/*.in allow, installed, then the suite.
lock: setup
	$(COMPILE) --upgrade pyproject.toml requirements/torch.in requirements/build.in --extra test -o requirements/lock.txt
	$(COMPILE) --upgrade --no-deps requirements/data-packages.in -o requirements/data-packages.lock.txt
	$(COMPILE) --upgrade requirements/tools.in -o requirements/tools.lock.txt
	$(MAKE) test

data:
	@scripts/ensure-fashion-mnist.sh

bench: check data
	@for script in benchmarks/[!_]*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache

# The evidence behind docs/evidence.md: hours on 2 CPU cores; resumes where it stopped.
evidence: setup data
	$(BIN)/python scripts/evidence.py
