# Two commands on a fresh machine with only python3:  make demo   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the seed's worked example, every number of the chain rule, then a real network.
demo: $(STAMP)
	$(BIN)/jaxbp trace
	$(BIN)/jaxbp train

# Every test (CI runs this through .ci/run); `make lint` is ruff and mypy.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

# The quick loop while working: everything not marked slow. It keeps XLA's compiled programs
# between runs (JAX's persistent compilation cache, under .pytest_cache): a second run compiles
# next to nothing (measured on 2 cores: 53-60 s warm, 2-4 min for a first run); the cache is
# capped at 500 MB.
test-fast: $(STAMP)
	JAX_COMPILATION_CACHE_DIR=.pytest_cache/jax-compilation \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_COMPILATION_CACHE_MAX_SIZE=500000000 \
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check jaxbp tests benchmarks examples
	$(BIN)/ruff format --check jaxbp tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
