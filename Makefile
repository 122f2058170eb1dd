# fused_attn — build, test and benchmark entry points.
#
#   make test                  set up the environment, then python -m pytest tests $(PYTEST_ARGS),
#                              then make test-sanitized
#   make test-sanitized        the C++ kernels' tests again under AddressSanitizer and UBSan
#                              (tests/run_sanitized.sh: the cpu backend's, and the cuda backend's on
#                              its CPU emulator)
#   make bench                 set up the environment, then python -m benchmarks.bench $(ARGS)
#                              (every suite: speed, memory, masked, decode, varlen, overhead; ARGS="--suite memory")
#   make bench-regression      pytest-benchmark timings: python -m pytest benchmarks/test_regression.py
#   make plots                 PNG plots of every CSV in benchmarks/results/ (installs matplotlib into
#                              .venv; the GPU machine has none, so its results are plotted elsewhere)
#   make env                   only set up the environment
#   make clean                 remove build artefacts (keeps .venv); make distclean also removes .venv
#
# Variables:
#   PYTEST_ARGS   extra pytest arguments (default: -q), e.g. make test PYTEST_ARGS="-q -k causal"
#   ARGS          extra benchmark arguments, e.g. make bench ARGS=--quick
#   PYTHON        use this interpreter as-is (no dependency installs), e.g. PYTHON=python3.12
#   BASE_PYTHON   interpreter used to create .venv (default: python3)
#
# How the Python environment is chosen (once, when make reads this file):
#   1. PYTHON=... given on the make command line -> used as-is (an inherited environment variable
#      named PYTHON is ignored on purpose: CI machines may have one that points to a bare python).
#   2. `python3 -c "import torch, triton, pytest"` works -> the system python3 is used as-is.
#      This is the GPU machine: CUDA torch/triton are preinstalled and there is NO package index,
#      so nothing may be downloaded there.
#   3. Otherwise (developer machines and CI: CPU-only, PyPI reachable) -> a local virtualenv .venv
#      is created if needed and the pinned requirements below are installed into it.
# In every case the package itself is installed editable with --no-build-isolation --no-deps
# (offline-safe: it builds against the torch already installed and fetches nothing), with
# FUSED_ATTN_NATIVE=1: a C++ build that fails fails make (a plain pip install goes on without the
# extension, setup.py), so the tests never run without the kernels unnoticed.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTEST_ARGS ?= -q
ARGS ?=
BASE_PYTHON ?= python3
VENV := .venv

# torch MUST stay pinned: torch==2.13.0 is the CPU build on local disk; a bare `torch` makes pip
# download a multi-GB CUDA build. setuptools>=70.1 is needed because the editable install runs
# without build isolation (and includes bdist_wheel, so no separate `wheel` package).
# transformers is only for tests/test_transformers.py (the attn_implementation="fused_attn"
# integration); the package never imports it on its own. It is installed on this venv route only:
# the system-python (GPU) route downloads nothing, and that test file skips there without it.
REQUIREMENTS := torch==2.13.0 triton==3.9.0 pytest pytest-benchmark ninja numpy setuptools>=70.1 \
                transformers==5.23.0

# Give JIT-built torch extensions their own directory: a build killed half-way leaves a stale lock
# in the shared default (~/.cache/torch_extensions) and later builds hang (shared/FACTS.md).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions

# --- environment detection -----------------------------------------------------------------
ifeq ($(origin PYTHON),command line)
  ENV_KIND := given
else ifeq ($(shell $(BASE_PYTHON) -c "import torch, triton, pytest" >/dev/null 2>&1 && echo yes),yes)
  ENV_KIND := system
  PYTHON := $(BASE_PYTHON)
else
  ENV_KIND := venv
  PYTHON := $(CURDIR)/$(VENV)/bin/python
endif

# The stamp records what was installed: the requirement list plus a hash of the files that define
# the package build, C++ sources included (the editable install compiles csrc/ into
# fused_attn/_native*.so). When neither changed, `make test` skips pip entirely (fast re-runs).
BUILD_FILES := setup.py pyproject.toml $(sort $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null))
INSTALL_KEY := $(REQUIREMENTS) | $(shell cat $(BUILD_FILES) 2>/dev/null | sha256sum | cut -c1-16)
ifeq ($(ENV_KIND),venv)
  STAMP := $(VENV)/.installed
else
  # Preinstalled interpreter: keep the stamp out of its installation, in build/ (ignored by git).
  STAMP := build/.installed-$(ENV_KIND)
  INSTALL_KEY := $(INSTALL_KEY) | $(shell command -v $(PYTHON) 2>/dev/null || echo $(PYTHON))
endif

# With a preinstalled interpreter the editable install may be refused (no pip / setuptools, or an
# "externally managed" system Python); the repo root on PYTHONPATH makes `import fused_attn` work
# regardless. (python -m from the repo root also puts it on sys.path; this covers subprocesses.)
ifneq ($(ENV_KIND),venv)
  export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
endif

.PHONY: test test-sanitized bench env info clean distclean

test: env
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-sanitized

# Its own pytest arguments: PYTEST_ARGS may select tests, and this run chooses its own.
test-sanitized: env
	bash tests/run_sanitized.sh $(PYTHON) -q

bench: env
	$(PYTHON) -m benchmarks.bench $(ARGS)

# Small pytest-benchmark timing suite: reports timings, asserts nothing about speed. Not collected by
# `make test` (pyproject.toml: testpaths = ["tests"]).
.PHONY: bench-regression
bench-regression: env
	$(PYTHON) -m pytest benchmarks/test_regression.py $(PYTEST_ARGS)

# matplotlib only for the plots: not a test or package dependency, installed on the venv route only.
.PHONY: plots
plots: env
	@if [ "$(ENV_KIND)" = venv ]; then $(PYTHON) -m pip install -q 'matplotlib'; fi
	$(PYTHON) -m benchmarks.plots $(ARGS)

info:
	@echo "environment: $(ENV_KIND)"
	@echo "python:      $(PYTHON)"
	@echo "stamp:       $(STAMP)"

# `env` is phony and always runs, but only does work when the stamp is missing or out of date.
env:
	@if [ "$$(cat $(STAMP) 2>/dev/null)" = "$(INSTALL_KEY)" ]; then \
	    echo "environment ($(ENV_KIND): $(PYTHON)) is up to date"; \
	else \
	    $(MAKE) --no-print-directory _install-$(ENV_KIND); \
	fi

# Written by the _install-* recipes as their last step (not in `env`'s own recipe: a line that
# calls $(MAKE) is executed even by `make -n`, which would mark a dry run as installed).
WRITE_STAMP = @mkdir -p $(dir $(STAMP)) && echo "$(INSTALL_KEY)" > $(STAMP)

# Fresh CPU machine / CI: make .venv (only if it has no working python), install the pinned
# requirements (a no-op for pip when they are already there), then the package itself.
_install-venv:
	@if ! $(VENV)/bin/python -c "import sys" >/dev/null 2>&1; then \
	    echo "creating virtualenv $(VENV) with $(BASE_PYTHON)"; \
	    rm -rf $(VENV) && $(BASE_PYTHON) -m venv $(VENV); \
	fi
	$(PYTHON) -m pip install $(foreach r,$(REQUIREMENTS),'$(r)')
	FUSED_ATTN_NATIVE=1 $(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	$(WRITE_STAMP)

# GPU machine / PYTHON=...: use what is installed, download nothing. Try the offline editable
# install; if it fails, PYTHONPATH (set above) still makes the package importable.
_install-system _install-given:
	@$(PYTHON) -c "import torch, triton, pytest" || { \
	    echo "error: $(PYTHON) cannot import torch, triton and pytest" >&2; exit 1; }
	@FUSED_ATTN_NATIVE=1 $(PYTHON) -m pip install --no-build-isolation --no-deps --no-index -e . \
	    || echo "note: editable install failed; using PYTHONPATH=$(CURDIR) instead"
	$(WRITE_STAMP)

# Also forgets the install stamp: the editable install's compiled extension is deleted here, and
# the next `make test` must rebuild it.
clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
	rm -f $(VENV)/.installed
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find fused_attn -name '*.so' -delete 2>/dev/null || true

distclean: clean
	rm -rf $(VENV)
