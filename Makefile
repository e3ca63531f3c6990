# Every set-up step for a fresh Debian or Raspberry Pi OS machine: system servers, virtualenv, packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the demo and the tests run for real (servers are started by them, in temp folders).
APT_PACKAGES := mosquitto influxdb socat victoria-metrics chromium
APT_PROGRAMS := /usr/sbin/mosquitto /usr/bin/influxd /usr/bin/socat /usr/bin/victoria-metrics /usr/bin/chromium

.PHONY: setup system-packages demo test bench clean

setup: system-packages $(BIN)/.installed

system-packages:
	@missing=""; for p in $(APT_PROGRAMS); do [ -x $$p ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages ($(APT_PACKAGES)): missing$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

$(BIN)/.installed: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/kwwk demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf var test-artefacts .pytest_cache
