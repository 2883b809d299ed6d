# Set-up and checks. `make test` works on a fresh clone: it creates .venv, installs, lints and tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint typecheck pytest run clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,train,serve]'
# Test oracles for the RL losses (tests/train/rl_oracles.py loads their source files by path).
# --no-deps and not in pyproject's dev extras: they would pull torchao, datasets, accelerate, ...
	$(BIN)/python -m pip install -q --no-deps torchtune==0.6.1 trl==1.16.0
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy src/llama2

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

test: lint pytest

run: $(STAMP)
	$(BIN)/llama2 generate --prompt "ROMEO:" --max-new-tokens 120 --seed 1

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
