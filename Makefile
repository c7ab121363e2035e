# Two commands on a fresh machine with only python3:  make demo   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-stamp

DOCS_STAMP := $(VENV)/.docs-stamp

.PHONY: demo test test-fast lint bench mutants install clean browser docs

# What the demo needs (the cli, data and plot extras): `make demo` installs only this.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

# The tests, linters and interop twins (flax, equinox) on top, into the same .venv.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# The main job: the seed's worked example, every number of the chain rule, then a real network.
demo: $(STAMP)
	$(BIN)/jaxbp trace
	$(BIN)/jaxbp train

# Every test (CI runs this through .ci/run); `make lint` is ruff and mypy.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

# The quick loop while working: everything not marked slow. It keeps XLA's compiled programs
# between runs (JAX's persistent compilation cache, under .pytest_cache): a second run compiles
# next to nothing (measured on 2 cores: 53-60 s warm, 2-4 min for a first run); the cache is
# capped at 500 MB.
test-fast: $(TEST_STAMP)
	JAX_COMPILATION_CACHE_DIR=.pytest_cache/jax-compilation \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_COMPILATION_CACHE_MAX_SIZE=500000000 \
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: $(TEST_STAMP)
	$(BIN)/ruff check jaxbp tests benchmarks examples
	$(BIN)/ruff format --check jaxbp tests benchmarks examples
	$(BIN)/mypy

bench: $(TEST_STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m benchmarks
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m benchmarks.verify_cost

# Before a release: plant single-point bugs in every backward pass and loss gradient and print
# which check catches each (benchmarks/mutants.py); exit 1 while a non-equivalent one survives.
mutants: $(TEST_STAMP)
	$(BIN)/python -m benchmarks.mutants

# The browser tests/test_browser.py drives: Debian's chromium (Playwright's own download needs a
# host this network cannot reach). Needs root, as on CI; without it those tests are skipped.
browser:
	test -x /usr/bin/chromium || { apt-get update -q && \
		apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; }

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

# The documentation site (mkdocs-material, mkdocstrings) in site/, with the interactive trace
# pages under docs/pages/ (generated, not committed); --strict: a broken link fails the build.
docs: $(DOCS_STAMP)
	mkdir -p docs/pages
	$(BIN)/jaxbp trace --format html --out docs/pages/seed.html
	$(BIN)/jaxbp trace --steps 20 --format html --out docs/pages/seed_steps.html
	$(BIN)/jaxbp trace --example conv --format html --out docs/pages/conv.html
	$(BIN)/jaxbp trace --example attention --format html --out docs/pages/attention.html
	$(BIN)/jaxbp trace --example gru --format html --out docs/pages/gru.html
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs site docs/pages
