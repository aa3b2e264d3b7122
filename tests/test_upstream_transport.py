"""Per-upstream transport settings through a real mitmdump (settings.py ``per_upstream``: an
``upstreams`` entry's own value wins over the top-level one): ``upstream_headers`` reach the
upstream they are set for and no other (a fallback included, over HTTP and the WebSocket);
``connect_timeout_secs`` and ``upstream_idle_timeout_secs`` apply to their upstream only: the
next upstream answers, or the turn fails naming the timeout.

Backends are real HTTP servers of the test's own (they record each request's headers) and the
bundled demo upstream.
"""

from __future__ import annotations

import json
import queue
import socket
import threading

import pytest
import requests

from helpers import (start_sse, DONE, LocalServer, QuietHandler, chat_event, http_chunk, send_json,
                     start_gateway, stream_turn, terminal, wait_until)
from resp2chat_io.demo_upstream import serve_in_thread
from wsclient import WSClient


class Recorder:
    """A chat backend that records every request (headers, lower-case names; model) and answers
    ``ok from NAME`` as a stream, or with ``status`` for the models in ``refuse``. ``hold``:
    models whose answer waits until ``release[model]`` is set (``gone``: the request is dropped
    unanswered)."""

    def __init__(self, name: str, refuse: dict[str, int] | None = None, hold: tuple[str, ...] = ()) -> None:
        self.calls: list[dict] = []
        self.release = {m: threading.Event() for m in hold}
        self.gone = threading.Event()
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.calls.append({"model": body["model"], "headers": {k.lower(): v for k, v in self.headers.items()}})
                status = (refuse or {}).get(body["model"])
                if status:
                    send_json(self, status, {"error": {"message": "not now", "type": "server_error"}})
                    return
                if body["model"] in outer.release:
                    release = outer.release[body["model"]]
                    while not release.wait(0.05):  # (silent until the test says so, or it ends)
                        if outer.gone.is_set():
                            return
                start_sse(self)
                self.wfile.write(http_chunk(chat_event({"role": "assistant", "content": f"ok from {name}"}))
                                 + http_chunk(chat_event(finish="stop")) + http_chunk(DONE) + b"0\r\n\r\n")

        self.server = LocalServer(Handler)
        self.base_url = self.server.url + "/v1"

    def close(self) -> None:
        self.gone.set()  # (what is still held is dropped unanswered)
        self.server.close()

    def headers(self, model: str) -> list[dict]:
        return [c["headers"] for c in self.calls if c["model"] == model]


@pytest.fixture
def demo():
    server, url = serve_in_thread()
    yield url
    server.shutdown()
    server.server_close()


def _gateway(tmp_path, entries, *extra):
    return start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                         "--set", "resp2chat_max_replay_entries=0", *extra)


def _text(events: list[dict]) -> str:
    assert terminal(events)["type"] == "response.completed", terminal(events)
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def _failed(events: list[dict]) -> dict:
    assert terminal(events)["type"] == "response.failed", [e["type"] for e in events]
    return terminal(events)["response"]["error"]


A_SECRET = "sk-a-header-secret-4711"


def test_an_upstreams_own_headers_reach_it_and_no_other(tmp_path):
    a = Recorder("a", refuse={"both": 503})
    b = Recorder("b")
    entries = [{"name": "a", "base_url": a.base_url, "models": ["a-*", "both"],
                "upstream_headers": {"HTTP-Referer": "https://a.example", "api-key": A_SECRET}},
               {"name": "b", "base_url": b.base_url, "models": ["b-*", "both"]}]  # (b: the top-level headers)
    flows = tmp_path / "flows.mitm"
    gw = _gateway(tmp_path, entries, "--set", 'resp2chat_upstream_headers={"X-Title": "team gateway"}',
                  "-w", str(flows))
    try:
        assert _text(stream_turn(gw, {"model": "a-1", "input": "hi"})) == "ok from a"
        assert _text(stream_turn(gw, {"model": "b-1", "input": "hi"})) == "ok from b"
        # a refuses "both" before its first byte: b answers, without a's headers
        assert _text(stream_turn(gw, {"model": "both", "input": "hi"})) == "ok from b"
        ws = WSClient(gw.base_url, timeout=30)
        try:
            ws.send({"type": "response.create", "model": "a-ws", "input": "hi"})
            assert _text([e for e in ws.events()]) == "ok from a"
        finally:
            ws.sock.close()
        for got in a.headers("a-1") + a.headers("both") + a.headers("a-ws"):
            assert got["http-referer"] == "https://a.example" and got["api-key"] == A_SECRET
            assert "x-title" not in got  # (an entry's map replaces the top-level one)
        for got in b.headers("b-1") + b.headers("both"):
            assert got["x-title"] == "team gateway"
            assert "http-referer" not in got and "api-key" not in got and A_SECRET not in json.dumps(got)
        assert len(a.calls) == 3 and [c["model"] for c in b.calls] == ["b-1", "both"]
    finally:
        gw.stop()
        a.close()
        b.close()
    # a header named like a credential is a secret: not in the flow file, nor the log
    assert flows.read_bytes() and A_SECRET.encode() not in flows.read_bytes()
    assert A_SECRET not in gw.log()


class _Full:
    """A listening port that completes no more connections: its accept queue (backlog 0) is held
    full by one connection nobody accepts, so a connect to it waits until the caller gives up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.filler = socket.create_connection(self.sock.getsockname())
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def close(self) -> None:
        self.filler.close()
        self.sock.close()


def test_a_per_upstream_connect_timeout_falls_back_or_fails_the_turn_naming_it(tmp_path, demo):
    full = _Full()
    entries = [{"name": "stuck", "base_url": full.base_url, "models": ["*"], "connect_timeout_secs": 1},
               {"name": "demo", "base_url": demo, "models": ["demo-model"]}]
    # the top level waits for a connection without a limit: only stuck's own second ends its wait
    gw = _gateway(tmp_path, entries, "--set", "resp2chat_connect_timeout_secs=0")
    try:
        events = stream_turn(gw, {"model": "demo-model", "input": "hello"}, timeout=30)
        assert _text(events) == "You said: hello"  # stuck gave up after 1 s: demo answered
        assert "upstream stuck failed before its first byte (HTTP 502)" in gw.log()
        err = _failed(stream_turn(gw, {"model": "alone", "input": "hello"}, timeout=30))  # stuck alone
        assert err["code"] == "server_error"
        assert f"cannot connect to the upstream {full.base_url.removesuffix('/v1')}: timed out after 1 s" \
            in err["message"], err
        whole = requests.post(gw.base_url + "/responses", json={"model": "alone", "input": "x"}, timeout=30)
        assert whole.status_code == 502 and "timed out after 1 s" in whole.json()["error"]["message"]
        error = whole.json()["error"]
        assert (error["type"], error["code"]) == ("upstream_error", "server_error") and whole.headers["x-request-id"]
    finally:
        gw.stop()
        full.close()


def test_a_per_upstream_idle_timeout_applies_to_that_upstream_only(tmp_path, demo):
    quiet = Recorder("quiet", hold=("quiet", "fb", "patient"))  # silent until released (quiet and fb: never)
    entries = [{"name": "quiet", "base_url": quiet.base_url, "models": ["quiet", "fb"], "upstream_idle_timeout_secs": 1},
               {"name": "demo", "base_url": demo, "models": ["fb", "demo-model"]},
               {"name": "patient", "base_url": quiet.base_url, "models": ["patient"]}]  # (the same backend)
    gw = _gateway(tmp_path, entries, "--set", "resp2chat_keepalive_secs=0")  # (top level: 60 s)
    done: queue.Queue = queue.Queue()
    try:
        # a turn to patient waits on the silent backend meanwhile (the top-level 60 s apply to it)
        threading.Thread(target=lambda: done.put(stream_turn(gw, {"model": "patient", "input": "x"}, timeout=60)),
                         daemon=True).start()
        wait_until(lambda: quiet.headers("patient"), what="patient's request at the backend")
        err = _failed(stream_turn(gw, {"model": "quiet", "input": "x"}, timeout=30))  # quiet alone
        assert (err["code"], err["type"]) == ("server_error", "upstream_timeout"), err
        assert "the upstream sent nothing for 1 s" in err["message"], err
        whole = requests.post(gw.base_url + "/responses", json={"model": "quiet", "input": "x"}, timeout=30)
        error = whole.json()["error"]
        assert whole.status_code == 502 and (error["type"], error["code"]) == ("upstream_error", "upstream_timeout"), error
        # fb: quiet is silent for its 1 s, then demo answers (a silence before the first byte falls back)
        assert _text(stream_turn(gw, {"model": "fb", "input": "hello"}, timeout=30)) == "You said: hello"
        assert "upstream quiet failed before its first byte (HTTP 504)" in gw.log()
        assert [c["model"] for c in quiet.calls].count("fb") == 1
        assert done.empty()  # patient's turn is still waiting, silent for more than 1 s by now…
        quiet.release["patient"].set()
        assert _text(done.get(timeout=30)) == "ok from quiet"  # …and is answered
    finally:
        gw.stop()
        quiet.close()
