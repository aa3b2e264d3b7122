"""The relay's mitmproxy side: a loopback HTTP/1.1 server that serves only this gateway.

mitmproxy forwards each translated turn here (the addon points the flow at ``Relay.address``),
because mitmproxy calls a stream callable only when bytes arrive from the server and an addon
can neither write into a live stream nor stream a body it makes (mitmproxy issue #8103).

Who gets served: only a request that names an ``Exchange`` the addon registered (``expect``)
and carries that exchange's per-turn secret, compared in constant time. The exchange is claimed
once. Anything else — another local process, a replayed or forged request — gets the connection
closed and never reaches a backend. Where the turn goes, and what it sends, comes from the
exchange (the gateway's configuration and the lowered turn), never from the request: mitmproxy's
request carries no body (addons/http_turns.py ``BodyAside``; one that does is read and dropped).

When: its port is bound the first time anyone asks for its ``address``, and served from
``start`` (the gateway's ``running`` hook). mitmproxy listens before that hook runs, so a turn
that arrives during start-up waits in the port's backlog instead of failing.

When a turn's backend call starts: as soon as every request hook has run (``begin``, called by
the addon's last hook), not when mitmproxy's request arrives, which then claims the run under
way; its news waits in its channel meanwhile (bounded: ``FULL``, upstream.py). A run begun is
cancelled if its request never comes: the flow ended first (``forget``), or ``REQUEST_DEADLINE``
went by (the turn is then given up: should the request come after all, it ends with a failure).

Half-sent requests: a request must arrive whole (head and body) within ``REQUEST_DEADLINE`` of
its first byte, or of the connection for its first request; else the connection is closed. Only
a connection that served a claimed exchange (mitmproxy's, kept alive) may wait for its next
request without a deadline. Any local process can connect to the loopback port: none can hold a
connection (and its buffers) open by sending half a head.

Failures of one turn (a bug of ours included) are logged as warnings: mitmproxy's start-up check
(``errorcheck``) stops the process on any ERROR logged before it is running, and no request may
be able to do that.

What it answers: ``200`` at once, then a body of meaningless *ticks* (``TICK``), each one only
making mitmproxy call the flow's stream callable, which takes the turn's news from the
in-process ``Channel`` (resp2chat_core/channel.py). When the client goes away, mitmproxy closes
this connection and the backend call is cancelled with it, so a dropped turn stops costing GPU.
A turn the addon gives up (it failed closed at the response head: ``Exchange.abort``) has its
backend call cancelled too, and its body ended at once.

A ``Feed`` is a stream the gateway makes itself, from no backend call of its own (a background
response's events, which a turn running elsewhere in the gateway produces:
addons/background.py): ``200`` at once, a tick whenever the addon calls ``wake``, the body's end
when it calls ``end``; the client going away only ends this connection.

It also answers, for the gate, a request refused at its head whose body the gate will not read
(``HeadRefusal``: addons/gate.py says why an addon cannot do that itself): the refusal goes out at once,
and the connection ends when the body has ended, or as soon as the gate says it went on too long.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable

import h11

from resp2chat_core.gate import MAX_HEAD

from . import websocket
from .constants import READ
from .exchange import Exchange, run
from .upstream import UpstreamClient, failure

log = logging.getLogger("resp2chat.relay")

TURN_HEADER = "x-resp2chat-turn"  # names the exchange (the flow id): not a secret
KEY_HEADER = "x-resp2chat-key"  # the exchange's secret
_TURN, _KEY = TURN_HEADER.encode(), KEY_HEADER.encode()  # (as h11 gives header names: bytes, lower case)
TICK = b"1\r\n.\r\n"  # one chunk, one byte: "take what the channel holds"
MAX_REQUEST = 256 << 20  # what mitmproxy may send us (the addon bounds the real body far lower)
REQUEST_DEADLINE = 10.0  # seconds for a request to arrive whole (mitmproxy sends it at once, on loopback)


@dataclass(eq=False)
class HeadRefusal:
    """A refusal the gate made at a request's head (addons/gate.py), sent by the relay at once.
    The connection then ends when mitmproxy is done with it (the client's body ended), when the
    gate calls ``close`` (the body went on past what the gate reads of it), or after ``linger``
    seconds; the refusal says ``connection: close``."""

    turn_id: str  # the flow's id
    secret: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    linger: float = 10.0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        self.closed.set()


@dataclass(eq=False)
class Feed:
    """A stream the gateway makes itself (see the module's docstring): the flow's stream
    callable takes what to send from where the addon keeps it, at each tick."""

    turn_id: str  # the flow's id
    secret: str
    wake: Callable[[], None] | None = None  # set while the relay serves it: one tick
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self) -> None:
        self.ended.set()


class Relay:
    def __init__(self) -> None:
        self.client = UpstreamClient()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._sock: socket.socket | None = None
        self._expected: dict[str, Exchange | websocket.Socket | HeadRefusal | Feed] = {}
        self._unclaimed: dict[str, asyncio.TimerHandle] = {}  # exchanges begun, not claimed yet: their deadlines
        self.active = 0  # exchanges in flight: tests check that aborted turns leave nothing behind
        self.sockets = 0  # Responses WebSockets open (websocket.py)
        self.refused = 0  # requests that named no registered exchange or the wrong secret
        self.window = 0.0  # seconds a turn's news may wait to share a tick (coalesce_ms: channel.py)

    @property
    def address(self) -> tuple[str, int]:
        if not self.port:
            self._bind()
        return "127.0.0.1", self.port

    def _bind(self) -> None:
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
        # accepted sockets inherit it; without it every tick waits ~40 ms for a delayed ACK
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        sock.setblocking(False)
        self._sock, self.port = sock, sock.getsockname()[1]

    async def start(self) -> int:
        if self._sock is None:
            self._bind()
        self.server = await asyncio.start_server(self._serve, sock=self._sock)
        return self.port

    async def close(self) -> None:
        if self.server:
            self.server.close()
        elif self._sock is not None:
            self._sock.close()
        self.client.close()
        for turn_id in list(self._unclaimed):
            self.forget(turn_id)
        self._expected.clear()

    def run(self, ex: Exchange):
        """Run ``ex`` (a coroutine): a turn awaited directly (the Responses WebSocket, a
        background response), with this relay's client and window."""
        return run(ex, self.client, self.window)

    def expect(self, exchange: Exchange | websocket.Socket | HeadRefusal | Feed) -> list[tuple[str, str]]:
        """Register an exchange (or a socket, an answer, a feed); returns the headers mitmproxy's
        request must carry."""
        self._expected[exchange.turn_id] = exchange
        return [(TURN_HEADER, exchange.turn_id), (KEY_HEADER, exchange.secret)]

    def begin(self, turn_id: str) -> None:
        """Run the registered exchange ``turn_id`` now: every request hook has run and mitmproxy's
        request is on its way here (addons/http_turns.py ``BodyAside``), so the backend call need
        not wait for mitmproxy to dispatch, connect and send it. The request, when it comes, claims
        the run under way (``_exchange``). One never claimed is dropped: by ``forget`` (the flow
        ended: an error, the client went away), or ``REQUEST_DEADLINE`` after it began
        (``_overdue``)."""
        ex = self._expected.get(turn_id)
        if not isinstance(ex, Exchange) or ex.task is not None:
            return
        # (eager: it runs up to its first wait now, so the request is on its way to the backend
        # before mitmproxy goes on)
        loop = asyncio.get_running_loop()
        ex.task = asyncio.Task(self.run(ex), loop=loop, eager_start=True)
        ex.task.add_done_callback(_retrieve)
        self._unclaimed[turn_id] = loop.call_later(REQUEST_DEADLINE, self._overdue, ex)

    def forget(self, turn_id: str) -> None:
        """The turn ended without reaching us (a local answer, server replay, an error): a run
        begun for it is cancelled."""
        ex = self._expected.pop(turn_id, None)
        deadline = self._unclaimed.pop(turn_id, None)
        if deadline is not None:
            deadline.cancel()
        task = getattr(ex, "task", None)
        if task is not None:
            task.cancel()
            if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
                log.warning(f"resp2chat relay: {type(exc).__name__}: {exc}", exc_info=exc)  # (a bug of ours)

    def _overdue(self, ex: Exchange) -> None:
        """mitmproxy's request for a begun exchange has not come within ``REQUEST_DEADLINE``: its
        backend call is dropped. Should the request come after all, the turn ends with a failure
        (the exchange is given up: ``Exchange.abort``); else the flow's end forgets it."""
        del self._unclaimed[ex.turn_id]
        if ex.task.done():
            return  # (the answer waits in its channel, as an exchange not begun waits: until the flow ends)
        log.warning(f"resp2chat relay: turn {ex.turn_id} did not reach the relay within {REQUEST_DEADLINE:g} s: "
                    f"its backend call is dropped")
        ex.abort()
        ex.task.cancel()
        ex.task.add_done_callback(lambda _: ex.channel.event(failure(
            504, f"the gateway's relay did not get this turn within {REQUEST_DEADLINE:g} s", "server_error")))

    @property
    def expected(self) -> int:
        return len(self._expected)

    def _claim(self, request: h11.Request) -> Exchange | websocket.Socket | HeadRefusal | Feed | None:
        turn = key = b""
        for name, value in request.headers:
            if name == _TURN:
                turn = value
            elif name == _KEY:
                key = value
        exchange = self._expected.get(turn.decode("latin-1"))
        if exchange is None or not hmac.compare_digest(exchange.secret.encode(), key):
            return None
        del self._expected[exchange.turn_id]
        deadline = self._unclaimed.pop(exchange.turn_id, None)
        if deadline is not None:
            deadline.cancel()
        return exchange

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_connection(reader, writer)
        except Exception as exc:  # noqa: BLE001 — a bug of ours: this connection ends, nothing else
            log.warning(f"resp2chat relay: {type(exc).__name__}: {exc}", exc_info=exc)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (a client's head the gate refuses may be a read past MAX_HEAD: mitm_head.py; mitmproxy adds to it)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=4 * MAX_HEAD)
        idle = False  # waiting for a kept-alive connection's next request: no deadline before its first byte
        try:
            while True:
                request, deadline = await _read_head(conn, reader, idle)
                if request is None:
                    return
                exchange = self._claim(request)
                if exchange is None:
                    self.refused += 1
                    return  # not ours: nothing is answered, nothing goes upstream
                if isinstance(exchange, websocket.Socket):
                    self.sockets += 1
                    try:
                        await websocket.serve(exchange, request, conn, reader, writer)
                    finally:
                        self.sockets -= 1
                    return  # the connection was the socket's
                if isinstance(exchange, HeadRefusal):
                    await _answer(exchange, conn, reader, writer)
                    return
                if isinstance(exchange, Feed):
                    await _read_body(conn, reader, deadline)
                    await _feed(exchange, conn, reader, writer)
                    return  # (the connection was the feed's)
                await _read_body(conn, reader, deadline)  # (none: http_turns.BodyAside; read, so the connection goes on)
                await self._exchange(exchange, reader, writer, conn)  # (the body is the exchange's own)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                idle = True
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError, _TooLarge, TimeoutError):
            pass
        finally:
            writer.close()

    async def _exchange(self, ex: Exchange, reader, writer, conn: h11.Connection) -> None:
        """Run ``ex``: what goes upstream (bodies, headers, keys) is the exchange's, made by the
        addon from the gateway's configuration; mitmproxy's request only names it."""
        self.active += 1
        writer.write(conn.send(h11.Response(status_code=200, headers=[
            (b"content-type", b"application/x-resp2chat-ticks"), (b"cache-control", b"no-cache"),
            (b"transfer-encoding", b"chunked")])))
        ex.channel.attach(lambda: writer.write(TICK))  # (one now if the run, begun before, has news)
        # The only thing mitmproxy may send while we stream is EOF: the client went away.
        gone = asyncio.ensure_future(reader.read(1))
        task = ex.task or asyncio.ensure_future(self.run(ex))  # (``begin``: it runs already)
        stopped = asyncio.get_running_loop().create_future()  # the addon gave the turn up (Exchange.abort)
        ex.stop = lambda: stopped.done() or stopped.set_result(None)
        if ex.aborted:
            ex.stop()
        try:
            await asyncio.wait({gone, task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ex.stop = None
            for t in (gone, task, stopped):
                if not t.done():
                    t.cancel()
            # Wait for the cancellations: a still-pending read would steal the next request.
            await asyncio.gather(gone, task, return_exceptions=True)
            self.active -= 1
        if not task.cancelled() and (exc := task.exception()) is not None:
            # a bug of ours: the turn still ends with a clear failure (a warning: see the top)
            log.warning(f"resp2chat relay: {type(exc).__name__}: {exc}", exc_info=exc)
            ex.channel.event(failure(502, "the gateway's relay failed", "server_error"))
        ex.channel.wake = None
        if task.cancelled() and (not ex.aborted or (gone.done() and not gone.cancelled())):
            return  # the client went away: so does this connection
        # (aborted: the backend call was dropped; the body ends now, so mitmproxy sends the answer
        # the addon put in its place at once)
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


async def _feed(feed: Feed, conn: h11.Connection, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    writer.write(conn.send(h11.Response(status_code=200, headers=[
        (b"content-type", b"application/x-resp2chat-ticks"), (b"cache-control", b"no-cache"),
        (b"transfer-encoding", b"chunked")])))
    feed.wake = lambda: writer.write(TICK)
    writer.write(TICK)  # (what is there already)
    gone = asyncio.ensure_future(reader.read(1))  # EOF: the client went away
    over = asyncio.ensure_future(feed.ended.wait())
    try:
        await asyncio.wait({gone, over}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        feed.wake = None
        for t in (gone, over):
            t.cancel()
        await asyncio.gather(gone, over, return_exceptions=True)
    if over.done() and not over.cancelled():
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


async def _answer(answer: HeadRefusal, conn: h11.Connection, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode()), (b"connection", b"close")]
    writer.write(conn.send(h11.Response(status_code=answer.status, headers=headers,
                                        reason=HTTPStatus(answer.status).phrase.encode())))
    writer.write(conn.send(h11.Data(data=answer.body)) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    gone = asyncio.ensure_future(reader.read(1))  # EOF: mitmproxy is done with the request
    stop = asyncio.ensure_future(answer.closed.wait())
    try:
        await asyncio.wait({gone, stop}, timeout=answer.linger, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (gone, stop):
            t.cancel()
        await asyncio.gather(gone, stop, return_exceptions=True)


def _retrieve(task: asyncio.Future) -> None:
    """(A run's exception is the relay's to report when it claims it; one never claimed is not
    "never retrieved".)"""
    if not task.cancelled():
        task.exception()


class _TooLarge(Exception):
    pass


async def _read_head(conn: h11.Connection, reader: asyncio.StreamReader,
                     idle: bool) -> tuple[h11.Request | None, float]:
    """The next request's head from mitmproxy (None at EOF) and the loop time by which its body
    must be in too. ``idle``: a kept-alive connection, whose next request may take its time to
    begin; otherwise the deadline runs from now. ``TimeoutError`` past the deadline."""
    loop = asyncio.get_running_loop()
    deadline = None if idle else loop.time() + REQUEST_DEADLINE
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            async with asyncio.timeout_at(deadline):
                data = await reader.read(READ)
            if deadline is None:
                deadline = loop.time() + REQUEST_DEADLINE
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event, deadline if deadline is not None else loop.time() + REQUEST_DEADLINE
        return None, 0.0  # ConnectionClosed (or anything else between requests)


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader, deadline: float) -> None:
    """Read mitmproxy's request body to its end, keeping nothing: what goes upstream is the
    exchange's (the flow's body is the same chat request, there for flow files and replay)."""
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            async with asyncio.timeout_at(deadline):
                data = await reader.read(READ)
            conn.receive_data(data)
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_REQUEST:
                raise _TooLarge()
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise ConnectionResetError("mitmproxy's request ended early")
