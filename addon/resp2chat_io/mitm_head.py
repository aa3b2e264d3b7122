"""Narrow patches of mitmproxy 12's HTTP/1 layer: a request head is bounded while it
arrives; a backend's response head too, and mitmproxy's 502 for one it could not read no longer
quotes it (``_bounded_response``); a request body's bytes are counted as they arrive, for the
minimum body rate of addons/head_deadline.py (``_counted``, ``BODIES``); the error mitmproxy
answers itself (a passthrough call whose backend failed before its answer's head: refused,
closed, reset, a head it could not read) is the gateway's JSON error, not mitmproxy's HTML page
(``_json_page``, ``_json_errors``, ``FAILED``); the HTTP layer says when a request leaves
its hooks for its backend (``_leaving``, ``LEAVING``: a passthrough's deadline starts there);
no request of the gateway's is streamed past its hooks, whatever an addon asks (``_whole``), and
the body of one the gate refused at its head is dropped as it comes, whatever an addon asks
(``_refusal_stands``); what a client sends while its request is answered is bounded
(``_held``, ``MAX_PIPELINED``); the answer to a ``HEAD`` has no body (``_json_errors``).

Why. mitmproxy gathers a client's request head in its HTTP/1 layer until the blank line that
ends it (``mitmproxy/proxy/layers/http/_http1.py``, ``Http1Server.read_headers``: "FIXME: protect
against header size DoS"), with no limit, before any addon hook sees the request: anyone who can
connect, without a key, made the gateway hold 200 MiB of one header line in 0.3 s (+196 MiB
RSS; ``header_timeout_secs`` bounds the time, not the bytes). No hook chooses that layer.

What. ``install()`` (once; calling it again changes nothing) wraps ``Http1Server.read_headers``:
once the head in progress holds more than ``gate.MAX_HEAD`` bytes without its end, what it held
is dropped, the client gets a ``431`` (the gateway's JSON error, a request id of its own, as
every refusal has) and the connection is closed. A whole head that is larger, read at once, is
refused by the gate with the same ``431`` (addons/gate.py): this bounds what is held before.

Checked against mitmproxy 12.3 (tests/test_hostile_audit.py drives real sockets through it):
``install`` refuses to patch a layer module that no longer has what it wraps.
"""

from __future__ import annotations

import inspect
import json
import time
import uuid
import weakref

from mitmproxy.connection import ConnectionState

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, ResponseData, ResponseProtocolError

from resp2chat_core.errors import error_json, sanitize
from resp2chat_core.gate import MAX_HEAD, head_too_large
from resp2chat_io import META
from resp2chat_io.addons.base import JSON_HEADERS, request_id_of


def _refusal() -> bytes:
    """The answer to a head that outgrew MAX_HEAD before its end (no flow: a request id of its own)."""
    err = head_too_large()
    return http1.assemble_response(http.Response.make(err.status, json.dumps(err.body()).encode(), {
        **JSON_HEADERS, "x-request-id": request_id_of(str(uuid.uuid4())), "connection": "close"}))


# What a client may send after its request, while that request is answered: a few pipelined heads.
# mitmproxy's HTTP/1 server keeps every byte it reads in its buffer meanwhile (``Http1Connection.
# _handle_event``: ``self.buf += data`` in its ``wait`` state too), without bound: a client sent
# 400 MiB of junk after its streamed turn, +400 MiB RSS in 0.7 s.
MAX_PIPELINED = 2 * MAX_HEAD


def _held(wait):
    """``Http1Server.wait`` (a request in, its answer on its way) that holds at most
    ``MAX_PIPELINED`` bytes of what the client sends meanwhile: past it, what it held is dropped,
    and so is all it sends after, the answer in flight is sent whole and the connection is closed
    after it (``_closing``). A client pipelining a few requests of ordinary size gets them all
    answered, one after another, as before."""
    def held_wait(self, event):
        if isinstance(event, events.DataReceived) and (
                getattr(self, "resp2chat_overflow", False) or len(self.buf) > MAX_PIPELINED):
            self.resp2chat_overflow = True
            self.buf.maybe_extract_at_most(len(self.buf))  # (dropped)
        yield from wait(self, event)

    held_wait.resp2chat = True
    return held_wait


def _closing(mark_done):
    """``Http1Server.mark_done``: a connection whose client sent more than ``MAX_PIPELINED``
    while its request was answered (``_held``) is closed once that answer is done, not kept for
    the next request (whose bytes were dropped)."""
    def closing_mark_done(self, *, request=False, response=False):
        yield from mark_done(self, request=request, response=response)
        if getattr(self, "resp2chat_overflow", False) and self.request is None \
                and getattr(self.state, "__func__", None) is type(self).read_headers:
            self.buf.maybe_extract_at_most(len(self.buf))  # (dropped)
            self.state = self.done
            yield commands.CloseConnection(self.conn)

    closing_mark_done.resp2chat = True
    return closing_mark_done


def _bounded(read_headers):
    def bounded_read_headers(self, event):
        yield from read_headers(self, event)
        if isinstance(event, events.DataReceived) and len(self.buf) > MAX_HEAD \
                and getattr(self.state, "__func__", None) is bounded_read_headers:  # (its end not in yet)
            self.buf.maybe_extract_at_most(len(self.buf))  # (dropped)
            self.state = self.done
            yield commands.SendData(self.conn, _refusal())
            yield commands.CloseConnection(self.conn)

    bounded_read_headers.resp2chat = True
    return bounded_read_headers


class Body:
    """A request body arriving on a client connection: its head's time (``time.monotonic``), the
    bytes of it arrived so far, and whether it is all in."""

    __slots__ = ("since", "received", "done", "__weakref__")

    def __init__(self, since: float, received: int) -> None:
        self.since, self.received, self.done = since, received, False


# Client connection id -> the body arriving on it now (or its last, done). Held by its HTTP/1
# layer: an entry goes with its connection.
BODIES: weakref.WeakValueDictionary[str, Body] = weakref.WeakValueDictionary()


def _counted(read_body):
    """``Http1Server.read_body`` that counts the bytes of the body as they arrive (``BODIES``),
    for ``head_deadline.BodyRate``: mitmproxy keeps no count of a request body while it streams in
    (its HTTP stream layer gathers it, and may be paused in a hook meanwhile); this layer sees
    every byte the moment it is read off the socket. The first call comes with the head's last
    read: what follows the head in the buffer is the body's first bytes."""
    def counted_read_body(self, event):
        body = getattr(self, "resp2chat_body", None)
        if body is None or body.done:
            body = self.resp2chat_body = Body(time.monotonic(), len(self.buf))
            BODIES[self.conn.id] = body
        elif isinstance(event, events.DataReceived):
            body.received += len(event.data)
        yield from read_body(self, event)
        if getattr(self.state, "__func__", None) is not counted_read_body:
            body.done = True

    counted_read_body.resp2chat = True
    return counted_read_body


# A backend's response head (a passthrough answer's: turns go through the relay, which bounds its
# own) larger than this without its end is cut: the relay reads mitmproxy's heads up to as much.
MAX_UPSTREAM_HEAD = 4 * MAX_HEAD


def quiet(message: str) -> str:
    """mitmproxy's words for an answer it could not read, without the backend's bytes (``Cannot
    parse HTTP response: Invalid header line: b'…'``, ``HTTP/1 protocol error: illegal chunk
    header: bytearray(b'…')`` quoted them): cut where they begin."""
    if message.startswith("Cannot parse HTTP response"):
        return "Cannot parse the upstream's HTTP response head"
    cut = min((i for i in (message.find(q) for q in ("bytearray(", "b'", 'b"')) if i >= 0), default=-1)
    return message if cut < 0 else message[:cut].rstrip(": ") + " (the upstream's bytes not shown)"


def _quiet_body(read_body):
    """``Http1Client.read_body`` whose errors do not quote the backend's bytes (``quiet``)."""
    def quiet_read_body(self, event):
        for command in read_body(self, event):
            if isinstance(command, ReceiveHttp) and isinstance(command.event, ResponseProtocolError):
                command.event.message = quiet(command.event.message)
            yield command

    quiet_read_body.resp2chat = True
    return quiet_read_body


def _bounded_response(read_headers):
    """``Http1Client.read_headers`` (a backend's response head) without its two faults: a head of
    any size was gathered (200 MiB held +1000 MiB: its bytes, then their repr), and the 502 for a
    head that broke off (or did not parse) quoted the backend's bytes — to the client's error
    page, the log and the flow — so a backend repeating the ``Authorization`` it got handed out
    the upstream key. Now: past ``MAX_UPSTREAM_HEAD`` without its end the head is dropped and the
    connection closed; a head cut by its connection is said to be so (``server closed
    connection``), and one that does not parse by ``quiet``, neither with its bytes."""
    def bounded_response_headers(self, event):
        if isinstance(event, events.ConnectionClosed) and self.buf:
            self.buf.maybe_extract_at_most(len(self.buf))  # (a head never ended: dropped, not quoted)
        for command in read_headers(self, event):
            if isinstance(command, ReceiveHttp) and isinstance(command.event, ResponseProtocolError):
                command.event.message = quiet(command.event.message)
            yield command
        if isinstance(event, events.DataReceived) and len(self.buf) > MAX_UPSTREAM_HEAD \
                and self.stream_id is not None \
                and getattr(self.state, "__func__", None) is bounded_response_headers:  # (its end not in yet)
            self.buf.maybe_extract_at_most(len(self.buf))  # (dropped)
            self.state = self.done
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(ResponseProtocolError(
                self.stream_id, f"the upstream's response head is larger than {MAX_UPSTREAM_HEAD >> 10} KiB",
                ErrorCode.GENERIC_SERVER_ERROR))

    bounded_response_headers.resp2chat = True
    return bounded_response_headers


def answer(status: int, body: bytes, rid: str) -> bytes:
    """A whole HTTP/1 error answer that ends its connection: the gateway's JSON ``body``."""
    return http1.assemble_response(http.Response.make(status, body, {
        **JSON_HEADERS, "x-request-id": rid, "connection": "close"}))


def _json_page(status: int, message: str = "") -> bytes:
    """mitmproxy's error answer (``_http1.make_error_response``: an HTML page, ``text/html``)
    as the gateway's JSON error, its words ``quiet``: a 502 is the upstream's failure before its
    answer's head (``upstream_unavailable``, as a turn's), a 4xx the client's. Without a flow (a
    request head mitmproxy could not read) or the gateway's own answer for it (``FAILED``): a
    request id of its own."""
    if status == 502:
        body = error_json(f"the upstream failed before its answer: {sanitize(quiet(message)) or 'no answer'}",
                          status_type="upstream_error", code="upstream_unavailable")
    else:  # (a request head it could not read: the client's own bytes, bounded)
        body = error_json(sanitize(message, 300) or "the request failed",
                          status_type="invalid_request_error" if status < 500 else "server_error")
    return answer(status, body, request_id_of(str(uuid.uuid4())))


# The gateway's answer to a request mitmproxy failed before its answer's head, by client
# connection (an HTTP/1 connection carries one request at a time): (that request, the answer's
# bytes), set in the ``error`` hook (addons/upstreams.py: a passthrough call, with its request
# id and what the gateway knows of why: a timeout, a revoked key), sent by ``_json_errors``.
FAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_NOTHING = ()


def _head(request) -> bool:
    return request is not None and request.data.method.upper() == b"HEAD"


def _head_only(raw: bytes) -> bytes:
    """A whole HTTP/1 answer's head alone (its ``content-length`` that of the body it would have)."""
    head, end, _ = raw.partition(b"\r\n\r\n")
    return head + end


def _json_errors(send):
    """``Http1Server.send`` that answers a request failed before its answer's head with what the
    gateway made of it in the ``error`` hook (``FAILED``), even where mitmproxy would only close
    the connection (a flow killed in its hooks); otherwise as mitmproxy does (``_json_page``).
    The answer to a ``HEAD`` is its head alone: mitmproxy wrote the body of any answer an addon
    made (the gateway's ``405`` for an API endpoint, ``/healthz``, a ``404``) after its head, so
    a keep-alive client read that body as its next answer (HTTP/1.1: a ``HEAD``'s answer has no
    body; its ``content-length`` stays that of the body a ``GET`` would have). Every answer on an
    HTTP/1 client connection passes here; a backend's answer to a ``HEAD`` has no body anyway."""
    def json_error_send(self, event):
        # (every other event, each chunk of every answer, is mitmproxy's own generator as it is:
        # no frame of ours between it and the connection)
        if event.__class__ is ResponseData and _head(self.request):
            return _NOTHING
        if not isinstance(event, ResponseProtocolError):
            return send(self, event)
        return failed_send(self, event)

    def failed_send(self, event):
        own = FAILED.pop(self.conn, None)
        if own is not None and own[0] is self.request and self.response is None:
            if self.conn.state & ConnectionState.CAN_WRITE:
                yield commands.SendData(self.conn, _head_only(own[1]) if _head(self.request) else own[1])
                yield commands.CloseConnection(self.conn)
            return
        for command in send(self, event):
            if isinstance(command, commands.SendData) and _head(self.request):
                command.data = _head_only(command.data)
            yield command

    json_error_send.resp2chat = True
    return json_error_send


# A flow -> what is called (with it) once its request left every hook for its backend: mitmproxy
# takes a connection for it next, opened or kept (``_leaving``; a request body is never streamed
# ahead of its hooks, ``_whole``, so that connection is taken after them). addons/upstreams.py: a
# passthrough call's deadline for its answer's head starts there, not in the gateway's own request
# hook, which the hooks after it and an operator's interception follow. Once; an entry goes with
# its flow.
LEAVING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _leaving(make_server_connection):
    """``HttpStream.make_server_connection``, called once a request is through its hooks (the
    ``request`` hook, every addon's, and an interception's resume) and not answered by one of
    them: what ``LEAVING`` holds for its flow is called first."""
    def leaving_make_server_connection(self):
        then = LEAVING.pop(self.flow, None)
        if then is not None:
            then(self.flow)
        return (yield from make_server_connection(self))

    leaving_make_server_connection.resp2chat = True
    return leaving_make_server_connection


# a request the gate refused at its head (addons/gate.py ``answer``): its body's ``Unread``, which
# stands after the ``requestheaders`` hook whatever a later addon made of ``request.stream`` (``_refusal_stands``)
REFUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refusal_stands(state_wait_for_request_headers):
    """``HttpStream.state_wait_for_request_headers``, whose ``requestheaders`` hook is followed,
    for a request the gate refused at its head, by its ``Unread`` put back on ``request.stream``
    (``REFUSED``) before mitmproxy decides how to read the body. An addon after the gate's (an
    operator's script) may set ``request.stream`` in the same hook, mitmproxy's usual way to ask a
    body streamed: ``True`` had ``_whole`` read the refused body whole, and ``False`` had mitmproxy
    do it itself, with no bound (the gate refused it before counting it against
    ``max_request_bodies_mb``: a body of any declared size, kept in memory while it came); now a
    refused body is dropped as it arrives whatever an addon asks, its refusal sent at once. (A
    response an addon set there instead is mitmproxy's to send once the body is in: not the gate's.)"""
    def refusal_stands(self, event):
        commands_ = state_wait_for_request_headers(self, event)
        try:
            command = next(commands_)
            while True:
                answer = yield command
                if command.__class__ is http_layer.HttpRequestHeadersHook:
                    unread = REFUSED.pop(self.flow, None)
                    if unread is not None and self.flow.response is None:
                        self.flow.request.stream = unread
                command = commands_.send(answer)
        except StopIteration as end:
            return end.value

    refusal_stands.resp2chat = True
    return refusal_stands


class _Sink:
    """A streamed answer's body buffer that keeps nothing (``_unkept``): mitmproxy adds each piece
    it sends to ``response_body_buf`` (``store_streamed_bodies``, which listen.py turns on, so flow
    files keep a turn's translated stream) and makes it the flow's body at the end."""

    __slots__ = ()

    def __iadd__(self, data):
        return self

    def __bytes__(self) -> bytes:
        return b""

    def __len__(self) -> int:
        return 0

    def clear(self) -> None:
        pass


def _unkept(start_response_stream):
    """``HttpStream.start_response_stream``: a background run's events streamed again to a client
    (a resume: addons/background.py ``Background.resume``, its flow's ``background_resume``) are
    not kept in its flow as well. The run's ``Log`` keeps them once, for every client; the flow's
    copy grew with what the client's socket took, so each slow reader held about the whole log
    (40 resumes of a 3 MB log: ~120 MiB, with ``PIECE`` already bounding what waits to be written).
    The flow of a resume shows its head, not its events."""
    def unkept_start_response_stream(self):
        yield from start_response_stream(self)
        if (self.flow.metadata.get(META) or {}).get("background_resume"):
            self.response_body_buf = _Sink()

    unkept_start_response_stream.resp2chat = True
    return unkept_start_response_stream


def _whole(start_request_stream):
    """``HttpStream.start_request_stream``: mitmproxy streams a request body an addon asked it to
    (``request.stream`` set in a ``requestheaders`` hook; listen.py turns ``stream_large_bodies``
    off) to its destination as it arrives, its head sent at once, before any ``request`` hook:
    a turn went to the chat backend as the client wrote it (not lowered), a passthrough without
    its upstream key (with the client's credentials, a client limited to some models unchecked, a
    revoked key's body let through). No request of the gateway's streams: its body is read whole
    (``request.stream`` turned off, mitmproxy's own way for a body it does not stream), so every
    ``request`` hook runs first, as for any other request. Only the gate's refusal at the head
    (addons/gate.py ``Unread``, a body dropped on its way to the relay) streams."""
    def whole_start_request_stream(self):
        from resp2chat_io.addons.gate import Unread  # (here: gate.py imports this module)

        if not isinstance(self.flow.request.stream, Unread):
            self.flow.request.stream = False
            self.client_state = self.state_consume_request_body
            return
        yield from start_request_stream(self)

    whole_start_request_stream.resp2chat = True
    return whole_start_request_stream


def install() -> None:
    """Bound every HTTP/1 request head mitmproxy reads from now on, and every response head;
    mitmproxy's own error answers are JSON; a request leaving its hooks is told (once)."""
    if getattr(_http1, "make_error_response", None) is None:
        raise RuntimeError("mitmproxy's HTTP/1 layer changed: resp2chat_io/mitm_head.py needs a look")
    _http1.make_error_response = _json_page
    for layer, state, wrap in ((getattr(_http1, "Http1Server", None), "read_headers", _bounded),
                               (getattr(_http1, "Http1Server", None), "read_body", _counted),
                               (getattr(_http1, "Http1Client", None), "read_headers", _bounded_response),
                               (getattr(_http1, "Http1Client", None), "read_body", _quiet_body),
                               (getattr(_http1, "Http1Server", None), "send", _json_errors),
                               (getattr(_http1, "Http1Server", None), "wait", _held),
                               (getattr(_http1, "Http1Server", None), "mark_done", _closing)):
        current = getattr(layer, state, None)
        if getattr(current, "resp2chat", False):
            continue
        if current is None or not hasattr(layer, "done"):
            raise RuntimeError("mitmproxy's HTTP/1 layer changed: resp2chat_io/mitm_head.py needs a look")
        setattr(layer, state, wrap(current))
    stream = getattr(http_layer, "HttpStream", None)
    if getattr(http_layer, "HttpRequestHeadersHook", None) is None:
        raise RuntimeError("mitmproxy's HTTP layer changed: resp2chat_io/mitm_head.py needs a look")
    for state, wrap, generator in (("make_server_connection", _leaving, True),
                                   ("start_request_stream", _whole, True),
                                   ("start_response_stream", _unkept, True),
                                   ("state_wait_for_request_headers", _refusal_stands, False)):
        current = getattr(stream, state, None)
        if getattr(current, "resp2chat", False):
            continue
        if current is None or (generator and not inspect.isgeneratorfunction(current)):
            raise RuntimeError("mitmproxy's HTTP layer changed: resp2chat_io/mitm_head.py needs a look")
        setattr(stream, state, wrap(current))
