# One command each: `make demo` sets everything up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, pinned: on a machine that carries the CPU wheel this takes it instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/distgpt train jobs/demo.toml

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/distgpt bench trainer

clean:
	rm -rf runs data .pytest_cache
