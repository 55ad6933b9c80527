# fastlb's commands. `make run` and `make test` set up everything on a fresh Debian
# machine with Python 3.11 (Debian packages need root, as on CI).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tools the tests and benchmarks drive, by the command each provides.
DEBIAN_TOOLS := gcc:build-essential haproxy:haproxy nginx:nginx-light wrk:wrk taskset:util-linux \
  openssl:openssl curl:curl testssl:testssl.sh ip:iproute2 keepalived:keepalived \
  redis-server:redis-server memcached:memcached chromium:chromium dnsmasq:dnsmasq-base \
  h2load:nghttp2-client

.PHONY: run test test-install image setup system-packages build docs bench-core bench-proxy bench-memory bench-tls clean

run: setup
	$(VENV)/bin/fastlb demo

# tests/install/ (after the suite) builds the sdist and the wheel, installs each into a fresh virtualenv,
# smoke-tests fastlb as installed, and builds and runs the container image; builds are cached by content
# under ~/.cache/fastlb (FASTLB_CACHE) and in Docker's layer cache.
test: setup
	$(PY) -m pytest -q tests benchmarks/test_harness.py
	$(MAKE) --no-print-directory test-install

test-install: setup
	$(PY) -m pytest -q tests/install

# The container image fastlb:latest, built offline here (docker/build-image.sh says how).
image: setup
	PYTHON=$(abspath $(PY)) docker/build-image.sh

setup: system-packages $(VENV)/.installed

# Installs only what is missing; `apt-get update` runs only when something is.
system-packages:
	@missing=""; \
	for pair in $(DEBIAN_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	$(PYTHON) -c 'import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
	  || missing="$$missing python3-venv python3-dev"; \
	[ -f /usr/include/openssl/ssl.h ] || missing="$$missing libssl-dev"; \
	[ -f /usr/include/nghttp2/nghttp2.h ] || missing="$$missing libnghttp2-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  status=$$?; rm -f /usr/sbin/policy-rc.d; exit $$status; \
	fi

# The editable install compiles the core, the relay and the HTTP hot path (fastlb/http/*, fastlb/pool.py)
# in place; it reruns when one of their sources changes (a stale .so would shadow the edited .py).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard fastlb/*.pyx fastlb/*.pxi fastlb/*.pxd fastlb/core/*.pxi fastlb/http2/*.pyx fastlb/http2/*.pxd) \
		fastlb/pool.py $(wildcard fastlb/http/*.py fastlb/http/*.pxd fastlb/http/*.pyx fastlb/http/*.pxi)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# Rebuilds the extensions in place after an edit (the editable install built them in an isolated
# environment: Cython is installed into the venv for this).
build: setup
	$(PY) -m pip install -q 'cython>=3.0' 'setuptools>=77'
	$(PY) setup.py -q build_ext --inplace

# The configuration reference, generated from the settings table (fastlb/config/schema.py);
# tests/test_config_docs.py fails when the committed file is stale.
docs: setup
	$(PY) -m fastlb.config.docs > docs/configuration.md

bench-core: setup
	$(PY) -m pytest -q benchmarks/test_core_bench.py -s --benchmark-columns=min,median,ops --benchmark-sort=name

bench-proxy: setup
	$(PY) benchmarks/proxy_bench.py $(BENCH_ARGS)

bench-memory: setup
	$(PY) benchmarks/memory_bench.py $(BENCH_ARGS)

bench-tls: setup
	$(PY) benchmarks/tls_bench.py $(BENCH_ARGS)

clean:
	rm -rf build dist $(VENV) fastlb/_core.c fastlb/_core.html fastlb/*.so *.egg-info docker/wheelhouse/*.whl
