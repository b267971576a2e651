# Everything a fresh machine needs: `make demo` and `make test` set up on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The sidecar's hot path, compiled by mypyc beside its sources (sidecar/compile.py,
# which keeps the stamp); rebuilt whenever a sidecar source is newer. PURE_PYTHON=1
# removes it instead: the sources run.
ifeq ($(PURE_PYTHON),1)
COMPILED := pure-python
else
COMPILED := sidecar/.compiled-stamp
endif
SIDECAR_SRC := $(wildcard sidecar/*.py sidecar/*/*.py sidecar/*/*/*.py)
# Debian packages for the real components: the tests use systemd (its units, run under
# a real PID 1), nft and ip (transparent interception in network namespaces),
# nats-server (the NATS unit); the hot-path benchmark
# compares against HAProxy, with nginx as the upstream and wrk as the load, and counts
# the L7 proxy's instructions under valgrind.
TEST_DEBS := systemd:systemd-analyze nftables:nft iproute2:ip util-linux:setpriv \
	nats-server:nats-server
BENCH_DEBS := haproxy:haproxy wrk:wrk nginx-light:nginx valgrind:valgrind

.PHONY: install system-deps bench-deps demo test bench clean pure-python deploy undeploy

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,compile]'
	touch $(STAMP)

sidecar/.compiled-stamp: $(STAMP) $(SIDECAR_SRC)
	$(call ensure_debs,gcc:gcc)
	@$(BIN)/python -m sidecar.compile || { echo "the hot path did not compile (see above);" \
	  "PURE_PYTHON=1 make ... installs without compiling (same behaviour, more CPU)"; exit 1; }

pure-python: $(STAMP)
	$(BIN)/python -m sidecar.compile --remove

install: $(STAMP) $(COMPILED)

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

# One PC under systemd, as root. The PC's own legacy file, where it is and unchanged,
# with agentvisor's settings in an overlay beside it (OVERLAY=FILE, default
# agentvisor.yaml in the legacy file's folder):
#   make deploy HOST=mainpc LEGACY=/opt/ai_system/main_pc_code/config/startup_config.yaml
# names both in /etc/agentvisor/HOST.env, with the variables the legacy file's ${NAME}
# read (PYTHONPATH=, ...): the unit's environment. Or a native config: `make deploy
# HOST=mainpc` (config/HOST.yaml, or CONFIG=FILE, as /etc/agentvisor/HOST.yaml). Files in
# /etc/agentvisor are kept if present (an operator's edit wins). NATS=1 runs the PC's
# nats-server too. Validate (what the unit will run, with its environment), unit, start,
# reload or restart, status: systemd/deploy.sh says each step.
deploy: $(STAMP) $(COMPILED)
	systemd/deploy.sh "$(HOST)" "$(CONFIG)" "$(NATS)" "$(LEGACY)" "$(OVERLAY)"

# The way back: stop and disable agentvisor@HOST; /etc/agentvisor (HOST.yaml, HOST.env)
# and the legacy file and overlay stay for the next deploy.
undeploy:
	systemd/deploy.sh --remove "$(HOST)"

demo: $(STAMP) $(COMPILED)
	config/demo/demo.sh

# The project's own files must hold no plaintext credential (tests plant some on purpose).
# The whole suite runs on the hot path as installed (compiled unless PURE_PYTHON=1);
# the unit and protocol tests run again on its sources, the fallback.
test: $(STAMP) $(COMPILED) system-deps
	$(BIN)/agentvisor scan config systemd supervisor sidecar bench README.md
	AGENTVISOR_EXPECT_COMPILED=$(if $(filter 1,$(PURE_PYTHON)),0,1) $(BIN)/python -m pytest -q
	AGENTVISOR_PURE_PYTHON=1 AGENTVISOR_EXPECT_COMPILED=0 $(BIN)/python -m pytest -q \
	  tests/unit tests/protocol

bench: $(STAMP) $(COMPILED) bench-deps
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/restart.py
	$(BIN)/python bench/l7_instructions.py
	$(BIN)/python bench/hot_path.py

clean:
	-$(BIN)/python -m sidecar.compile --remove
	rm -rf $(VENV) .demo .pytest_cache build
