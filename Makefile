# Two entry points for a fresh machine with only python3: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/rlhflab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,parity]'
	touch $@

.PHONY: setup demo test test-slow lint lint-imports
setup: $(BIN)/rlhflab

demo: setup
	$(BIN)/rlhflab demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n 2 -q

# Real-process kill/resume matrix and other slow tests (about 3 minutes on 2 cores).
test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n 2 -q -m slow

lint: setup
	$(BIN)/ruff check .

# Import contracts (pyproject.toml, [tool.importlinter]): imports point downward only.
lint-imports: setup
	$(BIN)/lint-imports
