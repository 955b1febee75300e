# Two commands on a fresh machine: `make lab` runs the product, `make test` runs every test.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian's OpenBLAS: model workers preload it (the mlx CPU wheel's own BLAS is many times slower).
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup system-deps lab test bench clean

setup: system-deps $(STAMP)

# Linux only, and only where apt-get can install; elsewhere workers use mlx's bundled BLAS.
system-deps:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's OpenBLAS for fast CPU generation"; \
		apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; \
	fi
# PostgreSQL binaries for the store's PostgreSQL tests (they start a private cluster of their own).
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		&& ! command -v initdb >/dev/null && command -v apt-get >/dev/null; then \
		echo "installing Debian's PostgreSQL for the store's PostgreSQL tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	fi

$(STAMP): pyproject.toml
	[ -x $(PYTHON) ] || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[test]"
	# jsonschema's optional rfc3987-syntax adds ~4 s to every server start and nothing needs it.
	$(PYTHON) -m pip uninstall -q -y rfc3987-syntax
	touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 $(ROOT_FLAG) $(LAB_ARGS)

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) benchmarks/bench_store.py --postgres temp
	$(PYTHON) benchmarks/bench_models.py
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_serving.py

clean:
	rm -rf $(VENV) build dist *.egg-info
