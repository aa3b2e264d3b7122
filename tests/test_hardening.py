"""Hardening: timeouts, disconnects, malformed input, secrets, resource use, a short soak."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    KiB, LocalServer, QuietHandler, chat_chunk, chat_sse, codex_fixture, http_chunk, iter_sse, memory, open_fds,
    openai_client, parse_sse, send_json, send_text_chunk, start_sse, stream_turn, terminal, wait_until,
)
from soak import soak

DEAD = "http://127.0.0.1:9"


def failed_error(events: list[dict]) -> dict:
    assert events[-1]["type"] == "response.failed", [e["type"] for e in events]
    assert sum(e["type"].startswith("response.") and "response" in e and e["response"]["status"] != "in_progress"
               for e in events) == 1
    return events[-1]["response"]["error"]


# --- upstream down, stalled, cut ----------------------------------------------------------------


def test_upstream_down_is_a_clear_error_not_a_reset(gateway_factory):
    gw = gateway_factory(DEAD)
    err = failed_error(stream_turn(gw, {"model": "m", "input": "anyone there?"}))
    assert err["code"] == "server_error" and "cannot connect to the upstream http://127.0.0.1:9" in err["message"]
    whole = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "x"}, timeout=30)
    assert whole.status_code == 502 and "cannot connect" in whole.json()["error"]["message"]


class _Slow(QuietHandler):
    """A long prefill: sends its response headers only once `release` is set, then one answer
    (with `headers_first`, like llama.cpp: headers at once, the silence after them)."""

    release = threading.Event()
    headers_first = False
    forever = False
    closed: list[float] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        if not type(self).headers_first:
            type(self).release.wait(60)
        start_sse(self)
        if type(self).headers_first:
            self.wfile.flush()
            type(self).release.wait(60)
        n = 0
        try:
            while True:
                send_text_chunk(self, n)
                n += 1
                if n == 3 and not type(self).forever:
                    self.wfile.write(http_chunk(chat_sse(chat_chunk(finish="stop"))) + b"0\r\n\r\n")
                    return
                time.sleep(0.05)  # (a model's pace, not a wait)
        except OSError:
            type(self).closed.append(time.monotonic())


@pytest.fixture
def slow_upstream():
    _Slow.closed, _Slow.forever, _Slow.headers_first, _Slow.release = [], False, False, threading.Event()
    with LocalServer(_Slow) as server:
        yield server, _Slow
        _Slow.release.set()


def test_silent_upstream_times_out_with_response_failed(slow_upstream, gateway_factory):
    server, handler = slow_upstream  # never released: only the idle timeout can end the turn
    gw = gateway_factory(f"http://127.0.0.1:{server.server_address[1]}", "--set", "resp2chat_request_timeout_secs=1",
                         "--set", "resp2chat_keepalive_secs=0")
    err = failed_error(stream_turn(gw, {"model": "m", "input": "anyone?"}))
    assert (err["code"], err["type"]) == ("server_error", "upstream_timeout") and "sent nothing for 1 s" in err["message"]


@pytest.mark.parametrize("headers_first", [False, True], ids=["head-late", "head-first"])
def test_prefill_keepalive_sends_data_events(slow_upstream, gateway_factory, headers_first):
    """While the backend is silent (it answers only once released), the client hears
    response.created at once and then keepalive data events; then the answer."""
    server, handler = slow_upstream
    handler.headers_first = headers_first
    gw = gateway_factory(f"http://127.0.0.1:{server.server_address[1]}", "--set", "resp2chat_keepalive_secs=1")
    types = []
    with requests.post(gw.base_url + "/responses", json={"model": "m", "input": "x", "stream": True},
                       stream=True, timeout=30) as r:
        for event in iter_sse(r):
            types.append(event["type"])
            if types == ["response.created"] + ["response.in_progress"] * 3:  # two keepalives after the first
                handler.release.set()  # all of that came before the backend said anything
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.in_progress", "response.in_progress"]  # the keepalives
    assert types[-1] == "response.completed"


def test_client_disconnect_cancels_the_upstream_request(slow_upstream, gateway_factory):
    server, handler = slow_upstream
    handler.forever = True
    handler.release.set()
    gw = gateway_factory(f"http://127.0.0.1:{server.server_address[1]}")
    with requests.post(gw.base_url + "/responses", json={"model": "m", "input": "x", "stream": True},
                       stream=True, timeout=30) as r:
        for event in iter_sse(r):
            if event["type"] == "response.output_text.delta":
                break
    # closing the client connection stops the backend's generation (which never ends by itself)
    wait_until(lambda: handler.closed, what="the backend request being closed")


def test_aborted_streams_leave_no_growth(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0", "--set", "flow_detail=0")
    body = json.dumps({"model": "m", "input": "words: 400\nnoreason\nslow: 5", "stream": True}).encode()
    request = (f"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1:{gw.port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body

    def abort_one():
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(request)
            got = b""
            while b"output_text.delta" not in got:
                got += s.recv(65536)

    fds0 = open_fds(gw.proc.pid)  # before any turn

    def all_closed():  # every aborted turn's sockets (client, relay, backend) are closed again
        return open_fds(gw.proc.pid) <= fds0 + 4

    for _ in range(20):  # warm up: imports, pools, allocator
        abort_one()
    wait_until(all_closed, what=f"the gateway's open files going back to {fds0}")
    rss0 = memory(gw.proc.pid)["VmRSS"]
    for _ in range(200):
        abort_one()
    wait_until(all_closed, what=f"the gateway's open files going back to {fds0} after 200 aborted streams")
    rss1 = memory(gw.proc.pid)["VmRSS"]
    assert rss1 - rss0 < 15_000 * KiB, f"RSS grew {(rss1 - rss0) // KiB} KiB over 200 aborted streams"


# --- malformed input -------------------------------------------------------------------------


def test_oversized_body_is_413(gateway_factory, upstream):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_request_body_mb=1")
    big = {"model": "m", "input": "x" * (1_200_000)}
    r = requests.post(gw.base_url + "/responses", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.headers["x-request-id"].startswith("req_")
    ok = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "small"}, timeout=30)
    assert ok.status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["type", "role", "content", "text", "name", "call_id", "arguments", "output", "input", "tools",
         "model", "image_url", "summary", "namespace", "tool_choice", "format"]), inner, max_size=5),
    max_leaves=20)


def _mutate(body: dict, path: list, value):
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@st.composite
def broken_codex_bodies(draw):
    body = codex_fixture("03-tool-call-turn2-with-output.json")["body"]
    body["input"] = body["input"][2:]  # keep it small: fewer bytes per example
    body["tools"] = body["tools"][:2]
    i = draw(st.integers(0, len(body["input"]) - 1))
    item = body["input"][i]
    key = draw(st.sampled_from(sorted(item) + ["type", "nonsense"]))
    return _mutate(body, ["input", i, key], draw(json_values))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, broken_codex_bodies()))
def test_fuzz_requests_are_400_or_served_in_process(body):
    from resp2chat_core.errors import GatewayError
    from resp2chat_core.lowering import LoweringOptions
    from resp2chat_core.turn import begin_turn

    try:
        turn = begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 0)
    except GatewayError as err:
        assert err.status == 400 and err.message
        return
    assert json.loads(turn.chat_body)["messages"] is not None


def test_fuzzed_requests_through_mitmdump_never_500_or_hang(gateway):
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(st.one_of(json_values, broken_codex_bodies()))
    def check(body):
        r = requests.post(gateway.base_url + "/responses", data=json.dumps(body), timeout=20,
                          headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), r.text[:300]
        if r.status_code == 400:
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error"

    check()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"data: [DONE]\n\n", b"data: {}\n\n", b": ping\n\n", b"data: {\"choices\":null}\n\n",
                     b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"\r\n", b"data: {\"error\":1}\n\n",
                     b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}\n\n',
                     b'data: {"choices":[{"delta":{"tool_calls":[{"function":{"name":"x"}}]},"finish_reason":"length"}]}\n\n']),
), max_size=12))
def test_fuzz_upstream_garbage_ends_in_exactly_one_terminal_event(pieces):
    from resp2chat_core.translator import Translator, TurnContext

    t = Translator(TurnContext("resp_fuzz", 0, "m"))
    out = b"".join(t.feed(p) for p in pieces) + t.finish()
    assert t.feed(b"data: more\n\n") == b"" and t.finish() == b""
    events = parse_sse(out)
    terminal(events)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


# --- secrets -------------------------------------------------------------------------------


class _LeakyAuth(QuietHandler):
    """An upstream that echoes the key it got in its 401 body, as some providers do."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        send_json(self, 401, {"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}})


def test_secrets_never_reach_logs_flows_or_clients(gateway_factory, tmp_path):
    key, client_key = "sk-planted-secret-4242abcd", "sk-client-planted-9999"
    flows, log = tmp_path / "f.mitm", tmp_path / "up.jsonl"
    with LocalServer(_LeakyAuth) as server:
        gw = gateway_factory(server.url, "-w", str(flows),
                             "--set", f"resp2chat_upstream_request_log_path={log}",
                             "--set", "termlog_verbosity=debug", "--set", "flow_detail=4",
                             env={"RESP2CHAT_UPSTREAM_API_KEY": key})
        client = openai_client(gw, api_key=client_key)
        events = list(client.responses.create(model="m", input="hi", stream=True))
        with pytest.raises(openai.InternalServerError) as info:
            client.responses.create(model="m", input="hi")
        gw.stop()
    # the gateway's key refused: the client reads that (a 502, server_error), not the backend's words
    error = events[-1].response.error
    assert events[-1].type == "response.failed" and error.code == "server_error"
    assert "refused the gateway's credentials" in error.message and "Incorrect API key" not in error.message
    assert info.value.status_code == 502 and info.value.code == "upstream_key_refused"
    for text in (error.message, str(info.value), gw.log(), flows.read_bytes().decode("utf-8", "replace"),
                 log.read_text()):
        assert key not in text and client_key not in text
    # the operator's log has the backend's words, scrubbed, once a turn
    assert gw.log().count("Incorrect API key provided: sk-[redacted]") == 2, gw.log()


class _HtmlError(QuietHandler):
    """A proxy in front of the backend that answers 502 with an HTML page naming internals."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        body = b"<html><body>502 Bad Gateway: upstream 10.0.0.7:8000 password=hunter2</body></html>"
        self.send_response(502)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_upstream_5xx_words_go_to_the_operator_not_the_client(upstream, gateway_factory, tmp_path):
    """A backend's 5xx body and any non-JSON error body are the operator's: the client gets the
    upstream status and the request id; the words are in the gateway's log and the flow file.
    A 4xx JSON error is the client's: its text stays (scrubbed of key-like strings)."""
    from mitmproxy import io

    flows = tmp_path / "flows.mitm"
    with LocalServer(_HtmlError) as html:
        gw = gateway_factory(upstream.origin, "-w", str(flows))
        proxied = gateway_factory(html.url)
        planted = "password=hunter2 at 10.0.0.7"
        events = stream_turn(gw, {"model": "m", "input": f"error: 503 db down {planted}"})
        err = failed_error(events)
        rid = err["message"].split("request id ")[1].split(";")[0]
        assert err["code"] == "server_error" and err["message"].startswith("upstream HTTP 503: ")
        assert "hunter2" not in err["message"] and rid.startswith("req_")
        whole = requests.post(gw.base_url + "/responses", json={"model": "m", "input": f"error: 500 {planted}"}, timeout=30)
        assert whole.status_code == 502 and "hunter2" not in whole.text and whole.headers["x-request-id"] in whole.text
        page = requests.post(proxied.base_url + "/responses", json={"model": "m", "input": "x"}, timeout=30)
        assert page.status_code == 502 and "hunter2" not in page.text and "10.0.0.7" not in page.text
        assert page.json()["error"]["message"].startswith("upstream HTTP 502: the upstream failed")
        kept = failed_error(stream_turn(gw, {"model": "m", "input": "error: 400 unknown field foo"}))
        assert kept["code"] == "invalid_prompt" and kept["message"] == "upstream HTTP 400: unknown field foo"
        # the operator's side: the log names the request id with the backend's words, and so does the flow
        assert wait_until(lambda: f"{rid} failed (server_error): upstream HTTP 503: db down {planted}" in gw.log())
        assert "502 Bad Gateway: upstream 10.0.0.7:8000 password=hunter2" in proxied.log()
        gw.stop()
        with flows.open("rb") as fh:
            recorded = [f.metadata["resp2chat"] for f in io.FlowReader(fh).stream() if "resp2chat" in f.metadata]
        details = [m["error"]["detail"] for m in recorded if "error" in m]
        assert f"upstream HTTP 503: db down {planted}" in details


# --- soak ----------------------------------------------------------------------------------


def test_short_soak_loses_nothing(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0", "--set", "flow_detail=0")
    stats = asyncio.run(soak(gw.base_url, streams=32, seconds=6, words=30))
    assert stats.failures == []
    assert stats.streams >= 32 and stats.events > 32 * 30


# --- https upstreams (the relay speaks TLS to the backend) -------------------------------------


@pytest.fixture
def tls_upstream(tmp_path):
    import ssl
    import subprocess

    from resp2chat_io.demo_upstream import make_server

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "k.pem",
                    "-out", tmp_path / "c.pem", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = make_server()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_https_upstream_verified_unless_told_otherwise(tls_upstream, gateway_factory):
    strict = gateway_factory(DEAD, "--set", f"resp2chat_upstream_base_url={tls_upstream}")
    r = requests.post(strict.base_url + "/responses", json={"model": "m", "input": "over tls"}, timeout=30)
    assert r.status_code == 502 and "CERTIFICATE_VERIFY_FAILED" in r.json()["error"]["message"]
    insecure = gateway_factory(DEAD, "--set", f"resp2chat_upstream_base_url={tls_upstream}", "--set", "ssl_insecure=true")
    for turn in range(2):  # a second turn: the relay pools the kept-alive TLS connection
        events = stream_turn(insecure, {"model": "m", "input": f"over tls {turn}"})
        assert events[-1]["type"] == "response.completed"
        assert events[-1]["response"]["output"][-1]["content"][0]["text"] == f"You said: over tls {turn}"


@pytest.mark.parametrize("path", ["/v1/%72esponses", "/v1//responses", "/v1/./responses", "/v1/x/../responses"])
def test_a_gateway_path_in_disguise_reaches_no_backend(gateway, upstream, path):
    """A backend that percent-decodes or normalises paths (uvicorn: vLLM) would serve its own
    /v1/responses to these, past validation, tool_denylist and routing."""
    upstream.clear()
    body = b'{"model": "m", "input": "hi"}'
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:  # the path as it is:
        s.sendall(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                  b"connection: close\r\n\r\n%s" % (path.encode(), len(body), body))  # (HTTP clients normalise it)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(payload)["error"]["code"] == "invalid_path"
    assert upstream.requests() == []
