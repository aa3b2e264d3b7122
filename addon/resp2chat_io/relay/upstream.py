"""The relay's HTTP/1.1 client for chat backends: pooled connections, TLS, one deadline rule.

``UpstreamClient.call`` sends one chat request and hands what comes back to a turn's
``Channel`` (resp2chat_core/channel.py): the body of a 200 stream as data, everything else as
typed events (``UpstreamFailed``, ``UpstreamJSON``, ``Keepalive``). A call may have a ``Reader``
between the backend and the channel (the tool loop's round, resp2chat_core/toolloop.py
``ToolLoop``; the compaction summary's, compaction.py ``SummaryReader``): a 200 stream's bytes go
through its ``feed``, a 200 JSON body (a backend that ignored ``stream``) through its ``whole``
(the loop's: its stream form goes on as data; the summary's: nothing goes on), read whole first
up to ``max_answer`` (an answer's bound: ``MAX_ANSWER``; an error body only up to
``MAX_ERROR_BODY``). It returns a ``CallEnd``.

The one deadline rule (``_Watch``): from the moment the request is sent, a backend that sends
nothing for ``idle_timeout`` seconds fails the turn (``UpstreamFailed`` 504, code ``upstream_timeout``), before its answer
or in the middle of it; one that sends SSE comments (``: keep-alive``) but no data for
``data_timeout`` seconds fails it too: comments keep the connection, they are not an answer
(resp2chat_core/sse.py ``Progress``); silence, without comments, is the idle rule's alone. While no data has come yet (a long prefill, a
request queued at OpenRouter), every ``keepalive`` seconds without data send the client a
``Keepalive``. Connecting has its own ``connect_timeout``.

The hot path: a backend's chunked stream is decoded by resp2chat_core/chunked.py inside the
backend socket's own callback (``_BodyPump`` stands in for the StreamReader's protocol), one
``Channel.data`` per socket read, no task switch or timer per read. While the turn's channel
holds news (``coalesce_ms``) a plain TCP stream's reads can be deferred (``_BodyPump.defer``:
the socket's ``SO_RCVLOWAT`` mark raised, so the kernel keeps the tokens instead of waking the
loop for each; ``drain`` reads them when the held delivery is due; ``listen`` lowers the mark
again, and a connection goes back to the pool only so): relay/exchange.py ``_Window`` decides.
h11 (mitmproxy's own dependency) reads everything else: the response head, error and JSON
bodies, unchunked streams."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import h11

from resp2chat_core.routing import Candidate
from resp2chat_core.channel import Channel, Keepalive, UpstreamFailed, UpstreamJSON
from resp2chat_core.chunked import ChunkedDecoder, ChunkedError
from resp2chat_core.limits import backend_retry_after
from resp2chat_core.sse import MAX_EVENT, Opening, Progress
from resp2chat_core.translator import OUTPUT_EVENTS, OUTPUT_TOO_LARGE, output_bound

from .. import offload
from .constants import READ

MAX_ERROR_BODY = 1 << 20  # an error body is kept up to this much; the rest is not read
# A 200 JSON body of a chat call (a whole answer: ``stream`` ignored) is read whole up to
# ``UpstreamClient.max_answer``: the bound of an answer's output however it comes,
# translator.py ``output_bound`` (OUTPUT_EVENTS × max_upstream_event_mb, 32 MiB by default: the
# translator holds a streamed answer's output up to as much). Past it the call fails
# (``upstream_output_too_large``) and the rest is not read: never a body cut and read as if whole.
# ``get``'s 200 body (a model list, a tokenizer's token ids, a web search's results) has a bound
# of its own, ``UpstreamClient.max_get``: max_upstream_event_mb (4 MiB by default: a list of
# thousands of models, the ids of a prompt of ~500k tokens), past it ``TooLarge``.
MAX_ANSWER = output_bound(MAX_EVENT)
FULL = 1 << 20  # backend bytes waiting in a channel before the relay stops reading the backend
DEFERRED = 16 << 10  # a deferred stream (_BodyPump.defer) wakes the loop only past this many bytes queued
READ_AT_ONCE = 256 << 10  # what a drain reads at most (asyncio's own read size)
_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host",
                  b"proxy-connection", b"te", b"upgrade", b"trailer"})


class Reader(Protocol):
    """What a call's answer goes through before its channel (``UpstreamClient.call``)."""

    def feed(self, data: bytes) -> bytes | None:
        """A piece of a 200 stream -> what the channel gets of it; None: read no more of it (the
        reader refused the stream: its caller reports why)."""

    def whole(self, body: bytes) -> bytes | None:
        """A 200 JSON body (``stream`` ignored) -> what the channel gets of it, as data; None: it
        is no answer the reader reads (an error, garbage): it goes on whole (``UpstreamJSON``)."""


class CallEnd(enum.Enum):
    """How one call ended, and what becomes of its connection."""

    REUSABLE = "reusable"  # answered in full; the connection goes back to the pool
    ENDED = "ended"  # answered in full; the backend does not keep the connection
    BROKEN = "broken"  # failed or cut (reported to the channel); the connection is closed

    @property
    def answered(self) -> bool:
        return self in (CallEnd.REUSABLE, CallEnd.ENDED)


@dataclass(frozen=True)
class BackendUrl:
    """A backend URL, split once."""

    url: str

    @property
    def parts(self):
        return urlsplit(self.url)

    @property
    def key(self) -> tuple[str, str, int]:
        p = self.parts
        return p.scheme, p.hostname or "", p.port or (443 if p.scheme == "https" else 80)

    @property
    def origin(self) -> str:
        p = self.parts
        return f"{p.scheme}://{p.netloc}"


def failure(status: int, message: str, kind: str, code: str | None = None) -> UpstreamFailed:
    """A failure the relay itself observed, worded like a backend's error body (``code``: the
    Responses error code the client gets, when not the one the status stands for: errors.py)."""
    error = {"message": message, "type": kind} | ({"code": code} if code else {})
    return UpstreamFailed(status, json.dumps({"error": error}).encode(), own=True)


class _Watch:
    """The one deadline rule (module docstring), shared by every wait of a call."""

    __slots__ = ("idle", "data", "keepalive", "channel", "last", "last_data", "last_keepalive", "streaming",
                 "paused", "progress", "commenting", "cut")

    def __init__(self, idle: float, keepalive: float, channel: Channel, data: float = float("inf")) -> None:
        self.idle, self.data, self.keepalive, self.channel = idle, data, keepalive, channel
        self.last = self.last_data = self.last_keepalive = time.monotonic()
        self.streaming = False  # data has come: no more keepalives
        self.paused = False  # we stopped reading (a slow client): silence is ours, not the backend's
        self.progress = Progress()
        self.commenting = False  # comments came since the last data: the data rule applies (silence is idle's)
        self.cut = False  # the comments dropped before the first data ended inside a comment line

    def heard(self, piece: bytes) -> bytes:
        """A piece of a 200 stream's body came (its bytes already count for ``last``): what of it
        the turn's stream gets. Nothing while only comments have come: they answer nothing, so
        the call has not begun its answer and may still give way to the next upstream (the data
        rule's failure falls back as a silence before the first byte does). From the first data
        on, every byte (a comment the dropped pieces left cut off is made whole by a ``:``)."""
        if self.progress.feed(piece):
            if not self.streaming:
                self.streaming = True
                if self.cut:
                    piece = b":" + piece
            self.commenting = False
            self.last_data = self.last
            return piece
        self.commenting = True
        if self.streaming:
            return piece
        self.cut = self.progress.in_comment
        return b""

    def ours(self) -> None:
        """We did not read for a while (a slow client): that silence is not the backend's."""
        self.last = self.last_data = time.monotonic()

    def _next(self) -> float | None:
        """Seconds until the rule must act again; 0 when it must act now (None: never)."""
        now = time.monotonic()
        if self.paused:
            self.last = self.last_data = now
        wait = self.idle - (now - self.last)
        if self.commenting:
            wait = min(wait, self.data - (now - self.last_data))
        if not self.streaming:
            wait = min(wait, self.keepalive - (now - max(self.last_data, self.last_keepalive)))
        return None if wait == float("inf") else max(wait, 0.0)

    def _act(self) -> bool:
        """A wait ran out: send a keepalive (True), or report the stall (False)."""
        now = time.monotonic()
        if now - self.last >= self.idle:
            self.channel.event(failure(504, f"the upstream sent nothing for {self.idle:g} s", "upstream_timeout",
                                       "upstream_timeout"))
            return False
        if self.commenting and now - self.last_data >= self.data:
            self.channel.event(failure(504, f"the upstream sent no data for {self.data:g} s (only SSE comments, "
                                            "keep-alives: upstream_data_timeout_secs)", "upstream_timeout",
                                       "upstream_timeout"))
            return False
        if not self.streaming and now - max(self.last_data, self.last_keepalive) >= self.keepalive:
            self.channel.event(Keepalive())
            self.last_keepalive = now
        return True

    async def read(self, reader: asyncio.StreamReader) -> bytes | None:
        """The backend's next bytes (b"" at EOF); None once it was silent too long. Awaited
        directly: what arrives before this coroutine resumes is returned with it, so nothing
        is left behind in the StreamReader when the caller takes the socket over."""
        while True:
            wait = self._next()
            if wait is None or wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        data = await reader.read(1 << 22)
                except TimeoutError:
                    pass
                else:
                    self.last = time.monotonic()
                    return data
            if not self._act():
                return None

    async def until(self, fut: asyncio.Future) -> bool:
        """Wait for ``fut`` (resolved by a protocol callback); False if the backend was silent
        too long first (the channel then has its ``UpstreamFailed``)."""
        while not fut.done():
            wait = self._next()
            if wait is None or wait > 0:
                # (at most the data rule's time: comments that begin meanwhile bring its deadline,
                # which this wait, armed before them, would not see; so it fires at most that late)
                limit = min(float("inf") if wait is None else wait, self.data)
                await asyncio.wait({fut}, timeout=None if limit == float("inf") else limit)
            elif not self._act():
                return False
        return True


class _Idle(asyncio.Protocol):
    """Stands in for a pooled connection's protocol while it waits in the pool (``_pooled``): what
    the backend does meanwhile, unasked (bytes, its end, a reset), is noted (``heard``) and
    kept from the connection's stream reader, which stays as it was when pooled: empty (the
    answer was read whole, nothing after it). The connection's end still reaches the stream
    objects (``connection_lost``)."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol, self.heard = protocol, False

    def data_received(self, data: bytes) -> None:
        self.heard = True

    def eof_received(self) -> bool:
        self.heard = True
        return False  # (the transport closes)

    def connection_lost(self, exc) -> None:
        self.heard = True
        self.protocol.connection_lost(exc)


def _pooled(w: asyncio.StreamWriter) -> None:
    """A connection goes into the pool: ``_Idle`` hears it until it is taken (``_still_open``)."""
    w.transport.set_protocol(_Idle(w.transport.get_protocol()))


def _still_open(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """An idle pooled connection taken from the pool (its own protocol back, ``_Idle``'s
    undone): whether it may carry a request: open on both sides, nothing unread (a backend that
    closed it, or said anything unasked, is done with it: ``_Idle.heard``; its stream reader is
    as it was when pooled). The socket itself is asked too (a peek, without reading): bytes or a
    close the event loop has not read yet are seen so before the request is written, the last
    moment it can be (after, the backend may have it: the call is never sent again, relay
    ``call``)."""
    idle = w.transport.get_protocol()
    if isinstance(idle, _Idle):
        w.transport.set_protocol(idle.protocol)
        if idle.heard:
            return False
    if w.is_closing() or r.at_eof() or r.exception() is not None:
        return False
    transport_sock = w.get_extra_info("socket")
    if transport_sock is None:
        return True
    try:  # (asyncio's TransportSocket has no recv: a duplicate of its descriptor peeks)
        with socket.fromfd(transport_sock.fileno(), transport_sock.family, transport_sock.type) as sock:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return False  # (the end of the stream, b"", or bytes nobody asked for)
    except (BlockingIOError, InterruptedError):
        return True  # (nothing to read: open and silent)
    except OSError:
        return False  # (reset)


class TooLarge(Exception):
    """A 200 body past ``UpstreamClient.max_get`` (``get``): not read whole, not returned."""


class UpstreamClient:
    def __init__(self) -> None:
        self.connect_timeout: float | None = 10.0
        self.idle_timeout = 60.0  # float("inf"): no limit
        self.keepalive = 15.0
        self.verify_tls = True
        self.max_answer = MAX_ANSWER  # bytes of a 200 JSON body read at most (OUTPUT_EVENTS × max_upstream_event_mb)
        self.max_get = MAX_EVENT  # bytes of ``get``'s 200 body read at most (max_upstream_event_mb)
        self._pool: dict[tuple, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    def close(self) -> None:
        for conns in self._pool.values():
            for _, w in conns:
                w.close()
        self._pool.clear()

    @property
    def pooled(self) -> int:
        return sum(len(c) for c in self._pool.values())

    async def call(self, to: Candidate, headers: list[tuple[bytes, bytes]], body: bytes, channel: Channel,
                   reader: Reader | None = None, fall_back: bool = False) -> CallEnd:
        """POST ``body`` to the candidate ``to`` (its URL; its own headers and Authorization
        after ``headers``; its timeouts); the answer goes to ``channel`` (with a ``reader``: a
        200 stream's bytes through ``reader.feed`` first; a 200 JSON body through
        ``reader.whole``, its bytes then going on as data, or as an ``UpstreamJSON`` where it
        returns None or there is no reader). Never raises for backend trouble: it is reported.

        The call stops reading the backend (and closes its connection) when the consumer is done
        with the turn (``channel.closed``) and more of the body comes, or when ``reader.feed``
        returns None (it refused the stream: the caller reports why).

        ``fall_back``: another upstream may answer the turn if this one does not: a 200 stream
        that ends without answering anything (sse.py ``Opening``: no choice in it) is then a
        failure before the first byte (nothing of it reached the channel), not an empty answer."""
        target = BackendUrl(to.url)
        headers = to.sent(headers)
        try:
            # (a pooled connection is taken only when found open just now, _still_open: the last point
            # at which the backend provably has not got the request; once written, it is never sent again)
            up_reader, up_writer, _ = await self._connect(target.key, timeout=to.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"timed out after {to.connect_timeout:g} s" if isinstance(exc, asyncio.TimeoutError) \
                else (exc.strerror or str(exc))
            channel.event(failure(502, f"cannot connect to the upstream {target.origin}: {reason}",
                                  "upstream_unavailable"))
            return CallEnd.BROKEN
        # (heard: [any byte came from the backend, its answer's head came]: before the head, nothing
        # of the answer reached the channel, so a failure then is reported, and may fall back; a chat
        # request is not idempotent, so one cut after it was written, pooled connection or not, is
        # such a failure, not sent again: the backend may be running it)
        outcome, heard = CallEnd.BROKEN, [False, False]
        try:
            outcome = await self._roundtrip(target, headers, body, up_reader, up_writer, channel, reader, heard,
                                            _Watch(to.idle_timeout, to.keepalive, channel, to.data_timeout),
                                            fall_back, to.forwarded)
        except (OSError, h11.ProtocolError) as exc:
            if heard[0] and not heard[1]:  # (bytes that are no HTTP answer: another service, a proxy's)
                channel.event(failure(502, f"the upstream {target.origin} answered with no HTTP response ({exc})",
                                      "upstream_unavailable"))
            elif not heard[0]:
                why = "closed the connection before answering" if isinstance(exc, h11.ProtocolError) else \
                    f"connection failed: {exc}"
                channel.event(failure(502, f"the upstream {why}", "upstream_unavailable"))
        finally:
            if outcome is CallEnd.REUSABLE:
                _pooled(up_writer)
                self._pool.setdefault(target.key, []).append((up_reader, up_writer))
            else:
                up_writer.close()
        return outcome

    async def get(self, url: str, headers: list[tuple[bytes, bytes]], body: bytes | None = None, *,
                  connect_timeout: float | None | bool = False, idle_timeout: float | None = None) -> tuple[int, bytes]:
        """A plain GET (with ``body``: a POST of it) on a fresh connection (web search, a
        backend's model list or tokenizer), whole body (a 200's up to ``max_get``, else
        ``TooLarge``, declared so or grown so: a model list of thousands of models, the token ids
        of a long prompt pass 1 MiB; an error's up to ``MAX_ERROR_BODY``), bounded by idle_timeout
        (``connect_timeout``, ``idle_timeout``: an upstream's own, else the client's)."""
        target = BackendUrl(url)
        reader, writer, _ = await self._connect(target.key, pooled=False, timeout=connect_timeout)
        try:
            conn = h11.Connection(h11.CLIENT)
            parts = target.parts
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            sent = [(b"content-length", str(len(body)).encode())] if body is not None else []
            writer.write(conn.send(h11.Request(method="GET" if body is None else "POST", target=path, headers=[
                (b"host", parts.netloc.encode()), (b"connection", b"close"), *headers, *sent])))
            if body:
                writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            status, data = 0, bytearray()
            idle = self.idle_timeout if idle_timeout is None else idle_timeout
            timeout = None if idle == float("inf") else idle
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await asyncio.wait_for(reader.read(READ), timeout))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    declared = dict(event.headers).get(b"content-length", b"")
                    if status == 200 and declared.isdigit() and int(declared) > self.max_get:
                        raise TooLarge(self._too_large())
                elif isinstance(event, h11.Data):
                    if status == 200 and len(data) + len(event.data) > self.max_get:
                        raise TooLarge(self._too_large())
                    data += event.data[:MAX_ERROR_BODY - len(data)] if status != 200 else event.data
                    if status != 200 and len(data) >= MAX_ERROR_BODY:  # the rest is not read (closed)
                        return status, bytes(data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, bytes(data)
        finally:
            writer.close()

    def _too_large(self) -> str:
        return f"the answer is larger than {self.max_get / (1 << 20):g} MiB (max_upstream_event_mb)"

    # --- connections ---------------------------------------------------------------------------

    async def _connect(self, key: tuple, pooled: bool = True, timeout: float | None | bool = False):
        """A connection to ``key`` (pooled when there is one); ``timeout``: to connect (default:
        the client's ``connect_timeout``)."""
        idle = self._pool.get(key) if pooled else None
        while idle:
            r, w = idle.pop()
            if _still_open(r, w):
                return r, w, True
            w.close()
        scheme, host, port = key
        tls = None
        if scheme == "https":
            tls = ssl.create_default_context()
            if not self.verify_tls:
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls),
                                      self.connect_timeout if timeout is False else timeout)
        return r, w, False

    # --- one request and its answer ------------------------------------------------------------

    async def _roundtrip(self, target: BackendUrl, headers, body: bytes, up_reader: asyncio.StreamReader,
                        up_writer: asyncio.StreamWriter, channel: Channel, reader: Reader | None,
                        heard: list[bool], watch: _Watch, fall_back: bool = False,
                        forwarded: bool = False) -> CallEnd:
        client = h11.Connection(h11.CLIENT)
        parts = target.parts
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = [(n, v) for n, v in headers if n not in _HOP]
        sent += [(b"host", parts.netloc.encode()), (b"content-length", str(len(body)).encode())]
        up_writer.write(client.send(h11.Request(method="POST", target=path, headers=sent)))
        up_writer.write(client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
        if channel.sent is None:  # (the turn's first request to a backend: the gateway's latency ends)
            channel.sent = time.monotonic()
        offload.sent()  # (a garbage collection due is made next, while the backend reads the request)

        async def next_event():
            """h11's next event, reading from the backend as needed; None once it went silent."""
            while (event := client.next_event()) is h11.NEED_DATA:
                data = await watch.read(up_reader)
                if data is None:
                    return None
                heard[0] = heard[0] or bool(data)
                client.receive_data(data)
            return event

        # The head, through h11.
        while not isinstance(event := await next_event(), h11.Response):
            if event is None:
                return CallEnd.BROKEN
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("closed before answering")
        heard[1] = True
        hdrs = dict(event.headers)
        status, ctype, retry_after = event.status_code, hdrs.get(b"content-type", b""), hdrs.get(b"retry-after")
        stream = status == 200 and b"json" not in ctype
        opening = Opening() if stream and fall_back else None  # (held until it answers anything)

        def put(data: bytes) -> bool:
            """A 200 stream's bytes to the channel; False: read no more of it (the turn is over,
            or the reader refused the stream)."""
            if channel.closed:
                return False
            if not (data := watch.heard(data)):
                return True  # (comments before the first data: no answer yet)
            if opening is not None and not opening.begun and not (data := opening.feed(data)):
                return True  # (nothing but [DONE] or chunks without a choice yet: no answer)
            if reader is not None and (data := reader.feed(data)) is None:
                return False
            channel.data(data)
            return True

        def ended(outcome: CallEnd) -> CallEnd:
            """The stream ended whole: one that answered nothing fails (the next upstream answers);
            what was held of one that did goes on."""
            if opening is None or opening.begun or not outcome.answered or channel.closed:
                return outcome
            if opening.empty():
                channel.event(failure(502, "the upstream answered with an empty stream (no choices)",
                                      "upstream_unavailable"))
                return outcome
            held = opening.release()
            if reader is not None and (held := reader.feed(held)) is None:
                return CallEnd.BROKEN
            channel.data(held)
            return outcome

        if not stream:
            watch.data = float("inf")  # (an error or JSON body: no SSE, no comments; its bytes are its progress)
        if stream and b"chunked" in hdrs.get(b"transfer-encoding", b"").lower():
            # Pooled afterwards only if the backend keeps the connection (cpp-httplib, llama.cpp's
            # server, says "close" when a connection has served its share).
            keep = event.http_version == b"1.1" and b"close" not in hdrs.get(b"connection", b"").lower()
            return ended(await self._pump(up_reader, up_writer, client.trailing_data[0], put, channel, watch, keep,
                                          opening))

        # an error body, kept to be reported (up to MAX_ERROR_BODY), or a 200 JSON body, read whole
        # (up to max_answer: past it, one declared so or one that grows so, the call fails)
        held = bytearray()
        declared = hdrs.get(b"content-length", b"")
        if not stream and status == 200 and declared.isdigit() and int(declared) > self.max_answer:
            return _too_large(channel, self.max_answer)
        while True:
            event = await next_event()
            if event is None:
                return CallEnd.BROKEN
            if isinstance(event, h11.Data):
                if stream:
                    if not put(bytes(event.data)):  # (h11 may hand out a bytearray; the channel carries bytes)
                        return CallEnd.BROKEN
                    if channel.size > FULL:
                        await _taken(channel, watch)  # a slow client: push back on the backend
                elif status == 200:
                    if len(held) + len(event.data) > self.max_answer:
                        return _too_large(channel, self.max_answer)  # (the rest is not read)
                    held += event.data
                else:
                    held += event.data[:MAX_ERROR_BODY - len(held)]
                    if len(held) >= MAX_ERROR_BODY:
                        break  # the rest is not read: nothing more of it would be kept
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        # (a 200 body all of which came: not cut)
        whole_body = status == 200 and isinstance(event, h11.EndOfMessage)
        got = bytes(held)
        del held  # (one copy of a body of up to max_answer held, not two)
        if status != 200:
            wait = backend_retry_after(retry_after.decode("latin-1") if retry_after else None, time.time())
            channel.event(UpstreamFailed(status, got, wait, forwarded=forwarded))
        elif not stream:
            data = reader.whole(got) if reader is not None else None
            if data is None:
                channel.event(UpstreamJSON(got))
            else:
                channel.data(data)
        # (pooled only with nothing after the answer: bytes the backend sent unasked right behind
        # it, in h11's buffer, would be lost with it, the connection taken all the same)
        done = client.our_state is h11.DONE and client.their_state is h11.DONE and not client.trailing_data[0]
        # (a whole body answered, whether or not the backend keeps the connection: ``connection:
        # close``, HTTP/1.0, leave h11 in MUST_CLOSE; a JSON summary or loop round read so is whole)
        return ended(CallEnd.REUSABLE if done else (CallEnd.ENDED if stream or whole_body else CallEnd.BROKEN))

    async def _pump(self, up_reader, up_writer, trailing: bytes, put, channel: Channel, watch: _Watch,
                    keep: bool, opening: Opening | None = None) -> CallEnd:
        """A chunked 200 stream: the body goes from the backend's socket to the channel in the
        transport's own callback (``_BodyPump``)."""
        pump = _BodyPump(put, channel, watch, keep)
        transport = pump.transport = up_writer.transport
        original = transport.get_protocol()
        transport.set_protocol(pump)  # watch.read() took all the StreamReader held: nothing is lost
        if channel.later is not None and transport.get_extra_info("ssl_object") is None:
            pump.sock = transport.get_extra_info("socket")  # (plain TCP: its bytes are the stream's own)
            channel.reads = pump
        try:
            pump.data_received(trailing)
            if up_reader.at_eof() or up_reader.exception() is not None:
                pump.eof_received()  # what the StreamReader heard before the switch
            if not await watch.until(pump.outcome):
                return CallEnd.BROKEN
            outcome = pump.outcome.result()
            if outcome is CallEnd.REUSABLE and pump.unasked:
                outcome = CallEnd.ENDED  # (bytes after the last chunk, in a read of their own)
            if outcome is CallEnd.BROKEN and (not watch.streaming or opening is not None and not opening.begun) \
                    and not channel.closed:
                # cut before any data (comments aside): no answer began, nothing reached the client; a
                # failure before the first byte, as a silence is (the next upstream may answer)
                channel.event(failure(502, "the upstream ended its stream before any data", "upstream_unavailable"))
            return outcome
        finally:
            if channel.reads is pump:
                channel.reads = None
            transport.set_protocol(original)
            pump.close()


def _too_large(channel: Channel, limit: int) -> CallEnd:
    """A 200 JSON body past ``limit`` (``max_answer``): the call fails, its connection closed.
    Before anything of it went on (a fallback upstream may answer instead: routing.py's rule)."""
    channel.event(failure(502, f"the upstream answered with one JSON body (stream ignored) larger than "
                               f"{limit / (1 << 20):g} MiB ({OUTPUT_EVENTS} × max_upstream_event_mb): the "
                               "upstream request was dropped", "upstream_error", OUTPUT_TOO_LARGE))
    return CallEnd.BROKEN


async def _taken(channel: Channel, watch: _Watch) -> None:
    """Wait until the consumer took what waits in ``channel`` (the backend is not read meanwhile:
    that silence is ours, not the backend's)."""
    taken = asyncio.get_running_loop().create_future()
    channel.on_take = lambda: taken.done() or taken.set_result(None)
    try:
        await taken
    finally:
        channel.on_take = None
        watch.ours()


class _BodyPump(asyncio.Protocol):
    """Stands in for the backend connection's protocol while a chunked stream is forwarded: each
    read is decoded and put into the channel at once. ``outcome`` resolves to REUSABLE (the last
    chunk came, nothing after it, the backend keeps the connection), ENDED or BROKEN (also when
    ``put`` says to read no more: the turn is over, or its stream was refused). Past ``FULL``
    bytes waiting in the channel it stops reading the backend until they are taken."""

    def __init__(self, put, channel: Channel, watch: _Watch, keep: bool) -> None:
        self.put, self.channel, self.watch, self.keep = put, channel, watch, keep
        self.decoder = ChunkedDecoder()
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.sock = None  # the backend's plain TCP socket, when its reads may be deferred
        self.deferred = False
        self.unasked = False  # bytes came after the stream's end (the connection is not pooled)

    # --- deferred reads (``Channel.reads``; relay/exchange.py ``_Window`` says when) ----------

    def defer(self) -> bool:
        """Stop waking the loop for each read: the kernel wakes it only past ``DEFERRED`` bytes
        (a burst) or at the connection's end. False: it cannot (the stream ended)."""
        if self.outcome.done():
            return False
        if not self.deferred:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, DEFERRED)
            except OSError:
                return False
            self.deferred = True
        return True

    def drain(self) -> bool:
        """Read what the backend sent since the last read, now; True if anything came."""
        if not self.deferred or self.paused or self.outcome.done():
            return False
        try:
            data = os.read(self.sock.fileno(), READ_AT_ONCE)
        except OSError:
            return False  # (nothing there; or an error, which the transport reports as it reads)
        if not data:
            return False  # (the end: the transport hears it too)
        self.data_received(data)
        return True

    def listen(self) -> None:
        """Wake the loop for every read again (setting the mark back also signals what is queued)."""
        if self.deferred:
            self.deferred = False
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass  # (closed meanwhile)

    def data_received(self, data: bytes) -> None:
        if self.outcome.done():
            self.unasked = self.unasked or bool(data)
            return
        if not data:
            return
        self.watch.last = time.monotonic()
        try:
            piece = self.decoder.feed(data)
        except ChunkedError:
            self._end(CallEnd.BROKEN)
            return
        if piece:
            if not self.put(piece):
                self._end(CallEnd.BROKEN)
                return
            if self.channel.size > FULL and not self.paused and self.transport is not None:
                self.paused = self.watch.paused = True  # a slow client: push back on the backend
                self.transport.pause_reading()
                self.channel.on_take = self._resume
        if self.decoder.done:
            self._end(CallEnd.REUSABLE if self.keep and not self.decoder.extra else CallEnd.ENDED)

    def _resume(self) -> None:
        self.channel.on_take = None
        self.paused = self.watch.paused = False
        self.watch.ours()  # the wait was ours, not the backend's silence
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._end(CallEnd.BROKEN)  # closed before the last chunk
        return False

    def connection_lost(self, exc) -> None:
        self._end(CallEnd.BROKEN)

    def _end(self, outcome: CallEnd) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    def close(self) -> None:
        self._end(CallEnd.BROKEN)
        self.listen()  # a pooled connection must wake the loop for its next answer
        if self.paused:
            self._resume()  # a pooled connection must read again
