# `make test` creates .venv on first use, installs the project with its dev extras, runs pytest.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test run install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first, so the range in pyproject.toml is already satisfied
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -x --durations=15 $(PYTEST_ARGS)

# The main job: the whole pipeline, tiny preset, on this machine.
run: $(BIN)/.installed
	$(BIN)/python -m jobs.controller start --preset tiny

clean:
	rm -rf $(VENV) .pytest_cache
