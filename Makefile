# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned to the CPU wheel first so that no
# dependency pulls a multi-GB CUDA build (see DEVELOPERS notes in README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/labeldiff: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/labeldiff

.PHONY: install demo test
install: $(BIN)/labeldiff

demo: $(BIN)/labeldiff
	$(BIN)/labeldiff demo --out labeldiff-demo --overwrite

test: $(BIN)/labeldiff
	$(BIN)/python -m pytest -q
