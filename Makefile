# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs gpt2lab, runs the main job
#   make test   creates .venv, installs gpt2lab[dev], runs the tests
# PyTorch: TORCH_SPEC pins the CPU build that lies on this machine's disk. With a GPU, install the
# CUDA build you want instead, e.g. `make demo TORCH_SPEC=torch` or
# `make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-interop lint format bench bench-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e ".[dev]"
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(VENV)/bin/gpt2lab demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

# our exports run by other runtimes; llama-cpp-python compiles llama.cpp (minutes) on install
test-interop: $(VENV)/.installed-dev
	$(PIP) -e ".[interop]"
	$(PY) -m pytest -m interop $(PYTEST_ARGS)

# the GPU check (bench/gpu.py): training, DDP, FSDP, sampling and eval on an NVIDIA machine, one
# JSON report + a table; refuses on a CPU (BENCH_GPU_ARGS=--dry-run checks its plumbing there)
BENCH_GPU_ARGS ?=
bench-gpu: $(VENV)/.installed-dev
	$(PY) bench/gpu.py $(BENCH_GPU_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
