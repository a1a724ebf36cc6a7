# Graft: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graft-installed

.PHONY: demo test install protos clean

# Install once per change of pyproject.toml; the stamp keeps `make test` fast afterwards.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/graft-train demo --workdir demo-work

# Regenerate the committed protobuf/gRPC stubs from protos/ (tests check they are current).
protos: $(STAMP)
	$(PY) -m serving.protos.generate

clean:
	rm -rf $(VENV) demo-work .pytest_cache
