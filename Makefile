# resp2chat — every target installs what it needs, so a fresh clone only needs `make test`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
TOOLS     := .tools
CODEX_VER := 0.171.0
CODEX     := $(TOOLS)/codex-$(CODEX_VER)/node_modules/.bin/codex
# the Vercel AI SDK, a third-party Responses client the tests drive (tests/test_client_libraries.py), with
# its two Responses providers: @ai-sdk/openai, and @ai-sdk/open-responses (1.x pairs with ai 6)
AI_SDK_VER := 6.0.325
AI_SDK_DIR := $(TOOLS)/ai-sdk-$(AI_SDK_VER)
OPEN_RESPONSES_VER := 1.0.39
AI_SDK     := $(AI_SDK_DIR)/node_modules/@ai-sdk/open-responses/package.json
# the OpenAI Agents SDK for JavaScript, a Responses client the tests drive (tests/test_agents_js.py),
# with the openai and zod versions it resolves to pinned
AGENTS_JS_VER := 0.20.0
AGENTS_JS_DIR := $(TOOLS)/agents-js-$(AGENTS_JS_VER)
AGENTS_JS     := $(AGENTS_JS_DIR)/node_modules/@openai/agents/package.json
# a real MCP server (npm @modelcontextprotocol/server-everything) the hosted MCP tests run against
MCP_EVERYTHING_VER := 2026.8.31
MCP_EVERYTHING_DIR := $(TOOLS)/mcp-everything-$(MCP_EVERYTHING_VER)
MCP_EVERYTHING     := $(MCP_EVERYTHING_DIR)/node_modules/.bin/mcp-server-everything
# llama.cpp's server and a generated tiny model, built once outside the repo (tests/llamacpp/)
LLAMA_CACHE ?= $(HOME)/.cache/resp2chat-llamacpp
# smg (PyPI), the Rust inference router of the session-affinity tests, in its own venv
SMG_VER   := 1.13.0
SMG       := $(TOOLS)/smg-$(SMG_VER)/bin/smg

# mitmproxy 12 needs Python >= 3.12: prefer 3.13 (newest pydantic), accept 3.12,
# from PATH or from pyenv's versions folder ($PYENV_ROOT, else ~/.pyenv). Override with
# `make PYTHON=/path/to/python3`.
PYTHON ?= $(shell for c in python3.13 python3.12 \
	$${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python3 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3 \
	python3; do \
	  p=$$(command -v $$c 2>/dev/null) || continue; \
	  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; break; }; \
	done)

.PHONY: help venv codex ai-sdk agents-js mcp-everything llamacpp redis smg lint test test-fast run bench soak fuzz recordings clean

help:
	@echo "make run        start the gateway on 127.0.0.1:4000 (bundled demo upstream if no backend is configured)"
	@echo "make test       install everything needed and run every test"
	@echo "make lint       pyflakes over the addon, the tests and the bench (make test runs it first)"
	@echo "make test-fast  unit tests only (no mitmdump, no Codex CLI)"
	@echo "make bench      benchmark against plain mitmproxy and codex-relay"
	@echo "make soak       64 concurrent Codex-like streams for 60 s through a real mitmdump"
	@echo "make fuzz       20000 byte-level mutations of real Codex requests through a real mitmdump (random seed)"
	@echo "make recordings re-record the Codex sessions in recordings/"

$(VENV)/.stamp: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found (set PYTHON=...)"; exit 1; }
	@echo "using $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.stamp

$(CODEX):
	@command -v npm >/dev/null || { echo "error: npm is needed to install Codex CLI"; exit 1; }
	mkdir -p $(TOOLS)/codex-$(CODEX_VER)
	cd $(TOOLS)/codex-$(CODEX_VER) && npm install --prefix . --no-audit --no-fund --silent @openai/codex@$(CODEX_VER)

codex: $(CODEX)

$(AI_SDK):
	@command -v npm >/dev/null || { echo "error: npm is needed to install the Vercel AI SDK"; exit 1; }
	mkdir -p $(AI_SDK_DIR)
	cd $(AI_SDK_DIR) && npm install --prefix . --no-audit --no-fund --silent ai@$(AI_SDK_VER) @ai-sdk/openai@3.0.141 \
	  @ai-sdk/open-responses@$(OPEN_RESPONSES_VER) zod@3.25.76

ai-sdk: $(AI_SDK)

$(AGENTS_JS):
	@command -v npm >/dev/null || { echo "error: npm is needed to install the OpenAI Agents SDK for JavaScript"; exit 1; }
	mkdir -p $(AGENTS_JS_DIR)
	cd $(AGENTS_JS_DIR) && npm install --prefix . --no-audit --no-fund --silent @openai/agents@$(AGENTS_JS_VER) openai@7.60.0 zod@4.6.7

agents-js: $(AGENTS_JS)

$(MCP_EVERYTHING):
	@command -v npm >/dev/null || { echo "error: npm is needed to install the MCP test server"; exit 1; }
	mkdir -p $(MCP_EVERYTHING_DIR)
	cd $(MCP_EVERYTHING_DIR) && npm install --prefix . --no-audit --no-fund --silent @modelcontextprotocol/server-everything@$(MCP_EVERYTHING_VER)

mcp-everything: $(MCP_EVERYTHING)

llamacpp:
	bash tests/llamacpp/build.sh $(LLAMA_CACHE)

# Debian's redis-server: the shared-state tests start their own on a free loopback port.
redis:
	@command -v redis-server >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "error: redis-server is needed (Debian/Ubuntu: apt-get install redis-server)"; exit 1; }; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  echo "installing redis-server with apt"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

$(SMG):
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(TOOLS)/smg-$(SMG_VER)
	$(TOOLS)/smg-$(SMG_VER)/bin/pip install -q smg==$(SMG_VER)

smg: $(SMG)

test: lint codex ai-sdk agents-js mcp-everything llamacpp redis smg
	RESP2CHAT_LLAMACPP_DIR=$(LLAMA_CACHE) CODEX_BIN=$(abspath $(CODEX)) AI_SDK_DIR=$(abspath $(AI_SDK_DIR)) \
	  AGENTS_JS_DIR=$(abspath $(AGENTS_JS_DIR)) MCP_EVERYTHING_BIN=$(abspath $(MCP_EVERYTHING)) \
	  SMG_BIN=$(abspath $(SMG)) $(PY) -m pytest -q --durations=25

lint: venv
	$(PY) -m pyflakes addon tests bench

test-fast: venv
	$(PY) -m pytest -q -m "not codex" tests/test_lowering.py tests/test_sse.py tests/test_translator.py

run: venv
	$(VENV)/bin/resp2chat start

bench: venv codex llamacpp redis smg
	$(PY) bench/run.py --out bench-results.json
	@echo "KV cache on a real server (llama.cpp), a Codex session of 3 turns:"
	RESP2CHAT_LLAMACPP_DIR=$(LLAMA_CACHE) CODEX_BIN=$(abspath $(CODEX)) $(PY) tests/llamacpp/kv_figure.py
	@echo "Session affinity: smg + 2 llama-server replicas + 2 gateways sharing Redis, 8 sessions, affinity vs round_robin:"
	RESP2CHAT_LLAMACPP_DIR=$(LLAMA_CACHE) SMG_BIN=$(abspath $(SMG)) $(PY) tests/llamacpp/fleet.py

soak: venv
	$(PY) tests/soak.py --streams 64 --seconds 60

fuzz: venv
	$(PY) tests/fuzz.py --cases 20000 --findings fuzz-findings

recordings: venv codex
	CODEX_BIN=$(abspath $(CODEX)) $(PY) tests/recordings.py recordings/

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
