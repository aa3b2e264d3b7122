"""Pytest fixtures: the scripted chat upstream, real mitmdump gateways, the real Codex CLI.

The plain helpers (starting a gateway, reading its SSE, waiting on a condition…) are in
helpers.py; importing it first makes every test hermetic (its own HOME, none of the developer's
settings) before anything else runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import (Codex, Endless, Gateway, LocalServer, Upstream, codex_bin_path, openai_client, serve_everything,
                     start_gateway, wait_http)
from redis_server import RedisServer, missing
from resp2chat_io.demo_upstream import serve_in_thread


@pytest.fixture(scope="session")
def upstream():
    server, base_url = serve_in_thread()
    yield Upstream(base_url, server)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def gateway(upstream, tmp_path_factory):
    # The replay cache would answer repeated prompts without the upstream, and most tests
    # assert what the upstream received: it has tests of its own.
    gw = start_gateway(upstream.origin, tmp_path_factory.mktemp("gateway"),
                       "--set", "resp2chat_max_replay_entries=0")
    yield gw
    gw.stop()


@pytest.fixture
def gateway_factory(tmp_path):
    started: list[Gateway] = []

    def make(upstream_url: str, *extra: str, env: dict | None = None) -> Gateway:
        gw = start_gateway(upstream_url, tmp_path, *extra, env=env)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def own_gateway(upstream, gateway_factory):
    """A gateway of this test's own: its stored responses start empty; no replay cache."""
    return gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0")


@pytest.fixture
def recording_gateway(upstream, gateway_factory, tmp_path):
    """A gateway of this test's own that writes its flows (``-w``), no replay cache: (it, the flow file)."""
    flows = tmp_path / "flows.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(flows), "--set", "resp2chat_max_replay_entries=0")
    return gw, flows


@pytest.fixture
def endless():
    """A test backend of this test's own whose answer never ends by itself (``helpers.Endless``,
    its calls noted afresh): the server (its ``url``)."""
    Endless.started, Endless.closed = [], []
    with LocalServer(Endless) as server:
        yield server


@pytest.fixture
def client(gateway):
    """An openai SDK client of the session gateway (``helpers.openai_client``)."""
    return openai_client(gateway)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of this test's own, on a free loopback port (tests/redis_server.py)."""
    why = missing()
    if why:
        pytest.fail(why)
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    """The real MCP test server, server-everything, in streamable-HTTP mode on a free port: its /mcp URL."""
    yield from serve_everything(tmp_path_factory, "streamableHttp", "/mcp",
                                lambda url, proc, log: wait_http(url, proc=proc))


# --- Codex CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def codex_bin() -> str:
    path = codex_bin_path()
    if not path or not Path(path).exists():
        pytest.fail("Codex CLI not found: run `make codex` (or set CODEX_BIN)")
    return path


@pytest.fixture
def codex(codex_bin, tmp_path, gateway) -> Codex:
    """A Codex CLI of this test's own, pointed at the session gateway."""
    cx = Codex.at(codex_bin, tmp_path)
    cx.configure(gateway.base_url)
    return cx
