# Every target makes .venv when it is missing; nothing else is assumed but python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= gateway.toml

.PHONY: run test lint bench stubs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The gateway in front of the demo stub services; Ctrl-C stops both.
run: $(STAMP)
	@$(BIN)/filtergate stubs & stubs=$$!; \
	trap 'kill $$stubs 2>/dev/null' EXIT INT TERM; \
	$(BIN)/filtergate run -c $(CONFIG)

stubs: $(STAMP)
	$(BIN)/filtergate stubs

# Tests need a real redis-server; install it when it is missing.
.PHONY: redis
redis:
	@command -v redis-server >/dev/null 2>&1 || .ci/install-redis

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) redis lint
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	sh benchmarks/install-tools.sh $(BIN)/python
	$(BIN)/python -m benchmarks $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.chaincost
	$(if $(findstring --quick,$(BENCH_ARGS)),,$(BIN)/python -m benchmarks.instructions)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
