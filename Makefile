# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup lint test demo bench clean vm-setup vm-test

setup: $(STAMP)

$(STAMP): scripts/bootstrap.sh requirements.lock pyproject.toml
	scripts/bootstrap.sh

test: setup lint vm-setup
	$(PY) -m pytest

# ruff (lint, then format) and mypy over the package, configured in pyproject.toml; any
# finding fails `make test` before a test runs.
LINT_STAMP := $(VENV)/.lint-installed

$(LINT_STAMP): requirements-lint.txt $(STAMP)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip install -q -r requirements-lint.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m ruff --version >/dev/null && $(PY) -m mypy --version >/dev/null
	touch $@

lint: setup $(LINT_STAMP)
	$(PY) -m ruff check sandboxer
	$(PY) -m ruff format --check sandboxer
	$(PY) -m mypy

# The VM stage's packages (qemu, debootstrap, ...): installed when missing, as root.
vm-setup:
	scripts/vm/setup.sh

# The VM suite through Vagrant itself: a private libvirtd, the local box, vagrant up
# (provisioning runs the in-guest suite), vagrant destroy.
vm-test: setup
	scripts/vm/vagrant-test.sh

demo: setup
	$(VENV)/bin/sandboxer demo

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip install -q -r requirements-bench.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import grpc, uvloop"
	touch $@

bench: setup $(BENCH_STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
