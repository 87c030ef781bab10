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

# A long random bug hunt of tests/test_fuzz.py (not part of `make test`, whose examples are
# derandomized): FUZZ_EXAMPLES per backend, Hypothesis's "hunt" profile, a fresh seed, printed;
# `make fuzz SEED=N` replays a hunt.  A failure found goes into test_fuzz.py's FOUND (docs/design.md, Tests).
FUZZ_EXAMPLES ?= 1000
.PHONY: fuzz
fuzz: $(STAMP)
	@seed=$(SEED); seed=$${seed:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; echo "make fuzz: SEED=$$seed"; \
	DFT_KERNELS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py \
	    --hypothesis-profile=hunt --hypothesis-seed=$$seed --seed=$$seed
