# rlft — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision as a matching pair (open_clip, for HPSv2, needs torchvision)
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install install-browser demo studio test lint format bench toy-weights toy-flow-weights toy-quality clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv with torch + torchvision (override TORCH="torch==... torchvision==...") and rlft[dev]

# the studio's browser test drives Debian's chromium through playwright (playwright's own browser
# download needs a host an offline install cannot reach); without root, sudo is asked for
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
install-browser: ## install Debian's chromium for the studio's browser test (apt)
	@command -v chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y -q chromium >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null)
	@chromium --version

demo: $(STAMP) ## run the embedded default finetuning (CPU, offline, a few minutes)
	$(BIN)/python -m rlft run_name=demo-$$(date +%Y%m%d-%H%M%S)

studio: $(STAMP) ## the feedback studio on http://127.0.0.1:7860 (paint like/dislike on a sample, PXPO trains on it)
	$(BIN)/python -m rlft.studio

# the suite in JOBS worker processes (pytest-xdist, one test file per worker at a time), one thread
# each unless OMP_NUM_THREADS says otherwise: 13-18 min on 2 cores (JOBS=1: one process)
JOBS ?= 2
test: $(STAMP) ## run the test suite (offline, CPU; JOBS=2 workers)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile --durations=12

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check rlft tests experiments
	$(BIN)/ruff format --check rlft tests experiments

format: $(STAMP) ## ruff format + autofix
	$(BIN)/ruff format rlft tests experiments
	$(BIN)/ruff check --fix rlft tests experiments

bench: $(STAMP) ## print speed and memory figures (tiny_random on this machine)
	$(BIN)/python -m rlft.bench --efficiency 24

toy-weights: $(STAMP) ## re-train both toy models (UNet, then the flow model on its VAE) on rendered scenes (hours on 2 cores, resumable)
	$(BIN)/python -m rlft.toy.pretrain --out rlft/toy/weights
	$(MAKE) toy-flow-weights

toy-flow-weights: $(STAMP) ## train the flow toy model (SD3 architecture, rlft/toy/flow_weights) on the UNet toy's VAE (resumable)
	$(BIN)/python -m rlft.toy.pretrain_flow --out rlft/toy/flow_weights --vae-from rlft/toy/weights

# the commit whose rlft/toy/weights the shipped toy model is compared with
TOY_PREVIOUS ?= 96e993d
toy-quality: $(STAMP) ## both toy models' quality per split and attribute beside the previous UNet toy (same prompts, noise)
	rm -rf outputs/toy_previous && mkdir -p outputs/toy_previous
	git archive $(TOY_PREVIOUS) rlft/toy/weights | tar -x -C outputs/toy_previous
	$(BIN)/python -m rlft.toy.quality outputs/toy_previous/rlft/toy/weights rlft/toy/weights rlft/toy/flow_weights \
		--grid outputs/toy_quality.png

clean: ## remove the virtual environment and run outputs
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
