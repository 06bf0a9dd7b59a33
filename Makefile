# The README's two commands: `make run` (the whole stack locally) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run test test-unit lint lock venv bench clean

venv: $(VENV)/.installed

# The compiled locks (every transitive dependency, with hashes), then the package on top.
$(VENV)/.installed: requirements.txt requirements-test.txt setup.cfg setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

run: venv
	$(BIN)/exploop up

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Pure logic only (no child processes): the loop while coding, in seconds.
test-unit: venv
	$(BIN)/python -m pytest -q tests/unit

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Recompile the locks after editing requirements.in / requirements-test.in.
lock:
	$(BIN)/pip install -q uv==0.13.9
	$(BIN)/uv pip compile requirements.in --generate-hashes --python-version 3.11 -q -o requirements.txt
	$(BIN)/uv pip compile requirements-test.in --generate-hashes --python-version 3.11 -q -o requirements-test.txt

bench: venv
	$(BIN)/python bench/dispatch.py

clean:
	rm -rf $(VENV) .exploop .pytest_cache
