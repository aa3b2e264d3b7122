"""When the relay may ask an upstream again, or the next one, for a turn (relay/upstream.py).

A chat request is not idempotent (the backend runs the model, bills it): the relay sends it again
on a fresh connection only when the backend provably never got it, a pooled connection found
closed before the request was written (``UpstreamClient._connect``), never once its bytes were
written. A backend that reads the request and then closes (or resets) the connection gets it
once; the turn goes the way of any failure before the first byte: the next upstream, or an error.

An empty answer, a 200 stream properly ended with no choices in it (``data: [DONE]`` alone, zero
events), is no answer: when nothing reached the client yet, the next upstream is asked, as for a
stream cut before any data. Raw loopback sockets, counting what each backend received, behind a
real gateway."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest
import requests

from helpers import RawServer, chat_chunk, parse_sse, read_request, start_gateway


def _sse_answer(text: str) -> bytes:
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in (
        chat_chunk({"role": "assistant", "content": text}), chat_chunk({}, "stop"))) + b"data: [DONE]\n\n"
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


class RawBackend(RawServer):
    """A chat backend on a raw loopback socket. ``answer(conn_index, request_index, text)`` says
    what to do with each request: ``bytes`` to send (the connection kept), ``"fin"`` (close after
    reading it), ``"rst"`` (reset after reading it), ``"close-later"`` (answer, then close the idle
    connection a moment later), ``"chatter-later"`` (answer, then send an answer nobody asked for
    on the idle connection a moment later, and keep it), ``"chatter-at-once"`` (the same, sent
    with the answer). ``requests``: the last user text of every request received."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[str] = []
        super().__init__()
        self.url += "/v1"

    def serve(self, conn: socket.socket, index: int) -> None:
        buf, n = bytearray(), 0
        while (request := read_request(conn, buf)) is not None:
            messages = json.loads(request[1])["messages"]
            text = messages[-1]["content"]
            text = text if isinstance(text, str) else "".join(p.get("text", "") for p in text)
            self.requests.append(text)
            what = self.answer(index, n, text)
            n += 1
            if what == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if what == "fin":
                return
            if what == "close-later":
                conn.sendall(_sse_answer(f"answer to {text}"))
                time.sleep(0.3)
                return
            if what in ("chatter-later", "chatter-at-once"):
                unasked = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nunasked"
                if what == "chatter-at-once":
                    conn.sendall(_sse_answer(f"answer to {text}") + unasked)
                    continue
                conn.sendall(_sse_answer(f"answer to {text}"))
                time.sleep(0.3)
                conn.sendall(unasked)
                continue
            conn.sendall(what)


@pytest.fixture
def two(tmp_path):
    """Upstreams a (a RawBackend whose ``answer`` the test sets) then b (always answers), every
    model, behind one gateway."""
    holder = {"answer": lambda c, n, text: _sse_answer(f"a: {text}")}
    a = RawBackend(lambda c, n, text: holder["answer"](c, n, text))
    b = RawBackend(lambda c, n, text: _sse_answer(f"b: {text}"))
    entries = [{"name": name, "base_url": backend.url, "models": ["*"], "upstream_idle_timeout_secs": 5}
               for name, backend in (("a", a), ("b", b))]
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                       "--set", "resp2chat_max_replay_entries=0")
    yield gw, a, b, holder
    gw.stop()
    a.close()
    b.close()


def _turn(gw, text: str) -> dict:
    r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": text, "stream": True}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    return parse_sse(r.content)[-1]


def _said(end: dict) -> str:
    return json.dumps(end["response"]["output"])


@pytest.mark.parametrize("cut", ["fin", "rst"])
def test_a_request_read_then_cut_on_a_pooled_connection_is_not_sent_again(two, cut):
    """The backend reads the second request on its kept-alive connection, then closes (or resets)
    it without answering. Before, the relay took that for a stale pooled connection and sent the
    request again on a fresh one: the backend ran the same turn twice. Now it gets it once, and the
    turn falls back to b as a failure before the first byte does."""
    gw, a, b, holder = two
    holder["answer"] = lambda c, n, text: cut if (c, n) == (0, 1) else _sse_answer(f"a: {text}")
    assert "a: first" in _said(_turn(gw, "first"))  # (a's connection 0, now pooled)
    end = _turn(gw, "second")
    assert a.requests.count("second") == 1, a.requests
    assert end["type"] == "response.completed" and "b: second" in _said(end), end
    assert b.requests == ["second"]


def test_a_pooled_connection_the_backend_closed_while_idle_is_not_used(two):
    """A kept-alive connection the backend closed while it sat in the pool is found closed before
    the request is written: the request goes once, on a fresh connection, to the same backend."""
    gw, a, b, holder = two
    holder["answer"] = lambda c, n, text: "close-later"
    assert "answer to first" in _said(_turn(gw, "first"))
    time.sleep(1)  # (the backend closed its side meanwhile)
    end = _turn(gw, "second")
    assert end["type"] == "response.completed" and "answer to second" in _said(end), end
    assert a.requests == ["first", "second"] and b.requests == [] and a.conns == 2


@pytest.mark.parametrize("when", ["chatter-later", "chatter-at-once"])
def test_a_pooled_connection_the_backend_spoke_on_while_idle_is_not_used(two, when):
    """A kept-alive connection on which the backend sent bytes nobody asked for after its
    answer, while it sat in the pool or right behind the answer (here a whole answer: read as
    the next request's, it would answer it with the wrong text), is not taken: the request goes
    once, on a fresh connection, to the same backend."""
    gw, a, b, holder = two
    holder["answer"] = lambda c, n, text: when
    assert "answer to first" in _said(_turn(gw, "first"))
    time.sleep(1)  # (the backend spoke meanwhile)
    end = _turn(gw, "second")
    assert end["type"] == "response.completed" and "answer to second" in _said(end), end
    assert a.requests == ["first", "second"] and b.requests == [] and a.conns == 2


EMPTY = {
    "done-only": b"data: [DONE]\n\n",
    "nothing": b"",
    "no-choices": b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": []}).encode()
                  + b"\n\ndata: [DONE]\n\n",
}


@pytest.mark.parametrize("kind", list(EMPTY))
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_empty_stream_falls_back_to_the_next_upstream(two, kind, framing):
    """A 200 stream, properly ended, with no choice in it: nothing reached the client, the next
    upstream answers. Before, the turn ended with a's empty answer."""
    gw, a, b, holder = two
    body = EMPTY[kind]
    if framing == "length":
        raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    else:
        raw = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
               + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n")
    holder["answer"] = lambda c, n, text: raw
    end = _turn(gw, f"empty {kind} {framing}")
    assert end["type"] == "response.completed" and f"b: empty {kind} {framing}" in _said(end), end
    assert a.requests == [f"empty {kind} {framing}"]
    # a later answer of a's, whole, is a's (the connection it answered empty on is fine)
    holder["answer"] = lambda c, n, text: _sse_answer(f"a: {text}")
    assert "a: later" in _said(_turn(gw, "later"))
