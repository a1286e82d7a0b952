# integrand — `make run` starts the daemon on config.toml, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
PLUGIN_PROJECTS = $(wildcard plugins/*/pyproject.toml)
# bench/ and plugins/ may not exist yet in a fresh checkout; ruff fails on a missing path.
LINT_DIRS = $(wildcard daemon tests bench plugins)

.PHONY: install run test lint typecheck bench clean demo-quickbooks-hubspot

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGIN_PROJECTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "integrand needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(foreach p,$(PLUGIN_PROJECTS),-e $(dir $(p)))
	touch $(STAMP)

run: install
	$(BIN)/integrand run --config config.toml

lint: install
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/pytest

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py
	$(BIN)/python bench/poll_sim.py --webhooks --plot docs/polling-interval.png --json bench/poll_sim.json
	$(BIN)/python bench/poll_daemon.py --seeds 1 2 3 --json bench/poll_daemon.json

# Both fakes and a real integrand: a customer created in the QuickBooks fake appears in the HubSpot fake.
demo-quickbooks-hubspot: install
	$(BIN)/python plugins/demo_quickbooks_hubspot.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
