# Everything a fresh machine needs: `make demo` and `make test` set up on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Debian packages for the real components the tests use (systemd-analyze for unit files).
DEB_PACKAGES := systemd

.PHONY: install system-deps demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Installs missing Debian packages when run as root; otherwise says what is missing and
# the tests that need them skip with that reason.
system-deps:
	@missing=""; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (tests that need them will skip)"; fi; \
	fi

demo: $(STAMP)
	config/demo/demo.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/restart.py

clean:
	rm -rf $(VENV) .demo .pytest_cache
