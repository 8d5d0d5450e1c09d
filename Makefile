# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs moelab (with its test extras) into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-fast install install-bench bench lint clean browser

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

# The playground's browser tests drive the system Chromium (selenium + chromedriver, no
# browser download): installed from Debian when missing and we are root with apt-get;
# otherwise say why not (those tests then skip with the reason).
browser:
	@if command -v chromedriver >/dev/null 2>&1; then \
		echo "browser: $$(chromedriver --version | head -1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "browser: installing chromium + chromium-driver (Debian) for the playground's browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
		|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null) \
		|| echo "browser: apt-get could not install chromium; the browser tests will skip"; \
	else \
		echo "browser: no chromedriver, and not root with apt-get: the playground's browser tests will skip"; \
	fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Everything but the tests marked @pytest.mark.slow (> ~3 s each: compile, subprocess, demo).
test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.moe_layer --json runs/bench/moe_layer.json

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
