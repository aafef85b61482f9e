# Every target sets itself up on a fresh machine: a .venv, torch (the CPU wheel where no NVIDIA GPU is
# present), the package and its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.torch-moe-ops-installed
PYTEST_ARGS ?=

.PHONY: demo test test-cuda install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[test,hf]'
	touch $(STAMP)

install: $(STAMP)

# The HF drop-in table (needs the [hf] extra, installed above); DEMO_ARGS=--layer for the layer demo.
demo: $(STAMP)
	$(PY) -m torch_moe_ops demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
