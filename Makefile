# The two set-up-free commands: `make demo` and `make test`. Both bootstrap uv and the locked env.
SHELL := /bin/bash
# Resolved by the shell on each line, so a uv installed by `setup` is found by the next line.
UV = "$$(command -v uv || echo $$HOME/.local/bin/uv)"
PYTEST_ARGS ?=
# Ray's `uv run` support would re-create the uv environment inside every worker's working
# directory (seconds per worker start); locally every worker already runs this .venv's python.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0

.PHONY: setup demo test chaos bench clean

setup:
	@command -v uv >/dev/null 2>&1 || [ -x "$$HOME/.local/bin/uv" ] || python3 -m pip install --quiet uv
	$(UV) sync --frozen

demo: setup
	$(UV) run --frozen python jobs/pretrain.py

# Everything but the few runs of several minutes (marker `long`), which `make chaos` runs.
test: setup
	$(UV) run --frozen pytest -m "not long" $(PYTEST_ARGS)

# The fault-injection tests (marker `chaos`; also part of `make test`): kills, S3 faults, NaN batches;
# and the `long` ones: the two-node elastic run that loses a node and grows back.
chaos: setup
	$(UV) run --frozen pytest -m "chaos or long" $(PYTEST_ARGS)

bench: setup
	mkdir -p runs/bench
	$(UV) run --frozen platform bench data --quick --out runs/bench/data.json
	$(UV) run --frozen platform bench moe --quick --out runs/bench/moe.json
	$(UV) run --frozen platform bench train --quick --out runs/bench/train.json

clean:
	rm -rf runs .pytest_cache
