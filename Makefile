# Every target sets itself up on a fresh machine: a .venv, torch (the CPU wheel where no NVIDIA GPU is
# present), the package and its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.torch-moe-ops-installed
PYTEST_ARGS ?=

# test-hf-oldest: a second venv with transformers at the lower bound of pyproject.toml's [hf] extra (read from
# there: pyproject.toml is the one home of the version ranges) running the tests that use transformers.
HF_OLDEST_VENV ?= .venv-hf-oldest
HF_OLDEST_PY := $(HF_OLDEST_VENV)/bin/python
HF_OLDEST_STAMP := $(HF_OLDEST_VENV)/.torch-moe-ops-installed
HF_LOWER = $(shell sed -n 's/^hf = \[.*"transformers>=\([0-9][0-9.]*\).*/\1/p' pyproject.toml)
HF_TESTS ?= tests/integrations tests/checkpoint/test_layouts.py tests/test_doc_examples.py

.PHONY: demo test test-cuda test-hf-oldest install clean

# $(call setup,VENV,EXTRA): VENV with torch (the CPU wheel TORCH_CPU where no NVIDIA GPU is present) and this
# package with its [test,hf] extras, installed together with the EXTRA requirements (one resolve).
define setup
test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
$(1)/bin/python -m pip install -q --upgrade pip
@if $(1)/bin/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(1)/bin/python -m pip install -q torch; \
else $(1)/bin/python -m pip install -q $(TORCH_CPU); fi
$(1)/bin/python -m pip install -q -e '.[test,hf]' $(2)
endef

$(STAMP): pyproject.toml
	$(call setup,$(VENV))
	touch $(STAMP)

$(HF_OLDEST_STAMP): pyproject.toml
	@test -n "$(HF_LOWER)" || { echo "no transformers>= lower bound in pyproject.toml's hf extra" >&2; exit 1; }
	$(call setup,$(HF_OLDEST_VENV),'transformers==$(HF_LOWER)')
	$(HF_OLDEST_PY) -c "import transformers as t; v = t.__version__; print('transformers', v); assert v.split('.')[:2] == '$(HF_LOWER)'.split('.')[:2], v"
	touch $(HF_OLDEST_STAMP)

install: $(STAMP)

# The HF drop-in table (needs the [hf] extra, installed above); DEMO_ARGS=--layer for the layer demo.
demo: $(STAMP)
	$(PY) -m torch_moe_ops demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

# The transformers integration against the oldest transformers pyproject.toml allows (make test: the newest).
test-hf-oldest: $(HF_OLDEST_STAMP)
	$(HF_OLDEST_PY) -m pytest -q -n 2 $(HF_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(HF_OLDEST_VENV) build *.egg-info .pytest_cache
