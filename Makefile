# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs moelab (with its test extras) into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-fast install install-bench bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel of this machine kind, so that resolving
	# the other packages never pulls the multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The benchmarks' external peers (llama.cpp, built from source: several minutes).
install-bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"

demo: $(STAMP)
	$(BIN)/moelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked @pytest.mark.slow (> ~3 s each: compile, subprocess, demo).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.moe_layer --json runs/bench/moe_layer.json

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
