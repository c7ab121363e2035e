# Two commands on a fresh machine with only python3:  make demo   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench install clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
