# The README's two commands: `make run` (set up + the embedded default job) and `make test`.
# `make test-fast`: only tests marked `fast` (in-process: config, data, metrics, estimator, compat,
# CLI errors), about 30 s on 2 cores, for the edit-test cycle. `make test` (what CI runs) is the whole suite.
VENV ?= .venv
# JIT-built DeepSpeed ops (shm comm, CPU Adam) are cached outside the checkout so later runs reuse them.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/engine/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
# the tensor x pipeline parallel test needs 4 processes: slow on 2 cores (~1 min) but worth running
export ENGINE_TEST_4PROC ?= 1

.PHONY: setup run test test-fast
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/engine launch

test: setup
	$(VENV)/bin/python -m pytest -q tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m fast --durations=5 tests
