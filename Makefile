# Two entry points that work from a fresh clone with nothing but Python >= 3.10:
#   make demo   the main job (see README)
#   make test   the test suite (what CI runs)
# Both create or reuse .venv, an isolated venv (no system site-packages).  A torch already
# installed for $(PYTHON) (a GPU box's CUDA torch) is reused: tools/link_system_torch.py links
# it and its requirements, and nothing else, into the venv.  Otherwise $(TORCH) is installed.
# The build requirement (setuptools) is installed explicitly, because the project is installed
# with --no-build-isolation (so that setup.py sees torch and can build the CUDA extension).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,hf,train
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: venv demo test lint clean

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
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check dft_kernels tests

clean:
	rm -rf $(VENV) build dist *.egg-info dft_kernels/_C*.so dft_kernels/_C.build-error.txt

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

# The codegen checks (tests/codegen.py: the Triton kernels compiled for sm_90 and sm_80 without a GPU;
# no spill, no local memory, vector accesses) under each Triton that a CUDA torch wheel pins: torch 2.11
# pins 3.6, 2.13 pins 3.7, 2.14 pins 3.8, while `make test` gets the newest (CPU torch pulls no Triton).
# One small venv per version in $(CODEGEN_STACKS)/triton-X: this venv's torch linked in
# (tools/link_system_torch.py), its own triton, pytest and numpy (< 2.4: Triton 3.6's interpreter, which
# conftest.py probes at collection, fails with newer); kept while it has that Triton.
CODEGEN_TRITONS ?= 3.6.0 3.7.1 3.8.0
CODEGEN_STACKS ?= .codegen-stacks
CODEGEN_TESTS := tests/test_triton_codegen.py tests/test_triton_parallel_codegen.py tests/test_fused_gemm.py
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
