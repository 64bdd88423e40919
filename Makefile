# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): scripts/bootstrap.sh requirements.lock pyproject.toml
	scripts/bootstrap.sh

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/sandboxer demo

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
