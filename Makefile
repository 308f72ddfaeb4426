# `make test` creates .venv on first use, installs the project with its dev extras and the Debian packages the
# tests use, runs pytest.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# command:Debian package the tests run: chromium (browser tests), kubectl (`kubectl kustomize`)
SYSTEM_DEPS := chromium:chromium kubectl:kubernetes-client

.PHONY: test run install system-deps clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first, so the range in pyproject.toml is already satisfied
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# as root, apt-get installs what is missing; otherwise one line says what to install
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do command -v $${dep%%:*} >/dev/null || missing="$$missing $${dep#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	else \
		echo "make test needs the Debian packages$$missing: run 'sudo apt-get install -y$$missing' and again 'make test'" >&2; \
		exit 1; \
	fi

test: $(BIN)/.installed system-deps
	$(BIN)/python -m pytest -q -x --durations=15 $(PYTEST_ARGS)

# The main job: the whole pipeline, tiny preset, on this machine.
run: $(BIN)/.installed
	$(BIN)/python -m jobs.controller start --preset tiny

clean:
	rm -rf $(VENV) .pytest_cache
