# The two commands a newcomer needs:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test test-fast mutation lint bench clean

setup: $(VENV)/.installed

# torch first, pinned, where the venv has none: an unpinned torch would pull GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: setup
	$(BIN)/fedtune run

# The layer contracts (import-linter, pyproject.toml), then every test, the slow multi-process
# gRPC ones included (what CI runs).
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=15

# The quick loop while editing: everything but the tests marked slow.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Mutation testing of the federated core (scripts/mutation.py; long: run it in the background).
mutation: setup
	$(BIN)/python scripts/mutation.py

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
