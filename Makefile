# Set-up and everyday commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow bench clean

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

clean:
	rm -rf $(VENV) build dist *.egg-info
