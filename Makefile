# Two entry points that work from a fresh clone with nothing but Python >= 3.10:
#   make demo   the main job (see README)
#   make test   the test suite (what CI runs)
# Both create or reuse .venv.  torch is reused when the system Python already has it
# (the venv sees system site packages); otherwise torch==2.13.0 is installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)

.PHONY: venv demo test lint clean

$(STAMP):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install --no-build-isolation -e ".[dev,hf]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dft_kernels.train.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check dft_kernels tests

clean:
	rm -rf $(VENV) build *.egg-info

# The trainer integrations end to end (LLaMA-Factory, axolotl, TRL, ms-swift): one pinned virtual
# environment per trainer, cached in .integration/, a smoke test each, a table. Not part of `make test`
# (it installs several GB per trainer; see docs/integrations.md). Options: INTEGRATION_ARGS="--only trl".
.PHONY: integration
integration:
	$(PYTHON) -m integration.run $(INTEGRATION_ARGS)
