# Two commands on a fresh machine: `make lab` runs the product, `make test` runs every test.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian's OpenBLAS: model workers preload it (the mlx CPU wheel's own BLAS is many times slower).
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

# The JupyterLab sidebar: built with node into mlx_jupyter/labextension, which wheels ship.
LABEXT_DIR   := labextension
LABEXT       := mlx_jupyter/labextension/package.json
NODE_MODULES := $(LABEXT_DIR)/node_modules/.package-lock.json
LABEXT_SRC   := $(wildcard $(LABEXT_DIR)/src/*.ts $(LABEXT_DIR)/style/*) \
                $(LABEXT_DIR)/package.json $(LABEXT_DIR)/tsconfig.json

JUPYTER_AI_SERVER_EXTENSIONS := jupyter_ai_acp_client jupyter_ai_chat_commands \
	jupyter_ai_jupyternaut jupyter_ai_litellm jupyter_ai_persona_manager jupyter_ai_router \
	jupyter_ai_tools jupyter_live_content jupyter_server_mcp jupyterlab_chat \
	jupyterlab_commands_toolkit
JUPYTER_AI_LAB_EXTENSIONS := @jupyter-ai/acp-client @jupyter-ai/chat-commands \
	@jupyter-ai/jupyternaut @jupyter-ai/persona-manager @jupyter-ai/router \
	@jupyter-ai-contrib/live-content jupyterlab-ai-commands \
	jupyterlab-cell-input-footer-extension jupyterlab-chat-extension \
	jupyterlab-commands-toolkit jupyterlab-diff

.PHONY: setup system-deps browser-deps lab test bench clean

setup: system-deps $(LABEXT) $(STAMP)

# Linux only, and only where apt-get can install; elsewhere workers use mlx's bundled BLAS.
system-deps:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's OpenBLAS for fast CPU generation"; \
		apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; \
	fi
	@command -v npm >/dev/null || { echo "node and npm are needed to build the JupyterLab sidebar"; exit 1; }
# PostgreSQL binaries for the store's PostgreSQL tests (they start a private cluster of their own).
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		&& ! command -v initdb >/dev/null && command -v apt-get >/dev/null; then \
		echo "installing Debian's PostgreSQL for the store's PostgreSQL tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	fi

$(NODE_MODULES): $(LABEXT_DIR)/package.json $(LABEXT_DIR)/package-lock.json
	cd $(LABEXT_DIR) && npm ci --no-audit --no-fund --loglevel=error

$(LABEXT): $(NODE_MODULES) $(LABEXT_SRC)
	cd $(LABEXT_DIR) && npm run build

# The sidebar is built first: the editable install copies it into the environment; a link
# replaces that copy so that later rebuilds show at once.
$(STAMP): pyproject.toml | $(LABEXT)
	[ -x $(PYTHON) ] || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[test]"
	# jsonschema's optional rfc3987-syntax adds ~4 s to every server start and nothing needs it.
	$(PYTHON) -m pip uninstall -q -y rfc3987-syntax
	# jupyter-ai (a test dependency: its Jupyternaut is tested against us) enables 11 server
	# extensions (an MCP server among them: 3 s -> 19 s per server start) and 11 JupyterLab
	# ones; the tests build its agent themselves, so they stay off here.
	for e in $(JUPYTER_AI_SERVER_EXTENSIONS); do \
		$(VENV)/bin/jupyter server extension disable --sys-prefix $$e >/dev/null 2>&1 || true; done
	for e in $(JUPYTER_AI_LAB_EXTENSIONS); do \
		$(VENV)/bin/jupyter labextension disable --level=sys_prefix $$e >/dev/null 2>&1 || true; done
	rm -rf $(VENV)/share/jupyter/labextensions/mlx-jupyter
	ln -s $(CURDIR)/mlx_jupyter/labextension $(VENV)/share/jupyter/labextensions/mlx-jupyter
	touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 $(ROOT_FLAG) $(LAB_ARGS)

# Chromium for the sidebar's browser tests (Playwright drives it; it never downloads a browser).
browser-deps:
	@if [ "$$(uname -s)" = Linux ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
		echo "installing Debian's Chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# Every test on SQLite, then the server tests (marker `server`, see tests/conftest.py) again on
# a private PostgreSQL cluster; a PYTEST_ARGS that selects no server test (exit 5) is fine.
test: setup browser-deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)
	MLX_TEST_DATABASE=postgresql $(PYTHON) -m pytest -m server $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: setup
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) benchmarks/bench_structured.py
	$(PYTHON) benchmarks/bench_store.py --postgres temp
	$(PYTHON) benchmarks/bench_models.py
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_serving.py
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_soak.py --fault-every 0
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_soak.py
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_load.py
	$(PYTHON) benchmarks/bench_startup.py

clean:
	rm -rf $(VENV) build dist *.egg-info mlx_jupyter/labextension $(LABEXT_DIR)/lib $(LABEXT_DIR)/node_modules
