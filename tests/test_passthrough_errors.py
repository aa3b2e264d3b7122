"""A passthrough call (``passthrough_paths``: the model list, embeddings…) whose backend fails
before its answer's head gets the gateway's JSON error, as every other gateway failure does, not
mitmproxy's HTML page: real mitmdump gateways, real loopback backends made of raw sockets, real
clients (requests, the openai SDK).

Before, each of these was mitmproxy's ``502 Bad Gateway`` page (``text/html``: "server closed
connection", "Connect call failed"…), which the openai SDK hands on as a raw text body (no
``code``); a backend that took the request and said nothing held the client until mitmproxy's
``tcp_timeout`` (600 s) and then closed the connection; a revoked key's passthrough cut before its
head read as that page too; so did a request head mitmproxy could not read (its 400).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time

import openai
import pytest
import requests

from helpers import (RawServer, cli_env, free_port, openai_client, post_turn, read_request, run_cli, scrape,
                     start_gateway, wait_until)
import test_security_gate

UP_KEY = "sk-upstream-planted-7777pqrs"
WAIT = 1  # the gateway's connect_timeout_secs and upstream_idle_timeout_secs here
BIG = 48 << 20  # more than every socket buffer between a backend and a client that reads nothing
tls_files = test_security_gate.tls_files  # (a fixture: the gateway's certificate, its CA)


class RawBackend(RawServer):
    """A backend that reads a request and then does what the model in its path (``GET
    /v1/models/NAME``) or its body (``"model": NAME``) says: ``close`` (closes before answering),
    ``reset`` (resets the connection), ``cut`` (half a head repeating its Authorization, then
    closes), ``bad`` (a head with a line that is no header field, the Authorization in it),
    ``hang`` (never answers: ``held`` counts them, ``gone`` those the gateway hung up on),
    ``gzip`` (a compressed answer), ``ok`` (``{}`` at once), ``rid`` (the same, with an
    ``x-request-id`` of its own), ``stall``, ``stall-eof``,
    ``stall-chunked`` (a head and part of a body, by content-length, by its connection's end,
    chunked; then nothing (not JSON: the suite's requests hook would read it whole): ``stalled`` counts them, ``unstalled`` those the gateway hung up
    on), ``drip`` (an SSE event every ``WAIT / 3`` s for ``3 * WAIT`` s), ``big`` (``BIG``
    bytes at once),
    ``slow`` (its head at once, then a byte of its body every ``WAIT / 2`` s, ``3 * WAIT`` s
    in all)."""

    def __init__(self) -> None:
        self.held, self.gone, self.stalled, self.unstalled = 0, 0, 0, 0
        super().__init__()

    def serve(self, conn: socket.socket, index: int) -> None:
        got = read_request(conn, bytearray())
        if got is None:
            return
        head, body = got
        request = head + b"\r\n\r\n" + body
        auth = next((line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                     if line.lower().startswith(b"authorization:")), b"none")
        line = head.split(b"\r\n", 1)[0].split(b" ")
        what = line[1].rsplit(b"/", 1)[1].decode() if line[0] == b"GET" else json.loads(body)["model"]
        if what == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif what == "cut":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-echo: " + auth + b"\r\n")
        elif what == "bad":
            conn.sendall(b"HTTP/1.1 200 OK\r\nx-echo " + auth + b"\r\ncontent-length: 0\r\n\r\n")
        elif what == "ok":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        elif what == "rid":  # (an answer with a request id of the backend's own)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: backend-rid-42\r\n"
                         b"content-length: 2\r\n\r\n{}")
        elif what == "gzip":  # (a compressed answer, although asked for none: the gateway's 502)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 4\r\n\r\nabcd")
        elif what == "te":
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + auth + b"\r\n\r\n")
        elif what == "slow":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 6\r\n\r\n")
            for byte in b"[1,2] ":
                time.sleep(WAIT / 2)
                conn.sendall(bytes([byte]))
        elif what in ("stall", "stall-eof", "stall-chunked"):  # (part of a body, then silence)
            head = {"stall": b"content-length: 10\r\n", "stall-eof": b"",
                    "stall-chunked": b"transfer-encoding: chunked\r\n"}[what]
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + head + b"\r\n"
                         + (b"2\r\n[1\r\n" if what == "stall-chunked" else b"[1"))
            self.stalled += 1
            conn.settimeout(None)
            while conn.recv(65536):
                pass
            self.unstalled += 1
        elif what == "drip":  # (an SSE stream: an event every WAIT / 3 s, 3 * WAIT s long)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(9):
                time.sleep(WAIT / 3)
                event = b"data: %d\n\n" % i
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            conn.sendall(b"0\r\n\r\n")
        elif what == "big":  # (BIG bytes at once: a client that reads slowly holds them up)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % BIG)
            conn.sendall(b"x" * BIG)
        elif what == "hang":
            self.held += 1
            conn.settimeout(None)
            while conn.recv(65536):
                pass
            self.gone += 1


@pytest.fixture(scope="module")
def backend():
    server = RawBackend()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(backend, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("passthrough-errors")
    gateway = start_gateway(backend.url, tmp, "--set", f"resp2chat_upstream_api_key={UP_KEY}",
                            "--set", "resp2chat_max_replay_entries=0", "--set", f"resp2chat_connect_timeout_secs={WAIT}",
                            "--set", f"resp2chat_upstream_idle_timeout_secs={WAIT}",
                            "--set", f"resp2chat_access_log_path={tmp / 'access.jsonl'}")
    gateway.access = tmp / "access.jsonl"
    yield gateway
    gateway.stop()
    assert UP_KEY not in gateway.log() + gateway.access.read_text()


def logged(gw, rid: str | None = None, path: str | None = None) -> dict:
    """The access-log line of request ``rid`` (or the last of ``path``), waited for: a line is
    written as its flow ends."""
    def line():
        text = gw.access.read_text() if gw.access.exists() else ""
        return next((x for x in reversed([json.loads(t) for t in text.splitlines()])
                     if x["request_id"] == rid or x["path"] == path), None)
    wait_until(line, 10, f"the access-log line of {rid or path}")
    return line()


def refused(gw, headers: dict | None = None, **labels) -> float:
    """``resp2chat_refused_requests_total`` for ``labels`` (client "" unless given), asked with
    ``headers``."""
    key = tuple(sorted({"client": "", **labels}.items()))
    return scrape(gw, **(headers or {})).get(("resp2chat_refused_requests_total", key), 0.0)


def json_error(r: requests.Response, status: int, code: str) -> dict:
    """The gateway's JSON error of ``r``: its status, code and request id (in the body's words
    nothing of the backend's: the upstream key it repeated)."""
    assert r.status_code == status, (r.status_code, r.headers, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), (r.headers, r.text[:300])
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"], error
    assert r.headers["x-request-id"].startswith("req_")
    assert UP_KEY not in r.text and "sk-upstream" not in r.text, r.text
    return error


@contextlib.contextmanager
def waiting_gateway(origin: str, tmp_path, hook: str | None = None):
    """A gateway on ``origin`` that waits ``WAIT`` s for a connection and ``WAIT`` s more for an
    answer's head (``connect_timeout_secs``, ``upstream_idle_timeout_secs``), replay cache off,
    with ``hook`` (a mitmproxy script's text) loaded after it; stopped on leaving."""
    hooked = ()
    if hook is not None:
        script = tmp_path / "hook.py"
        script.write_text(hook)
        hooked = ("-s", str(script))
    gw = start_gateway(origin, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                       "--set", f"resp2chat_connect_timeout_secs={WAIT}",
                       "--set", f"resp2chat_upstream_idle_timeout_secs={WAIT}", *hooked)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.mark.parametrize("what", ["close", "reset", "cut", "bad", "te"])
def test_a_backend_failing_before_its_head_is_a_json_502(gw, what):
    """Closed before answering, reset, half a head then closed, a head that does not parse (the
    last two repeating the upstream key): ``upstream_unavailable`` 502, JSON, its request id;
    the model list and embeddings alike."""
    json_error(requests.get(f"{gw.base_url}/models/{what}", timeout=30), 502, "upstream_unavailable")
    json_error(requests.post(f"{gw.base_url}/embeddings", json={"model": what, "input": "hi"}, timeout=30),
               502, "upstream_unavailable")


def test_a_backend_that_never_answers_is_a_json_504_in_time(gw, backend):
    """A backend that took the request and says nothing: after ``connect_timeout_secs`` +
    ``upstream_idle_timeout_secs`` the client gets ``upstream_timeout`` 504 and the backend
    call is dropped (before: nothing until mitmproxy's 600 s ``tcp_timeout``)."""
    gone = backend.gone
    started = time.monotonic()
    error = json_error(requests.get(f"{gw.base_url}/models/hang", timeout=20), 504, "upstream_timeout")
    assert time.monotonic() - started < 2 * WAIT + 5
    assert "upstream_idle_timeout_secs" in error["message"]
    wait_until(lambda: backend.gone > gone, 5, "the backend call dropped")


def test_a_backend_that_never_takes_the_connection_is_a_json_504_in_time(tmp_path):
    """A backend whose connections are never taken (its accept queue full: SYNs unanswered, as
    a host that drops them): the connect itself is ended by the same deadline, a 504 (before:
    mitmproxy's connect has no timeout of its own, ~2 min of the system's SYN retries, then its
    502 page)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)  # (the queue's one place)
    try:
        with waiting_gateway(f"http://127.0.0.1:{port}", tmp_path) as gw:
            started = time.monotonic()
            error = json_error(requests.get(f"{gw.base_url}/models", timeout=20), 504, "upstream_timeout")
            assert time.monotonic() - started < 2 * WAIT + 5
            assert "took no connection" in error["message"], error
    finally:
        filler.close()
        listener.close()


def test_a_passthrough_whose_head_came_in_time_is_not_cut(gw):
    """The deadline is the head's: an answer whose head came at once and whose body takes
    longer than that deadline, its bytes never ``upstream_idle_timeout_secs`` apart, is passed
    on whole."""
    r = requests.get(f"{gw.base_url}/models/slow", timeout=30)
    assert r.status_code == 200 and r.json() == [1, 2], r.text[:300]


def test_a_passthrough_failed_before_its_head_is_logged_and_counted(gw):
    """Each failure before the answer's head is the gateway's own error (502, 504), so it is in
    the access log (its path, status ``failed``, its code and HTTP status, its request id) and in
    ``resp2chat_refused_requests_total`` by its ``passthrough_paths`` entry, as the gateway's
    other errors for such requests are; the path is the client's, not the upstream's. So is the
    gateway's 502 in place of a compressed answer. Before, neither said anything of them."""
    cases = [("GET /v1/models/*", lambda: requests.get(f"{gw.base_url}/models/close", timeout=30), 502,
              "upstream_unavailable", "/v1/models/close"),
             ("POST /v1/embeddings", lambda: requests.post(f"{gw.base_url}/embeddings", json={"model": "hang", "input": "x"},
                                                           timeout=30), 504, "upstream_timeout", "/v1/embeddings"),
             ("GET /v1/models/*", lambda: requests.get(f"{gw.base_url}/models/gzip", timeout=30), 502,
              "upstream_encoded", "/v1/models/gzip")]
    for route, call, status, code, path in cases:
        before = refused(gw, route=route, status="failed", code=code)
        r = call()
        json_error(r, status, code)
        line = logged(gw, r.headers["x-request-id"])
        assert (line["path"], line["http_status"], line["status"], line["code"], line["upstream"]) == \
            (path, status, "failed", code, ""), line
        assert line["total_ms"] > 0
        wait_until(lambda: refused(gw, route=route, status="failed", code=code) == before + 1, 10, f"{route} counted")


def test_a_passthrough_answer_carries_the_gateways_request_id(gw):
    """A passthrough the backend answered carries the gateway's request id as ``x-request-id``,
    as every answer of the gateway's does (its errors, its turns, a cut answer's head: the id its
    access-log line and its log lines name); a request id of the backend's own goes on beside it
    as ``x-upstream-request-id``. Before, the backend's answer went on without the gateway's id
    (with the backend's own as ``x-request-id``, when it sent one)."""
    seen = set()
    for call in (lambda: requests.get(f"{gw.base_url}/models/ok", timeout=30),
                 lambda: requests.post(f"{gw.base_url}/embeddings", json={"model": "ok", "input": "hi"}, timeout=30)):
        r = call()
        assert r.status_code == 200 and r.json() == {}, r.text[:300]
        assert r.headers.get("x-request-id", "").startswith("req_"), r.headers
        assert "x-upstream-request-id" not in r.headers, r.headers
        seen.add(r.headers["x-request-id"])
    r = requests.get(f"{gw.base_url}/models/rid", timeout=30)
    assert r.status_code == 200 and r.json() == {}, r.text[:300]
    assert r.headers.get("x-request-id", "").startswith("req_"), r.headers
    assert r.headers["x-upstream-request-id"] == "backend-rid-42", r.headers
    seen.add(r.headers["x-request-id"])
    assert len(seen) == 3  # (each its own)


@pytest.mark.parametrize("what", ["stall", "stall-eof", "stall-chunked"])
def test_a_passthrough_whose_body_stalls_is_cut_in_time(gw, backend, what):
    """A backend that sends its answer's head and part of its body, then nothing: after
    ``upstream_idle_timeout_secs`` without a byte the answer is cut (its client connection
    closed, as mitmproxy ends one whose backend broke off: the client reads a body cut short,
    whatever the backend's framing: one that ends with its connection goes to the client
    chunked), the backend call is dropped, and the access log and
    ``resp2chat_refused_requests_total`` say so (``failed``, ``upstream_timeout``, the HTTP status
    of the head the client got). Before, the client and the backend connection were held until
    the backend gave up (here: never)."""
    route = dict(route="GET /v1/models/*", status="failed", code="upstream_timeout")
    before, unstalled = refused(gw, **route), backend.unstalled
    started = time.monotonic()
    with requests.get(f"{gw.base_url}/models/{what}", stream=True, timeout=20) as r:
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            r.content  # noqa: B018
    assert time.monotonic() - started < WAIT + 5
    wait_until(lambda: backend.unstalled > unstalled, 5, "the backend call dropped")
    line = logged(gw, r.headers["x-request-id"])  # (the cut answer's head carried its request id)
    assert (line["path"], line["http_status"], line["status"], line["code"]) == \
        (f"/v1/models/{what}", 200, "failed", "upstream_timeout"), line
    wait_until(lambda: refused(gw, **route) == before + 1, 10, "counted")
    assert f"passthrough {line['request_id']}: the upstream sent nothing for {WAIT} s" in gw.log()


def test_a_cut_ends_its_own_call_only_for_a_client_preferring_http2(backend, tls_files, tmp_path):
    """A cut (``_silent``) closes its client's connection, and the check that its client is not
    reading (``writing``) is the connection's: both are one call's because the gateway speaks
    HTTP/1.1 alone, one request at a time on a connection (listen.py turns mitmproxy's ``http2``
    off, even when the operator sets it on), so over TLS a client that prefers h2 gets HTTP/1.1
    by ALPN. curl asking two calls at once, multiplexed on one connection where it can (h2 first
    in its ALPN): the one whose backend stalls is cut in time, the other, longer than that, goes
    on whole. Over HTTP/2 (measured with listen.py's guard taken out) one connection carries both,
    and the cut ends both."""
    gw = start_gateway(backend.url, tmp_path, "--set", f"resp2chat_tls_cert_file={tls_files['cert']}",
                       "--set", f"resp2chat_tls_key_file={tls_files['key']}", "--set", "http2=true",
                       "--set", "resp2chat_max_replay_entries=0", "--set", f"resp2chat_connect_timeout_secs={WAIT}",
                       "--set", f"resp2chat_upstream_idle_timeout_secs={WAIT}")
    try:
        base = f"https://localhost:{gw.port}/v1/models"
        out = subprocess.run(["curl", "-sS", "--http2", "--parallel", "--cacert", str(tls_files["ca"]),
                              "-w", "%{url} %{http_version} %{response_code} %{exitcode}\n",
                              "-o", str(tmp_path / "drip"), f"{base}/drip", "-o", str(tmp_path / "stall"), f"{base}/stall"],
                             capture_output=True, timeout=60)
        calls = {line.split()[0].rsplit("/", 1)[1]: line.split()[1:] for line in out.stdout.decode().splitlines()}
        assert calls["drip"] == ["1.1", "200", "0"], (calls, out.stderr)
        assert (tmp_path / "drip").read_bytes() == b"".join(b"data: %d\n\n" % i for i in range(9))
        assert calls["stall"][:2] == ["1.1", "200"] and calls["stall"][2] != "0", (calls, out.stderr)  # (cut)
    finally:
        gw.stop()


def test_a_passthrough_that_keeps_sending_is_not_cut(gw):
    """The wait is between bytes: an SSE stream longer than ``upstream_idle_timeout_secs`` whose
    events come more often than that is passed on whole."""
    r = requests.get(f"{gw.base_url}/models/drip", timeout=30)
    assert r.status_code == 200 and r.text == "".join(f"data: {i}\n\n" for i in range(9)), r.text[:300]


def test_a_client_that_reads_slowly_is_not_taken_for_a_silent_backend(gw):
    """A client that takes nothing of a large answer for longer than the wait holds the backend
    up (mitmproxy reads the backend only as the client takes its answer): that silence is the
    client's, and the answer is passed on whole once it reads."""
    with requests.get(f"{gw.base_url}/models/big", stream=True, timeout=30) as r:
        assert r.status_code == 200
        time.sleep(3 * WAIT)
        assert len(r.content) == BIG


# A mitmproxy script loaded after the gateway whose request hook takes 3 * WAIT s for a model
# lookup of "ok" (an operator's own addon waiting on something; the gateway's own slow hooks,
# limits on Redis, run before the passthrough is sent on)
SLOW_HOOK = f"""
import asyncio


class Slow:
    async def request(self, flow):
        if flow.request.path.endswith("/models/ok"):
            await asyncio.sleep({3 * WAIT})


addons = [Slow()]
"""


def test_the_deadline_of_a_passthroughs_head_starts_when_it_is_sent(backend, tmp_path):
    """The wait for an answer's head (``connect_timeout_secs`` + ``upstream_idle_timeout_secs``)
    is the backend's: it starts once the request left the gateway's hooks for its backend. A
    hook after the gateway's that takes longer than that (an operator's addon; so would an
    interception in mitmweb) delays the call, it does not fail it. Before, the deadline ran from
    the gateway's own request hook: the client got a 504 ``upstream_timeout`` "the upstream took
    no connection", the backend never asked (and, counted, a failure of the upstream's)."""
    with waiting_gateway(backend.url, tmp_path, SLOW_HOOK) as gw:
        conns = backend.conns
        started = time.monotonic()
        r = requests.get(f"{gw.base_url}/models/ok", timeout=30)
        assert r.status_code == 200 and r.json() == {}, r.text[:300]
        assert time.monotonic() - started >= 3 * WAIT and backend.conns == conns + 1
        # (the deadline itself still holds once the call is sent)
        json_error(requests.get(f"{gw.base_url}/models/hang", timeout=20), 504, "upstream_timeout")


# A mitmproxy script loaded after the gateway (an operator's addon) that asks mitmproxy to stream
# every request body (``request.stream``: the gateway turns ``stream_large_bodies`` off, an addon
# may still ask it), and whose request hook takes 3 * WAIT s for a request marked ``x-slow``
STREAMING_HOOK = f"""
import asyncio


class Streaming:
    def requestheaders(self, flow):
        if flow.response is None:
            flow.request.stream = True

    async def request(self, flow):
        if flow.request.headers.get("x-slow"):
            await asyncio.sleep({3 * WAIT})


addons = [Streaming()]
"""

echo = test_security_gate.echo  # (a fixture: a backend that echoes what it got)


@pytest.mark.parametrize("way", ["option", "addon"])
def test_a_request_body_asked_to_stream_goes_past_no_hook_of_the_gateway(way, echo, gateway_factory, tmp_path):
    """mitmproxy sends a request body it is asked to stream (its ``stream_large_bodies`` option,
    for a body larger than it; an addon that sets ``request.stream`` in its ``requestheaders``
    hook, ``STREAMING_HOOK``) on as it arrives, its head at once, before any ``request`` hook: a
    turn's Responses body went to the chat backend as the client wrote it (the echo backend
    answered a 200 of its own), a passthrough went without its upstream key (the client's
    instead), with the client's encodings, before a client limited to some models was checked.
    The gateway reads every request body whole (each is bounded: ``max_request_body_mb``): it
    turns the option off (listen.py, as it does ``http2``) and streams no request an addon asks
    it to (mitm_head.py ``_whole``): the turn is lowered, each passthrough carries the upstream's
    key, the limited client's other model reaches no backend, and mitmproxy never says it
    streamed."""
    if way == "option":
        asks = ("--set", "stream_large_bodies=1")
    else:
        script = tmp_path / "streaming_hook.py"
        script.write_text(STREAMING_HOOK)
        asks = ("-s", str(script))
    carol = "carol-key-0123456789abcdef"
    gw = gateway_factory(echo.url, *asks, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_UPSTREAM_API_KEY": "sk-upstream-key-for-echo-12345",
                              "RESP2CHAT_CLIENTS": json.dumps([{"name": "carol", "key": carol, "models": ["qwen3-*"]}])})
    auth = {"authorization": f"Bearer {carol}"}
    r = requests.post(gw.base_url + "/responses", json={"model": "qwen3-8b", "input": "hello " * 50}, headers=auth,
                      timeout=20)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["output"][-1]["content"][0]["text"] == "the backend got 'Bearer [redacted]'"  # (scrubbed)
    r = requests.post(gw.base_url + "/embeddings", json={"model": "other-embedder", "input": "x" * 100}, headers=auth,
                      timeout=20)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text[:300]
    r = requests.post(gw.base_url + "/embeddings", json={"model": "qwen3-embed", "input": "x" * 100}, headers=auth,
                      timeout=20)
    assert r.status_code == 200 and r.json()["path"] == "/v1/embeddings", r.text[:300]
    assert [(line.split()[1], h.get("authorization")) for line, h, _ in echo.seen] == [
        ("/v1/chat/completions", "Bearer sk-upstream-key-for-echo-12345"),
        ("/v1/embeddings", "Bearer sk-upstream-key-for-echo-12345")]
    assert json.loads(echo.seen[0][2])["messages"], echo.seen[0][2][:300]  # (a chat request: lowered)
    assert all(h.get("accept-encoding") in (None, "identity") for _, h, _ in echo.seen), echo.seen
    assert "Streaming request to" not in gw.log()  # (mitmproxy's words for a body it streams)


def test_the_deadline_of_a_passthroughs_head_holds_when_an_addon_asks_to_stream_its_body(backend, tmp_path):
    """An addon's ``request.stream`` does not stream a passthrough's body (the test above): it
    is read whole and sent once every hook is done, so the deadline of the answer's head starts
    then, as for any other request: a backend that takes the body and says nothing is a 504
    ``upstream_timeout`` in time, and a hook after the gateway's that takes longer than that
    deadline delays the call, it does not fail it. (Before, such a body streamed to its backend
    before the hooks, which mitm_head.py followed to its end to start that deadline.)"""
    with waiting_gateway(backend.url, tmp_path, STREAMING_HOOK) as gw:
        gone = backend.gone
        started = time.monotonic()
        r = requests.post(f"{gw.base_url}/embeddings", json={"model": "hang", "input": "x" * 1000}, timeout=20)
        json_error(r, 504, "upstream_timeout")
        assert time.monotonic() - started < 2 * WAIT + 5
        wait_until(lambda: backend.gone > gone, 5, "the backend call dropped")
        started = time.monotonic()
        r = requests.post(f"{gw.base_url}/embeddings", json={"model": "ok", "input": "x" * 1000},
                          headers={"x-slow": "1"}, timeout=30)
        assert r.status_code == 200 and r.json() == {}, r.text[:300]
        assert time.monotonic() - started >= 3 * WAIT
        assert "Streaming request to" not in gw.log()


def test_the_openai_sdk_reads_the_json_error(gw):
    """The SDK's ``APIStatusError`` carries the parsed error: its ``code`` and body (before: the
    HTML page as a string, no code)."""
    client = openai_client(gw)
    with pytest.raises(openai.APIStatusError) as err:
        client.models.retrieve("close")
    assert err.value.status_code == 502 and err.value.code == "upstream_unavailable", err.value
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "upstream_unavailable"
    with pytest.raises(openai.APIStatusError) as err:
        client.embeddings.create(model="hang", input="hi")
    assert err.value.status_code == 504 and err.value.code == "upstream_timeout", err.value


def test_an_unreachable_backend_is_a_json_502_for_requests_and_the_sdk(tmp_path):
    """Nothing listens at the backend's port: ``cannot connect to the upstream …``, JSON; the
    gateway's log says so with the request id the client got."""
    gw = start_gateway(f"http://127.0.0.1:{free_port()}", tmp_path, "--set", f"resp2chat_upstream_api_key={UP_KEY}",
                       "--set", "resp2chat_max_replay_entries=0")
    try:
        r = requests.get(f"{gw.base_url}/models", timeout=30)
        error = json_error(r, 502, "upstream_unavailable")
        assert error["message"].startswith("cannot connect to the upstream http://127.0.0.1:"), error
        rid = r.headers["x-request-id"]  # (what the operator looks for in the log)
        wait_until(lambda: f"passthrough {rid} failed before its answer: cannot connect" in gw.log(), 10,
                   "the log line")
        client = openai_client(gw)
        for call in (lambda: client.models.list(), lambda: client.embeddings.create(model="m", input="hi")):
            with pytest.raises(openai.APIStatusError) as err:
                call()
            assert err.value.status_code == 502 and err.value.code == "upstream_unavailable", err.value
            assert isinstance(err.value.body, dict) and "cannot connect" in err.value.body["message"]
    finally:
        gw.stop()
    assert UP_KEY not in gw.log()


def test_a_request_head_mitmproxy_cannot_read_is_a_json_400(gw):
    """mitmproxy's own 400 for a request line it cannot read was its HTML page too."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        got = b""
        while more := s.recv(65536):
            got += more
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), got[:300]
    assert b"content-type: application/json" in head.lower(), head
    assert json.loads(body)["error"]["type"] == "invalid_request_error", body


def test_a_revoked_keys_passthrough_cut_before_its_head_reads_as_json(backend, tmp_path):
    """bob's model lookup waits on a backend that does not answer; ``keys revoke bob`` stops it
    (its backend connection closed): bob reads ``invalid_api_key`` 401 JSON, not mitmproxy's
    502 page for a server that closed the connection; the access log and the metrics have it
    as ``rejected``, as a socket the gateway closed for its key."""
    gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                       "--set", f"resp2chat_access_log_path={tmp_path / 'access.jsonl'}", env=cli_env(tmp_path))
    gw.access = tmp_path / "access.jsonl"
    try:
        bob = run_cli(tmp_path, "keys", "add", "bob").stdout.strip()
        ops = {"authorization": "Bearer " + run_cli(tmp_path, "keys", "add", "ops").stdout.strip()}
        wait_until(lambda: post_turn(gw, {"model": "m", "input": "hi"}).status_code == 401, 10, "keys needed")
        answer: dict = {}
        held = backend.held
        call = threading.Thread(target=lambda: answer.update(r=requests.get(
            f"{gw.base_url}/models/hang", headers={"authorization": f"Bearer {bob}"}, timeout=30)))
        call.start()
        wait_until(lambda: backend.held > held, 10, "bob's call at the backend")
        assert run_cli(tmp_path, "keys", "revoke", "bob").returncode == 0
        call.join(20)
        json_error(answer["r"], 401, "invalid_api_key")
        line = logged(gw, answer["r"].headers["x-request-id"])
        assert (line["path"], line["http_status"], line["status"], line["code"], line["client"]) == \
            ("/v1/models/hang", 401, "rejected", "invalid_api_key", "bob"), line
        assert refused(gw, ops, route="GET /v1/models/*", status="rejected", code="invalid_api_key", client="bob") == 1
    finally:
        gw.stop()
