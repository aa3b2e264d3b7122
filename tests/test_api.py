"""The Python API (resp2chat_io.start): a real gateway subprocess, driven like a user's code would."""

from __future__ import annotations

import os
import socket

import pytest
import requests

from helpers import free_port, openai_client
import resp2chat_io
from resp2chat_io.api import Gateway, StartError


def test_start_use_stop_as_a_context_manager(upstream, monkeypatch):
    # isolated by default: the caller's environment does not leak into the gateway
    monkeypatch.setenv("RESP2CHAT_UPSTREAM_MODEL", "not-this-one")
    with resp2chat_io.start(upstream.base_url, model_map={"gpt-5": "demo-model"}, max_replay_entries=0,
                            upstreams=[]) as gw:
        assert isinstance(gw, Gateway) and gw.running
        assert gw.url == f"http://127.0.0.1:{gw.port}/v1"
        client = openai_client(gw.url)
        reply = client.responses.create(model="gpt-5", input="hello from code")
        assert reply.output_text == "You said: hello from code"
        assert upstream.requests()[-1]["model"] == "demo-model"
        pid = gw.proc.pid
    assert not gw.running and gw.proc.returncode is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(gw.origin + "/healthz", timeout=2)
    assert gw.stop() == gw.proc.returncode  # twice is fine
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_settings_are_checked_and_failures_are_explained(upstream, tmp_path):
    with pytest.raises(StartError, match=r"max_tokens_field \(from start\(\)\): 'n' is invalid"):
        resp2chat_io.start(upstream.base_url, max_tokens_field="n")
    with pytest.raises(resp2chat_io.GatewayError):  # StartError's old name (README named it) still catches it
        resp2chat_io.start(upstream.base_url, max_tokens_field="n")
    with pytest.raises(StartError, match=r"colour: unknown setting \(README: Configuration lists them\)"):
        resp2chat_io.start(upstream.base_url, colour="red")
    with pytest.raises(StartError) as err:  # a misspelt name: the one meant (not every name), its value never shown
        resp2chat_io.start(upstream.base_url, upstream_api_ky="sk-secret-654321")
    assert str(err.value) == "upstream_api_ky: unknown setting (did you mean upstream_api_key?)", err.value
    with pytest.raises(StartError, match=r"upstreams\[0\] \('a'\).base_url"):
        resp2chat_io.start(upstreams=[{"name": "a"}])
    with pytest.raises(StartError) as err:  # a misspelt key: named, its value never shown
        resp2chat_io.start(upstreams=[{"name": "a", "base_url": "http://u:pw-in-url@h/v1", "apikey": "sk-secret-123456"}])
    assert "apikey" in str(err.value) and "sk-secret-123456" not in str(err.value)
    with pytest.raises(StartError) as err:
        resp2chat_io.start(upstreams=[{"name": "a", "base_url": "ftp://u:pw-in-url@h/v1"}])
    assert "base_url" in str(err.value) and "pw-in-url" not in str(err.value)
    with socket.socket() as taken:  # a port someone else holds: the gateway cannot start, and says why
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StartError) as err:
            resp2chat_io.start(upstream.base_url, port=taken.getsockname()[1], log_path=tmp_path / "gw.log")
        assert "exited" in str(err.value) and (tmp_path / "gw.log").exists()


def test_bind_addr_is_where_it_listens(upstream):
    port = free_port()
    with resp2chat_io.start(upstream.base_url, bind_addr=f"127.0.0.1:{port}") as gw:
        assert gw.port == port and requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).ok
    with pytest.raises(StartError, match="give one or the other"):
        resp2chat_io.start(upstream.base_url, bind_addr=f"127.0.0.1:{port}", port=port + 1)


def test_an_ipv6_host_is_where_it_listens_and_its_url_has_brackets(upstream):
    """``host="::1"``: the free port was looked for on IPv4 (a ``socket()`` cannot bind ::1) and
    ``gw.url`` was ``http://::1:PORT/v1``, which no client parses."""
    with resp2chat_io.start(upstream.base_url, host="::1") as gw:
        assert gw.url == f"http://[::1]:{gw.port}/v1"
        assert openai_client(gw.url).responses.create(model="demo-model", input="v6").output_text == "You said: v6"


def test_several_upstreams_and_mitmproxy_arguments(upstream, tmp_path):
    flows = tmp_path / "flows.mitm"
    entries = [{"name": "main", "base_url": upstream.base_url, "models": ["demo-*"]}]
    gw = resp2chat_io.start(upstreams=entries, mitmproxy_args=["-w", str(flows)], access_log_path="-")
    try:
        r = requests.post(gw.url + "/responses", json={"model": "demo-model", "input": "hi"}, timeout=30)
        assert r.status_code == 200
        assert '"upstream": "main"' in gw.log()  # the access log went to mitmdump's stderr
    finally:
        gw.stop()
    assert flows.stat().st_size > 0


def test_secrets_never_reach_the_process_command_line(upstream):
    """Any local user can read a command line (ps, /proc/PID/cmdline): keys go by environment."""
    with resp2chat_io.start(upstream.base_url, gateway_api_key="gw-key-not-in-argv", seal_key="seal-not-in-argv",
                            upstream_api_key="sk-up-not-in-argv") as gw:
        cmdline = open(f"/proc/{gw.proc.pid}/cmdline", "rb").read()
        assert b"not-in-argv" not in cmdline
        r = requests.get(gw.origin + "/v1/models", timeout=5)
        assert r.status_code == 401  # and yet the key is in force
        ok = requests.get(gw.origin + "/v1/models", headers={"authorization": "Bearer gw-key-not-in-argv"}, timeout=5)
        assert ok.status_code == 200
