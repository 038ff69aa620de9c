# Two commands do all the set-up on a fresh machine: `make up` and `make test`.
# Both run `make setup` first, which is idempotent and installs what is missing.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed
JARS := deploy/kafka/lib/.resolved
# Kafka Connect + the Debezium PostgreSQL connector (CDC sources, `clickloop cdc up`).
CONNECT_JARS := deploy/connect/lib/.resolved
# rustup installs cargo here; the native core (native/) is built by pip install.
export PATH := $(HOME)/.cargo/bin:$(PATH)
SUDO := $(SUDO)

# $(call apt_install,package): a package from Debian's archive, or a clear error without apt-get.
define apt_install
	@command -v apt-get >/dev/null || { echo "install $(1) (Debian: apt-get install $(1))"; exit 1; }
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(1)
endef

.PHONY: setup up test test-unit bench infra-start infra-stop clean postgres-server

setup: $(STAMP) $(JARS) $(CONNECT_JARS) postgres-server /usr/bin/redis-server /usr/bin/chromium

$(STAMP): pyproject.toml native/Cargo.toml native/Cargo.lock $(wildcard native/src/*.rs)
	@command -v cargo >/dev/null || { command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q cargo; } || \
	  { echo "clickloop builds its native core with Rust: install it (https://rustup.rs or apt-get install cargo)"; exit 1; }
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

$(JARS): deploy/kafka/pom.xml
	cd deploy/kafka && mvn -q -B dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime
	@touch $@

/usr/bin/redis-server:
	$(call apt_install,redis-server)
	@# Debian's package may start a system instance on 6379; clickloop runs its own.
	-service redis-server stop >/dev/null 2>&1 || true

# The load generator of bench/serve_latency.py's maximum runs (it falls back to its own).
/usr/bin/wrk:
	$(call apt_install,wrk)

# Debian's headless browser for the dashboard test (tests/e2e/test_dashboard.py).
/usr/bin/chromium:
	$(call apt_install,chromium)

$(CONNECT_JARS): deploy/connect/pom.xml deploy/connect/debezium/pom.xml
	@# Anew each time: jars of an older version left beside the new ones would share the classpath.
	rm -rf deploy/connect/lib deploy/connect/plugins
	cd deploy/connect && mvn -q -B dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime
	cd deploy/connect/debezium && mvn -q -B dependency:copy-dependencies \
	  -DoutputDirectory=../plugins/debezium-connector-postgres -DincludeScope=runtime
	@touch $@

# Debian's PostgreSQL server (its programs live in /usr/lib/postgresql/<major>/bin) for the CDC
# source; clickloop runs its own instance (services/infra_cdc.py), not the package's cluster.
postgres-server:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null || { echo "install PostgreSQL's server (Debian: apt-get install postgresql)"; exit 1; }; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) \
	    apt-get install -y -q --no-install-recommends postgresql && \
	  { service postgresql stop >/dev/null 2>&1 || true; }; }

up: setup
	.venv/bin/clickloop up

test: setup
	.venv/bin/clickloop infra start
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup /usr/bin/wrk
	.venv/bin/clickloop infra start
	$(PY) bench/stream_throughput.py
	$(PY) bench/collector_throughput.py
	$(PY) bench/replay_throughput.py
	$(PY) bench/freshness.py
	$(PY) bench/serve_latency.py
	$(PY) bench/serve_latency.py --pause-redis
	$(PY) bench/ranking.py
	$(PY) bench/bandit.py
	$(PY) bench/cdc_history.py

infra-start: setup
	.venv/bin/clickloop infra start

infra-stop:
	.venv/bin/clickloop infra stop

clean:
	-.venv/bin/clickloop cdc down
	-.venv/bin/clickloop infra stop
	rm -rf .state
