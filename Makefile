# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-slow fuzz bench bench-psp bench-mh bench-local attacks faults lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(VENV)/.runtime $(VENV)/.bench $@

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $(VENV)/.runtime $@

demo: $(VENV)/.runtime
	$(BIN)/confmig demo

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests
	$(BIN)/mypy --strict src
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

test-slow: $(VENV)/.dev
	$(BIN)/pytest -m slow

# Hostile input (tests marked fuzz) with CONFMIG_FUZZ_FACTOR (default 50) times the examples
# and random seeds; a failing example is kept in .hypothesis/ and replayed first next time.
fuzz: $(VENV)/.dev
	CONFMIG_FUZZ=1 $(BIN)/pytest -m fuzz --timeout 3600

bench: $(VENV)/.bench
	$(BIN)/confmig bench --save benchmarks/

bench-psp: $(VENV)/.bench
	$(BIN)/confmig bench --suite psp --save benchmarks/

bench-mh: $(VENV)/.bench
	$(BIN)/confmig bench --suite mh --save benchmarks/

bench-local: $(VENV)/.bench
	$(BIN)/confmig bench --suite local --save benchmarks/

attacks: $(VENV)/.bench
	$(BIN)/confmig attacks --save benchmarks/

faults: $(VENV)/.bench
	$(BIN)/confmig faults --save benchmarks/

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
