# The two set-up commands of the README. Both create .venv and install everything they need.
#   make run   — build mini8 data + model pool if not cached, run the default experiment, print its table
#   make test  — install the test extras, fetch the mini8 sources, run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: install run test data
install: $(STAMP)

data: $(STAMP)
	$(VENV)/bin/fusion-build-mini8 --fetch -q

run: data
	$(VENV)/bin/fusion $(ARGS)

test: data
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
