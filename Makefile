# Everything a fresh machine needs: `make demo` and `make test` set up on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Debian packages for the real components: the tests use systemd-analyze (unit files),
# nft and ip (transparent interception in network namespaces); the hot-path benchmark
# compares against HAProxy, with nginx as the upstream and wrk as the load, and counts
# the L7 proxy's instructions under valgrind.
TEST_DEBS := systemd:systemd-analyze nftables:nft iproute2:ip util-linux:setpriv
BENCH_DEBS := haproxy:haproxy wrk:wrk nginx-light:nginx valgrind:valgrind

.PHONY: install system-deps bench-deps demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Installs missing Debian packages (package:command pairs) when run as root; otherwise
# says what is missing, and the tests that need them skip with that reason.
define ensure_debs
	@missing=""; for pair in $(1); do \
	  command -v "$${pair#*:}" >/dev/null || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run as root to install)"; fi; \
	fi
endef

system-deps:
	$(call ensure_debs,$(TEST_DEBS))

bench-deps:
	$(call ensure_debs,$(BENCH_DEBS))

demo: $(STAMP)
	config/demo/demo.sh

# The project's own files must hold no plaintext credential (tests plant some on purpose).
test: $(STAMP) system-deps
	$(BIN)/agentvisor scan config systemd supervisor sidecar bench README.md
	$(BIN)/python -m pytest -q

bench: $(STAMP) bench-deps
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/restart.py
	$(BIN)/python bench/l7_instructions.py
	$(BIN)/python bench/hot_path.py

clean:
	rm -rf $(VENV) .demo .pytest_cache
