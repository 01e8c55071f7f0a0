# Set-up and everyday commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow bench docs docs-serve clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## train the default: Top-KAST 90/80 on MNIST-1D, offline
	$(BIN)/topkast train

test: $(STAMP)  ## the default test suite (fast)
	$(BIN)/python -m pytest

test-slow: $(STAMP)  ## also the long checks
	$(BIN)/python -m pytest -m ""

bench: $(STAMP)  ## benchmarks, results in bench/results/
	$(BIN)/python -m bench

# NO_MKDOCS_2_WARNING: the Material theme's banner about MkDocs 2, which says nothing about this site.
docs: $(STAMP)  ## the user's manual, built into site/; a broken link, page or anchor fails it
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)  ## the manual at http://127.0.0.1:8000, rebuilt as you edit
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) build dist site *.egg-info
