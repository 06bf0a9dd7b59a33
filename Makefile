# The README's two commands: `make run` (the whole stack locally) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run test venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.cfg setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -e .
	touch $@

run: venv
	$(BIN)/exploop up

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/dispatch.py

clean:
	rm -rf $(VENV) .exploop .pytest_cache
