# Two commands set everything up on a fresh machine:
#   make demo   install (CPU torch pinned) and compress the built-in smollm2-135m, print the report
#   make test   install and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
# A CPU build of torch: from a local wheel directory if the machine has one, otherwise from
# PyTorch's CPU index (never the multi-GB CUDA build on a machine without a GPU).
TORCH_SRC := $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)

DEMO_OUT ?= out/smollm2-135m-w4a16-gptq-g64

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) $(TORCH_SRC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/llmpress compress smollm2-135m --recipe w4a16-gptq --group-size 64 -o $(DEMO_OUT) --overwrite --eval --json $(DEMO_OUT).json

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) out .pytest_cache
