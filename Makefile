# asymoe_train: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# the demo data set: easy_vqa, or scenes (data_recipes/<DATA>.py builds data/<DATA>)
DATA ?= easy_vqa
ABLATION_SEEDS ?= 0 1 2
export OMP_NUM_THREADS ?= 2
export DS_ACCELERATOR ?= cpu
export WANDB_SILENT := true

.PHONY: help install data data-scenes train test lint bench ablation amess clean

help: ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU machines: the exact CPU torch wheel first, so no dependency pulls a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch>=2.4"; \
	else $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install torch (CPU wheel on CPU machines), the package and dev tools

data/$(DATA)/manifest.json: $(VENV)/.installed data_recipes/$(DATA).py data_recipes/recipe_common.py
	$(PY) data_recipes/$(DATA).py --out data/$(DATA)

data: data/$(DATA)/manifest.json ## build the demo shards and tokenizer under data/$(DATA) (DATA=easy_vqa, or DATA=scenes)

data-scenes: ## render the multi-object scenes (captions, QA, POPE probes) under data/scenes: make data DATA=scenes
	$(MAKE) data DATA=scenes

train: install data ## run the two-stage CPU demo (experiment=demo) end to end; ARGS="..." adds overrides
	$(VENV)/bin/asymoe-train experiment=demo $(ARGS)

test: install ## run the whole test suite (unit, integration, 2-process distributed on CPU)
	$(PY) -m pytest tests -q $(ARGS)

bench: install data ## MoE block, demo and LLaVA-shaped packed training-step throughput (bf16 and MFU on a CUDA GPU); appends to docs/benchmarks.md
	for tokens in 1024 4096 16384; do for hidden in 256 512; do \
		$(PY) benchmarks/moe_block.py --tokens $$tokens --hidden $$hidden --deepspeed-capacity 1.0,1.5 --repeats 7 \
			--out docs/benchmarks.md || exit 1; \
	done; done
	@# The DeepSpeed comparison: vanilla (E=4, top-2) against the dense FFN and DeepSpeed's MoE layer, with the balanced
	@# random router and a skewed one (0.33 nats: DeepSpeed drops about 14 % of assignments at capacity factor 1.0).
	for skew in 0 0.33; do \
		$(PY) benchmarks/moe_block.py --tokens 4096 --hidden 512 --experts 4 --variants vanilla \
			--deepspeed-capacity 1.0,1.5 --router-skew $$skew --repeats 15 --out docs/benchmarks.md || exit 1; \
	done
	$(PY) benchmarks/train_step.py --out docs/benchmarks.md
	$(PY) benchmarks/train_step.py --shape llava --steps 30 --log-every 10 --out docs/benchmarks.md
	@# With a CUDA GPU: the blocks in bf16 at the shapes of train_step.py's ~0.5B-activated GPU model (D=1536,
	@# F=3072) and that model's training step, each with its MFU against the GPU's datasheet bf16 peak; and the
	@# LLaVA-shaped packed step (576 image tokens, 32-1024 text tokens, rows of 4096) at about 1B activated.
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		for tokens in 4096 16384; do \
			$(PY) benchmarks/moe_block.py --tokens $$tokens --hidden 1536 --ffn-mult 2 --device cuda --dtype bf16 \
				--out docs/benchmarks.md || exit 1; \
		done; \
		$(PY) benchmarks/train_step.py --device cuda --out docs/benchmarks.md || exit 1; \
		$(PY) benchmarks/train_step.py --shape llava --device cuda --steps 30 --log-every 10 \
			--out docs/benchmarks.md || exit 1; \
	else echo "make bench: no CUDA GPU here, so no bf16 GPU tables"; fi

ablation: install data ## the six variants x 3 seeds on a smaller demo budget (about 25 minutes on 2 CPU cores; DATA=scenes: the scenes budget, with POPE, about an hour), then docs/results.md (DATA=scenes: docs/results_scenes.md)
	$(PY) -m pip install -q -e ".[report]"
	$(PY) benchmarks/ablation.py --experiment $(if $(filter scenes,$(DATA)),ablation_scenes,ablation) \
		--seeds $(ABLATION_SEEDS) --out docs/results$(if $(filter scenes,$(DATA)),_scenes).md -- $(ARGS)

amess: install data ## A-MESS classification demo with and without semantic synchronization x 3 seeds, then its docs/results.md table
	$(PY) benchmarks/amess.py --seeds $(ABLATION_SEEDS) --out docs/results.md -- $(ARGS)

lint: install ## ruff over the package, recipes and tests
	$(VENV)/bin/ruff check asymoe_train data_recipes tests benchmarks

clean: ## remove outputs and the demo shards (keeps .venv)
	rm -rf outputs multirun data/$(DATA)
