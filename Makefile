# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit promtool bench bench-full bench-steady clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/balances demo

lint: $(STAMP)
	$(BIN)/ruff check app tests bench celeryconfig.py
	$(BIN)/ruff format --check app tests bench celeryconfig.py

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# promtool (alert rule tests) comes from Debian's `prometheus` package; installed when missing.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends prometheus >/dev/null; } || echo "warning: could not install promtool"

test: lint typecheck promtool unit

# bench: the quick benchmark (a few minutes); bench-full (about eight minutes): the targets' full size.
bench: $(STAMP)
	$(BIN)/python -m bench.nightly_bench
	$(BIN)/python -m bench.webhook_bench

bench-full: $(STAMP)
	$(BIN)/python -m bench.nightly_bench --accounts 100000 --users 20000 --latency-ms 100 --scaling

# The steady state (hours, ~60 GB of disk): planning 1 M and 10 M accounts, the broker during a 1 M fan-out,
# the nightly run on a young database and on one with 1 M accounts and 90 days of history.
bench-steady: $(STAMP)
	$(BIN)/python -m bench.steady_bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache balances.db
