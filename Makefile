# integrand — `make run` starts the daemon on config.toml, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
PLUGIN_PROJECTS = $(wildcard plugins/*/pyproject.toml)
# bench/ and plugins/ may not exist yet in a fresh checkout; ruff fails on a missing path.
LINT_DIRS = $(wildcard daemon tests bench plugins tools)

# Exact versions of every dependency (core, plugins, dev tools): `make lock` refreshes it after any
# pyproject.toml change; install, CI and `make dist` use it as constraints. pyproject.toml keeps ranges.
LOCK = requirements.lock
BUILD_TOOLS = 'shiv>=1.0' 'uv>=0.4'
# Third-party connectors to build into dist/integrand: pip requirement specs or paths, space-separated.
EXTRA_PLUGINS ?=
# CPython versions besides the building one whose compiled modules dist/integrand also carries.
DIST_PYTHONS ?= 3.12 3.13

.PHONY: install run test test-tools lint typecheck bench fuzz soak hostile clean demo-quickbooks-hubspot chromium promtool demo-crm-sync pubsub-stubs
.PHONY: dist lock systemd-tools haproxy

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGIN_PROJECTS) $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "integrand needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev]' $(foreach p,$(PLUGIN_PROJECTS),-e $(dir $(p)))
	touch $(STAMP)

# One command after adding or changing a dependency anywhere (root or plugins/*/pyproject.toml).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(BUILD_TOOLS)
	mkdir -p build
	printf -- '-e .[dev]\n' > build/requirements.in
	for p in $(dir $(PLUGIN_PROJECTS)); do printf -- '-e ./%s\n' "$$p" >> build/requirements.in; done
	$(BIN)/uv pip compile --quiet build/requirements.in --python-version 3.11 --custom-compile-command 'make lock' --no-annotate \
		-o build/requirements.lock
	# The first-party packages are installed from this tree, not pinned.
	grep -v '^-e ' build/requirements.lock > $(LOCK)

# A single executable zipapp (shiv): integrand, its locked dependencies and the first-party plugins.
# It runs with the python3 on PATH: 3.11 (the building one) and the DIST_PYTHONS.
dist: dist/integrand

dist/integrand: $(STAMP) $(LOCK) tools/dist_abis.py $(shell find daemon plugins -name '*.py' -o -name pyproject.toml -o -name '*.toml')
	$(BIN)/python -m pip install --quiet $(BUILD_TOOLS)
	rm -rf build/dist-site build/src && mkdir -p build/src dist
	# Built from a copy: setuptools leaves build/ folders in the projects it builds, which mypy would see twice.
	cp -r pyproject.toml README.md daemon build/src/
	for p in $(dir $(PLUGIN_PROJECTS)); do mkdir -p build/src/$$p && cp -r $$p. build/src/$$p; done
	rm -rf build/src/plugins/*/build build/src/plugins/*/tests build/src/plugins/*/*.egg-info
	$(BIN)/python -m pip install --quiet --no-compile --target build/dist-site -c $(LOCK) \
		./build/src $(foreach p,$(PLUGIN_PROJECTS),./build/src/$(dir $(p))) $(EXTRA_PLUGINS)
	$(BIN)/python tools/dist_abis.py build/dist-site $(DIST_PYTHONS)
	$(BIN)/shiv --site-packages build/dist-site --reproducible --compressed -p '/usr/bin/env python3' \
		-e integrand.cli:entry -o dist/integrand.tmp
	mv dist/integrand.tmp dist/integrand

# systemd-analyze checks the unit in `make test`; Debian's systemd package brings it when missing.
systemd-tools:
	@command -v systemd-analyze >/dev/null || (apt-get update -qq && apt-get install -y -qq systemd)

run: install
	$(BIN)/integrand run --config config.toml

lint: install
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: install
	$(BIN)/mypy

test: install systemd-tools chromium promtool haproxy lint typecheck test-tools
	$(BIN)/pytest

# System tools the tests build with (the fault-injection shim is compiled with gcc); installed only if missing.
test-tools:
	@command -v gcc >/dev/null || (apt-get update -qq && apt-get install -y -qq gcc)

# The status page's browser test drives Debian's chromium through Playwright (never a downloaded browser build).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

# promtool checks docs/alerts.yml. It is taken out of Debian's prometheus package rather than installed with it,
# which would also set up (and on some machines start) a Prometheus server nobody asked for.
PROMTOOL = $(VENV)/tools/usr/bin/promtool
promtool: install
	@command -v promtool >/dev/null || test -x $(PROMTOOL) || ( \
	  mkdir -p $(VENV)/tools && cd $(VENV)/tools && apt-get update -qq && apt-get download -qq prometheus && \
	  dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb && test -x usr/bin/promtool )

# The examples/cluster test runs the real HAProxy in front of three nodes and checks the nginx alternative
# with `nginx -t`. Both binaries are taken out of Debian's packages (their libraries installed) rather than
# installed as packages, which would also set up, and on some machines start, services nobody asked for.
TOOLS = $(VENV)/tools/usr/sbin
haproxy: install
	@command -v haproxy >/dev/null || test -x $(TOOLS)/haproxy || ( \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    liblua5.3-0 libopentracing-c-wrapper0 libpcre2-8-0 libssl3 zlib1g && \
	  mkdir -p $(VENV)/tools && cd $(VENV)/tools && apt-get download -qq haproxy && \
	  dpkg-deb -x haproxy_*.deb . && rm -f haproxy_*.deb && test -x usr/sbin/haproxy )
	@command -v nginx >/dev/null || test -x $(TOOLS)/nginx || ( \
	  mkdir -p $(VENV)/tools && cd $(VENV)/tools && apt-get download -qq nginx && \
	  dpkg-deb -x nginx_*.deb . && rm -f nginx_*.deb && test -x usr/sbin/nginx )

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py
	$(BIN)/python bench/poll_sim.py --webhooks --plot docs/polling-interval.png --json bench/poll_sim.json
	$(BIN)/python bench/poll_daemon.py --seeds 1 2 3 --json bench/poll_daemon.json
	$(BIN)/python bench/cluster_bench.py --runs 5 --json bench/cluster_results.json
	# RabbitMQ and NATS JetStream through integrand beside their own clients (about 5 min; needs both running)
	$(BIN)/python bench/brokers.py --runs 3 --messages 5000 --rate 500 --write

# Coverage-guided fuzzing from the kept corpus (tests/fuzz_corpus); FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 120
fuzz: install
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	$(BIN)/python bench/fuzz.py --seconds $(FUZZ_SECONDS)

# kill -9 loop for ROUNDS rounds, then a steady soak of SOAK_SECONDS; figures into docs/reliability.md.
ROUNDS ?= 200
SOAK_SECONDS ?= 3600
soak: install
	$(BIN)/python bench/soak.py --rounds $(ROUNDS) --seconds $(SOAK_SECONDS) $(if $(BUDGET),--budget $(BUDGET))

# Hostile clients against a daemon limited to 1,024 fds; a well-behaved sender measured throughout.
hostile: install
	$(BIN)/python bench/hostile.py

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
	rm -rf $(VENV) var .mypy_cache .ruff_cache build dist
