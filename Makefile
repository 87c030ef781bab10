# Two entry points that work from a fresh clone with nothing but Python >= 3.10:
#   make demo   the main job (see README)
#   make test   the test suite (CI runs it, with make lint and make test-min)
# Both create or reuse .venv, an isolated venv (no system site-packages).  A torch already
# installed for $(PYTHON) (a GPU box's CUDA torch) is reused: tools/link_system_torch.py links
# it and its requirements, and nothing else, into the venv.  Otherwise $(TORCH) is installed.
# The build requirement (setuptools) is installed explicitly, because the project is installed
# with --no-build-isolation (so that setup.py sees torch and can build the CUDA extension).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,hf,train
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: venv demo test lint clean venv-min test-min

$(STAMP):
	@if grep -qs "include-system-site-packages = true" $(VENV)/pyvenv.cfg; then \
	    echo "note: $(VENV) sees the system site-packages (made by an older Makefile); make clean rebuilds it isolated" >&2; fi
	$(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/link_system_torch.py $(VENV)
	$(PY) -m pip install "setuptools>=77"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install --no-build-isolation -e ".[$(EXTRAS)]"
	@# pip hides the build's output: repeat setup.py's warning when the optional CUDA extension failed
	@if [ -f dft_kernels/_C.build-error.txt ]; then echo "dft_kernels: WARNING: installed without the CUDA \
	extension (the cuda backend will try to build it on first use): $$(cat dft_kernels/_C.build-error.txt)" >&2; fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dft_kernels.train.demo

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check dft_kernels tests bench tools integration setup.py

# The minimum stack that pyproject.toml and the README declare, in a venv of its own: torch
# $(MIN_TORCH) from PyPI (a CUDA build, several GB of nvidia wheels, that runs on the CPU too), the
# Triton that torch release pins, numpy < 2.4 (older than the default stack's 2.4 or 2.5).  The
# versions are pinned on both pip calls, so that the project's own requirements cannot move them,
# and printed.  DFT_KERNELS_BUILD_CUDA=0: the editable install shares dft_kernels/ with .venv, so
# an extension (or its failure record) built here against torch $(MIN_TORCH) must not land there.
# MIN_PYTHON=/path/to/python3.10 runs it on another Python (make test-min MIN_PYTHON=...).
MIN_PYTHON ?= $(PYTHON)
MIN_VENV ?= .venv-min
MIN_TORCH ?= 2.11.0
MIN_TRITON ?= 3.6.0
MIN_PINS := torch==$(MIN_TORCH) triton==$(MIN_TRITON) "numpy<2.4"
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.installed-$(shell cat pyproject.toml setup.py Makefile | cksum | cut -d' ' -f1)

$(MIN_STAMP):
	$(MIN_PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install "setuptools>=77" $(MIN_PINS)
	DFT_KERNELS_BUILD_CUDA=0 $(MIN_PY) -m pip install --no-build-isolation -e ".[$(EXTRAS)]" $(MIN_PINS)
	$(MIN_PY) -c "import sys, numpy, torch, triton; print('minimum stack: Python', sys.version.split()[0], \
	    '| torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
	touch $(MIN_STAMP)

venv-min: $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(MIN_VENV) build dist *.egg-info dft_kernels/_C*.so dft_kernels/_C.build-error.txt

# The trainer integrations end to end (LLaMA-Factory, axolotl, TRL, ms-swift): one pinned virtual
# environment per trainer, cached in .integration/, a smoke test each, a table. Not part of `make test`
# (it installs several GB per trainer; see docs/integrations.md). Options: INTEGRATION_ARGS="--only trl".
.PHONY: integration
integration:
	$(PYTHON) -m integration.run $(INTEGRATION_ARGS)

# The GPU verdict on a CUDA machine without network, in under 10 minutes (docs/benchmarks.md,
# "GPU check"): offline editable install, gpu tests, CUDA extension, Llama-3-8B head benchmark.
# Uses $(PYTHON) as is (no venv: nothing to download).  GPU_CHECK_ARGS="--out DIR" or "--dry-run".
.PHONY: gpu-check
gpu-check:
	$(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

# A long random bug hunt of tests/test_fuzz.py (not part of `make test`, whose examples are
# derandomized): FUZZ_EXAMPLES per backend, Hypothesis's "hunt" profile, a fresh seed, printed;
# `make fuzz SEED=N` replays a hunt.  A failure found goes into test_fuzz.py's FOUND (docs/design.md, Tests).
FUZZ_EXAMPLES ?= 1000
.PHONY: fuzz
fuzz: $(STAMP)
	@seed=$(SEED); seed=$${seed:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; echo "make fuzz: SEED=$$seed"; \
	DFT_KERNELS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py \
	    --hypothesis-profile=hunt --hypothesis-seed=$$seed --seed=$$seed

# The codegen checks (tests/codegen.py: the Triton kernels compiled for sm_90 and sm_80 without a GPU;
# no spill, no local memory, vector accesses) under each Triton that a CUDA torch wheel pins: torch 2.11
# pins 3.6, 2.13 pins 3.7, 2.14 pins 3.8, while `make test` gets the newest (CPU torch pulls no Triton).
# One small venv per version in $(CODEGEN_STACKS)/triton-X: this venv's torch linked in
# (tools/link_system_torch.py), its own triton, pytest and numpy (< 2.4: Triton 3.6's interpreter, which
# conftest.py probes at collection, fails with newer); kept while it has that Triton.
CODEGEN_TRITONS ?= 3.6.0 3.7.1 3.8.0
CODEGEN_STACKS ?= .codegen-stacks
CODEGEN_TESTS := tests/backends/test_triton_codegen.py tests/backends/test_triton_parallel_codegen.py \
    tests/backends/test_logprobs_codegen.py tests/backends/test_pair_codegen.py tests/experimental/test_fused_head.py
.PHONY: codegen-stacks
codegen-stacks: $(STAMP)
	@set -e; for v in $(CODEGEN_TRITONS); do \
	    d=$(CODEGEN_STACKS)/triton-$$v; \
	    if ! $$d/bin/python -c "import sys, triton; sys.exit(triton.__version__ != '$$v')" 2>/dev/null; then \
	        rm -rf $$d; $(PYTHON) -m venv $$d; $(PY) tools/link_system_torch.py $$d; \
	        $$d/bin/python -m pip install -q "triton==$$v" pytest "numpy<2.4"; fi; \
	    echo "== codegen checks, triton $$v"; \
	    $$d/bin/python -m pytest -q -p no:cacheprovider -k codegen $(CODEGEN_TESTS); \
	done
