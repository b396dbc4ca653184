# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what dsdnode needs (system packages included) on first use.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# test files run on TEST_WORKERS processes at once (pytest-xdist, a file per worker so module swarms are
# shared): most of a swarm test's time is waiting on emulated links and timeouts, not computing
TEST_WORKERS ?= 3

.PHONY: install test test-fast demo bench bench-membership clean

$(STAMP): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: any other version pulls several GB of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 -m "not heavy" $(PYTEST_ARGS)

demo: install
	$(BIN)/dsdnode demo

bench: install
	$(BIN)/dsdnode bench

# membership at scale: real peers in network namespaces on several /24s (root); MEMBERSHIP_ARGS sizes it
# (the default is CI-sized: --budget-s ends its parts early so that it takes about 4 minutes)
MEMBERSHIP_ARGS ?= --peers 24 --servers 4 --departures 16 --trials 8 --lookups 20 --budget-s 240
bench-membership: install
	PYTHONPATH=$(CURDIR) $(BIN)/python scripts/membership_scale.py $(MEMBERSHIP_ARGS) --out bench-results/membership/latest.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
