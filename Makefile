# Developer entry points.  `make test` and `make run` create the venv and install what
# they need first, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The decoder's tests once more on the distribution's own interpreter (Debian 12: 3.11.2),
# in a venv of its own: decoding must not depend on the patch level (docs/SECURITY.md).
SYSTEM_PYTHON ?= /usr/bin/python3.11
SYSTEM_VENV ?= .venv-system
SYSTEM_BIN := $(SYSTEM_VENV)/bin
SYSTEM_STAMP := $(SYSTEM_VENV)/.installed
DECODING_TESTS := tests/test_payload.py tests/test_security_payload.py \
    tests/test_security_memory.py tests/test_py2pickle.py tests/test_upload.py
# `make test` is the quick loop while developing: the checks and every test but the ones
# marked `long` (fuzzing, fault injection, served timeouts, the local stack end to end),
# which take more than half of the suite's time.  `make test-all` is what CI runs: all but
# the `slow` soaks (pyproject.toml).

.PHONY: venv test test-all test-system-python lint run bench clean

# The project and its development tools (dev/, a distribution of their own that the
# images do not install), both editable.
$(STAMP): pyproject.toml dev/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]" -e "./dev[sapphire]"
	touch $(STAMP)

venv: $(STAMP)

test: lint
	$(BIN)/python -m pytest -m "not slow and not long"

test-all: lint
	$(BIN)/python -m pytest

$(SYSTEM_STAMP): pyproject.toml dev/pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(SYSTEM_VENV)
	$(SYSTEM_BIN)/python -m pip install --quiet --upgrade pip
	$(SYSTEM_BIN)/python -m pip install --quiet -e ".[test]" -e ./dev
	touch $(SYSTEM_STAMP)

test-system-python: $(SYSTEM_STAMP)
	$(SYSTEM_BIN)/python --version
	$(SYSTEM_BIN)/python -m pytest $(DECODING_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src dev functions tests bench
	$(BIN)/lint-imports

# Options for `datastore local` pass through: make run ARGS="--state-dir /tmp/x --stations 8"
run: $(STAMP)
	$(BIN)/datastore local $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py

# The event-type tables of docs/FORMAT.md, generated from src/hisparc_datastore/format/schema.py
# (tests/test_format_doc.py fails until they are regenerated after a schema change).
.PHONY: format-doc
format-doc: $(STAMP)
	$(BIN)/python -m hisparc_datastore_dev.format_doc

clean:
	rm -rf $(VENV) $(SYSTEM_VENV) .pytest_cache .ruff_cache

# The images' lock files (locks/*.lock: every dependency pinned, with hashes), made from
# pyproject.toml by uv at this version (docs/IMAGES.md).  `make locks` after a change to
# the dependencies keeps the versions already locked where it can; `make locks-upgrade`
# takes the newest that pyproject.toml admits.
UV_VERSION ?= 0.13.9
.PHONY: locks locks-upgrade image-check
locks: $(STAMP)
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	UV=$(BIN)/uv scripts/locks.sh

locks-upgrade: $(STAMP)
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	UV=$(BIN)/uv scripts/locks.sh --upgrade

# Builds both images with podman and runs them as Knative would, against a local S3
# server (scripts/image-check.sh; docs/IMAGES.md).  PYTHON_IMAGE=... builds on a real
# python image instead of the Debian stand-in.
image-check: $(STAMP)
	PY=$(BIN)/python scripts/image-check.sh
