# Two commands do all set-up on a fresh machine (README): `make generate` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/glmimage: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this exact CPU wheel is cached on the project's machines.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/glmimage

generate: install
	$(BIN)/glmimage generate "a green triangle to the left of a yellow star" -o out/example.png

test: install
	$(BIN)/python -m pytest -q tests

.PHONY: install generate test
