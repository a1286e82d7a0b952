# integrand — `make run` starts the daemon on config.toml, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
PLUGIN_PROJECTS = $(wildcard plugins/*/pyproject.toml)
# bench/ and plugins/ may not exist yet in a fresh checkout; ruff fails on a missing path.
LINT_DIRS = $(wildcard daemon tests bench plugins)

.PHONY: install run test lint typecheck bench clean demo-quickbooks-hubspot demo-crm-sync pubsub-stubs

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

# Both fakes and a real integrand: a customer created in the QuickBooks fake appears in the HubSpot fake.
demo-quickbooks-hubspot: install
	$(BIN)/python plugins/demo_quickbooks_hubspot.py

# Three fakes and a real integrand: a Contact created in Salesforce reaches HubSpot and a custom CRM,
# and both ids come back to Salesforce as the confirmation (examples/crm-sync).
demo-crm-sync: install
	$(BIN)/python plugins/demo_crm_sync.py

# Regenerate the committed Salesforce Pub/Sub API messages from the committed proto (a test checks they match).
PUBSUB = plugins/salesforce/integrand_salesforce/pubsub
pubsub-stubs: install
	$(BIN)/python -m grpc_tools.protoc -I$(PUBSUB) --python_out=$(PUBSUB) --pyi_out=$(PUBSUB) $(PUBSUB)/pubsub_api.proto

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
