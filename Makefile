# Entry points for users and CI. `make demo` and `make test` set everything up first,
# so each works on a fresh Debian machine as root (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEBIAN_PACKAGES := fuse3 libfuse3-dev pkg-config fio prometheus
PHASE_SECONDS ?= 10
PYTEST_ARGS ?=

.PHONY: setup system-deps python-deps demo test proto prometheus-rule clean

setup: system-deps python-deps

# Debian packages: FUSE (runtime + headers for pyfuse3's build), fio (the demo's
# workload) and prometheus (the dashboard test scrapes the collector with it).
system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Every service package is installed editable from this checkout; constraints.txt
# pins third-party versions to the set the test suite last passed with.
python-deps: $(PY)
	$(PIP) install -q -c constraints.txt \
	  -e ./proto \
	  -e ./services/fuse-worker -e ./services/policy \
	  -e ./services/collector -e ./services/csi-node \
	  -e '.[test]'

demo: setup
	$(VENV)/bin/interposer demo --phase-seconds $(PHASE_SECONDS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Regenerate the CSI protobuf/gRPC modules (interposer.proto.csi.csi_pb2, csi_pb2_grpc)
# from proto/csi/v1/csi.proto; commit the result (a test checks it is current).
proto: python-deps
	$(PY) proto/csi/generate.py proto/src

# Regenerate the prometheus-operator overlay's PrometheusRule from the monitoring
# overlay's alerts.yml (the one file to edit); a test checks it is current.
prometheus-rule:
	python3 deploy/overlays/prometheus-operator/render_rules.py

clean:
	rm -rf $(VENV) .pytest_cache
