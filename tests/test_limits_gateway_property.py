"""Nothing a client's turns hold stays held: a real gateway (mitmdump, this process's limits, or
Redis's through a real redis-server), a client with ``max_streams`` 1, and a random sequence of
requests that end every way one can — completed, refused by the gateway, failed by the backend
before or midway, cut by the backend, left by their client midway, over HTTP and the Responses
WebSocket, embeddings and input_tokens too. After each, the client's one slot comes back (a
leak would keep every later request at 429 ``max_streams``), so does its one socket
(``max_sockets``), and at the end nothing is open.
The turns of this file: tests/test_limits_property.py for the rule itself."""

from __future__ import annotations

import socket
import time

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import cli_env, open_embedding, post_turn, run_cli, scrape, start_gateway, wait_until
from wsclient import opened

ALL = "demo-model"


@pytest.fixture(params=["memory", "redis"])
def carol(request, upstream, tmp_path):
    """A gateway and the key of its one client, carol (``--max-streams 1 --max-sockets 1``, the
    demo model only)"""
    out = run_cli(tmp_path, "keys", "add", "carol", "--max-streams", "1", "--max-sockets", "1",
                  "--models", "demo-*")
    assert out.returncode == 0, out.stderr
    extra = ()
    if request.param == "redis":
        extra = ("--set", f"resp2chat_state_store_url={request.getfixturevalue('redis_server').url}")
    gw = start_gateway(upstream.origin, tmp_path, *extra, env=cli_env(tmp_path))
    yield gw, out.stdout.strip()
    gw.stop()


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _left_midway(gw, key: str, body: bytes) -> None:
    """A streamed turn its client leaves once the answer has begun."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        head = b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer %s\r\n" % key.encode()
        sock.sendall(head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"response.output_text.delta" not in got:
            more = sock.recv(65536)
            assert more, got
            got += more


def _socket(gw, key: str, message: dict, leave: bool = False) -> None:
    client = opened(gw.base_url, headers=_auth(key))  # (its one socket given back: a leak would time out)
    try:
        client.send({"type": "response.create", "model": ALL, **message})
        if leave:
            while (event := client.next_message()) is not None and "delta" not in event.get("type", ""):
                pass
        else:
            client.events()
    finally:
        client.close()


def _request(kind: str, gw, key: str) -> None:
    auth = _auth(key)
    if kind.endswith((" stream", " json")):
        script, stream = kind.removeprefix("http ").rsplit(" ", 1)
        post_turn(gw, {"model": ALL, "input": script, "stream": stream == "stream"}, auth)
    elif kind == "http left midway":
        _left_midway(gw, key, b'{"model": "demo-model", "input": "words: 40 slow: 50", "stream": true}')
    elif kind.startswith("http background"):
        started = post_turn(gw, {"model": ALL, "input": "words: 40 slow: 50", "background": True}, auth)
        assert started.status_code == 200, started.text
        if kind.endswith("cancelled"):
            cancel = f"{gw.base_url}/responses/{started.json()['id']}/cancel"
            cancelled = requests.post(cancel, headers=auth, timeout=30)
            assert cancelled.status_code == 200, cancelled.text
    elif kind == "http bad body":
        assert post_turn(gw, b'{"model": ', auth).status_code == 400
    elif kind == "http other model":
        post_turn(gw, {"model": "nobody-serves-this", "input": "hi"}, auth)
    elif kind.startswith("ws "):
        script = kind.removeprefix("ws ")
        if script == "warm-up":
            _socket(gw, key, {"input": "hi", "generate": False})
        elif script == "left midway":
            _socket(gw, key, {"input": "words: 40 slow: 50"}, leave=True)
        elif script == "bad message":
            _socket(gw, key, {"input": 7})
        else:
            _socket(gw, key, {"input": script})
    elif kind == "embeddings":
        requests.post(gw.base_url + "/embeddings", json={"model": ALL, "input": "x"}, headers=auth, timeout=30)
    elif kind.endswith("other model"):  # (not carol's: a 404 of the gateway's)
        path = "/responses/input_tokens" if kind.startswith("input_tokens") else "/embeddings"
        answer = requests.post(gw.base_url + path, json={"model": "qwen3-x", "input": "x"}, headers=auth, timeout=30)
        assert answer.status_code == 404, answer.text
    elif kind == "embeddings left midway":
        with open_embedding(gw, key, ["slow: 300", "b", "c"]):
            pass
    elif kind == "input_tokens":
        requests.post(gw.base_url + "/responses/input_tokens", json={"model": ALL, "input": "x"}, headers=auth,
                      timeout=30)
    else:
        raise AssertionError(kind)


KINDS = ("http hi stream", "http hi json", "http error: 500 boom stream", "http error: 429 busy json",
         "http midstream-error stream", "http truncate stream", "http truncate json", "http left midway",
         "http bad body", "http other model", "http background", "http background cancelled",
         "ws hi", "ws error: 500 boom", "ws midstream-error", "ws truncate", "ws warm-up", "ws left midway",
         "ws bad message", "embeddings", "embeddings left midway", "embeddings other model",
         "input_tokens", "input_tokens other model")


def _slot_free(gw, key: str) -> bool:
    return post_turn(gw, {"model": ALL, "input": "again?"}, _auth(key)).status_code == 200


@settings(derandomize=True, max_examples=2, deadline=None, database=None, phases=(Phase.generate,),  # (no shrinking:
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.permutations(KINDS))
def test_every_way_a_request_ends_gives_its_slot_back(carol, sequence):
    # each step of a failing example would wait its 10 s: the failure names the kind that leaked)
    gw, key = carol
    for kind in sequence:
        _request(kind, gw, key)
        wait_until(lambda: _slot_free(gw, key), 10, f"carol's slot given back after {kind!r}")
    time.sleep(0.2)
    assert scrape(gw, **_auth(key))[("resp2chat_streams_in_flight", ())] == 0
