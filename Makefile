# Graft: the two commands a fresh machine needs are `make demo` and `make test`.
# Everything installs from uv.lock (exact versions with hashes), through uv, into $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# The uv that bootstraps the install; the lock then pins the one the venv keeps.
UV_VERSION := 0.13.9
STAMP := $(VENV)/.graft-installed
EXTRAS := --extra dev --extra demo --extra bench

# uv works on this venv (not one of its own choosing) and never fetches a Python.
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON_DOWNLOADS := never

.PHONY: demo test install lock upgrade protos clean

# Install once per change of the lock or pyproject.toml; the stamp keeps `make test` fast afterwards.
# --locked refuses a lock that no longer matches pyproject.toml (run `make lock`).
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked $(EXTRAS)
	touch $(STAMP)

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/graft-train demo --workdir demo-work

# Re-resolve after editing pyproject.toml, keeping every locked version that still fits.
lock: | $(UV)
	$(UV) lock

# Move every locked package to the newest version pyproject.toml allows, install it,
# and regenerate the protobuf/gRPC stubs for the new grpcio-tools.
upgrade: | $(UV)
	$(UV) lock --upgrade
	$(UV) sync --locked $(EXTRAS)
	$(PY) -m serving.protos.generate
	touch $(STAMP)

# Regenerate the committed protobuf/gRPC stubs from protos/ (tests check they are current).
protos: $(STAMP)
	$(PY) -m serving.protos.generate

clean:
	rm -rf $(VENV) demo-work .pytest_cache
