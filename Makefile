# The README's two commands: `make run` (set up + the embedded default job) and `make test`.
VENV ?= .venv
# JIT-built DeepSpeed ops (shm comm, CPU Adam) are cached outside the checkout so later runs reuse them.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/engine/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/engine launch

test: setup
	$(VENV)/bin/python -m pytest -q tests
