"""A client connection that sends no request head in time is closed (``header_timeout_secs``).

Why. mitmproxy holds a client connection until ``tcp_timeout`` (600 s) of silence, and any byte
resets that: a client that sends half a request head, or one byte every few seconds, is held
as long as it likes, unauthenticated (the gate decides at the head, which never comes). Measured
before this addon: 3000 such connections held, +60 MB; the process may open 20000 files.

What. The rule is resp2chat_core/head_deadline.py: a connection waits for a head from its connect,
and again from the end of each answer (keep-alive); one that waited ``header_timeout_secs`` is
closed, and at most ``MAX_WAITING`` wait at once (a new one past it has the oldest waiting
closed). The hooks say when: ``client_connected``, ``requestheaders`` (the head is in: first
in the addon chain, before any hook could take time), ``response``/``error`` (the answer
ended; a ``101`` upgrade never ends here: a WebSocket has no such deadline),
``client_disconnected``. mitmproxy runs the hooks after this one (and sends the answer) before
the answer is really out, and may still be writing it to a slow reader: a sweep every second
(``SWEEP_SECS``) closes an overdue connection only if its last flow is done (``flow.live`` false) and
nothing waits in its socket's write buffer; otherwise its clock starts again. The same sweep
closes a connection whose client takes nothing of its answer (``Stalls``) and one whose request
body, arriving, came slower than ``min_request_body_rate_kb`` (4 KiB/s) over the last
``header_timeout_secs`` (``BodyRate``; its bytes counted by ``mitm_head``, as they are read: a
head declaring 32 MiB, 16 MiB sent, then a byte every 10 s was held for as long as it trickled,
12 of them +231 MiB). Such a connection too is closed without an answer: a ``408`` written before
closing a socket whose client still sends is mostly lost to the reset that unread bytes cause.

How. Closed the way mitmproxy's own ``tcp_timeout`` closes one (``ConnectionHandler.on_timeout``):
the client connection's handler task is cancelled, found through the proxyserver addon's
``connections`` (by client id); mitm_websocket.py's guard closes the socket should the
cancellation land on a wait that drops it. No answer is sent: a plain close is what every HTTP
client expects of an idle keep-alive connection (it opens a new one), where a ``408`` written
unasked could be read as the answer to a request the client sent at that moment. A connection
whose client reads too slowly (``Stalls``, the answers' rate) is reset instead (``SO_LINGER`` 0,
the transport aborted): a plain close first flushes what waits, to that same client, as slowly
as it reads: the answer stayed held in the gateway after the "close".

Large answers the gateway builds itself. A stored response, its input items, a conversation's
items page, a non-streamed turn's Response are built whole (up to tens of MiB) and handed to
mitmproxy, which writes them into the client socket's write buffer, where they wait as long as
the client takes to read them: 60 clients reading a 20 MiB page a few bytes every few seconds
held +1.7 GB (``Stalls`` cuts only a client that takes nothing). Two bounds: each such answer of
``SMALL_ANSWER`` or more (or any behind another still waiting: pipelined requests) is counted
in ``max_answers_waiting_mb`` (resp2chat_core/gate.py ``BodyBudget``, as request bodies are in theirs) from its answer until it has left the write
buffer (the sweep: its flow done and nothing waits; what waits is asyncio's write buffer and
the kernel's bytes the client has not acknowledged, ``pending``) or its connection closes; a read (a ``GET``
of the gateway's own endpoints) that would go past it is refused with ``503 server_overloaded``
and ``retry-after`` (``response``: before the other addons' hooks record it), an answer the
client paid backend tokens for is counted, never refused (``AnswersOut``, last in the addon
chain: a turn's Response is made in http_turns.py's ``response`` hook), and so is the answer of
a request that changed something (a conversation's items added: its answer echoes them), which
is refused instead before its work while the budget is taken (``request``). And a connection whose
client takes such answers slower than ``min_request_body_rate_kb`` over the last
``header_timeout_secs`` is closed as the others are (``BodyRate``, the bytes taken: what was
counted less what still waits), so a trickler holds its share for a window or two, not hours.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import time
import weakref

from mitmproxy import connection, ctx, http

from resp2chat_core import gate as G
from resp2chat_core.head_deadline import BodyRate, HeadDeadline as Clock, Stalls

from .. import mitm_head
from .base import META, Owner, fails_closed, log, refusal

SWEEP_SECS = 1.0  # seconds between two sweeps at most (a quarter of the deadline when that is shorter)
KEPT = "answer_kept"  # flow.metadata[META] key: its answer is counted in max_answers_waiting_mb, never refused (``AnswersOut``)
SMALL_ANSWER = 64 << 10  # a gateway-built answer below this is not counted in max_answers_waiting_mb (unless others wait)
try:
    import fcntl
    import termios
    _TIOCOUTQ = getattr(termios, "TIOCOUTQ", None)  # (Linux: a socket's bytes not acknowledged yet; ``unsent``)
except ImportError:  # (not a Unix)
    _TIOCOUTQ = None


@fails_closed
class HeadDeadline(Owner):
    name = "resp2chat_head_deadline"
    owner = "connections"

    def __init__(self, source) -> None:
        super().__init__(source)
        self.clock = Clock(self.s["header_timeout_secs"])
        self.stalls = Stalls(self.s["header_timeout_secs"])
        self.bodies = BodyRate(self.s["header_timeout_secs"], self.s["min_request_body_rate_kb"] << 10)
        self.answers = G.BodyBudget(self.s["max_answers_waiting_mb"] << 20, overloaded=G.answers_overloaded,
                                    share_overloaded=G.client_answers_overloaded)
        self.taking = BodyRate(self.s["header_timeout_secs"], self.s["min_request_body_rate_kb"] << 10)
        self.out: dict[str, tuple[float, dict[str, weakref.ref]]] = {}  # client id -> (since, its answers counted)
        self.dropped = False  # a connection was cut holding a large answer since the last sweep (``sweep_answers``)
        mitm_head.install()  # a request head is bounded while mitmproxy reads it (see there)
        self.last: dict[str, weakref.ref] = {}  # client id -> its last flow that ended
        self._sweep: asyncio.Task | None = None

    def apply(self, updated: set[str]) -> None:
        self.clock.limit = self.stalls.limit = self.bodies.window = self.taking.window = self.s["header_timeout_secs"]
        self.bodies.rate = self.taking.rate = self.s["min_request_body_rate_kb"] << 10
        self.answers.cap = self.s["max_answers_waiting_mb"] << 20  # (the answers waiting keep their share)

    def running(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().create_task(self.sweep())
        if ctx.master is not None and ctx.master.addons.get(AnswersOut.name) is None:
            ctx.master.addons.add(AnswersOut(self))  # last: see there

    def done(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()

    # --- what the hooks tell ---------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        for conn in self.clock.connected(client.id, time.monotonic()):
            self.close(conn, f"more than {self.clock.cap} connections wait for a request head")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.clock.head(flow.client_conn.id, flow.id)

    def request(self, flow: http.HTTPFlow) -> None:
        """A request that changes something (other than a turn: ``POST /v1/responses`` and its
        ``/compact``) is refused here, before its work, while the answers waiting hold
        ``max_answers_waiting_mb`` already (``503 server_overloaded``): its answer, made once the
        work is done, is then too late to refuse (the client's retry would do it twice: add a
        conversation's items again), so, let in, it is counted, never refused (``KEPT``). Above
        all ``POST /v1/conversations/{id}/items``, which answers with every item it added: a
        gzip'd body of a few KiB, MiB of answer (12 of them held past the budget, uncounted)."""
        if flow.response is not None or flow.request.method in ("GET", "HEAD") or flow.websocket is not None:
            return
        found = G.endpoint(flow.request.path.split("?", 1)[0])
        if found is None or found[0] == "responses" and found[1] in ("", "/compact"):
            return  # (not the gateway's own, or a turn: its Response is ``KEPT`` by http_turns.py)
        if self.answers.cap and self.answers.held >= self.answers.cap:
            flow.response = refusal(flow, G.answers_overloaded(self.answers.cap))
        else:
            flow.metadata.setdefault(META, {})[KEPT] = True

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            if flow.request.method in ("GET", "HEAD") and G.endpoint(flow.request.path.split("?", 1)[0]):
                self.answer(flow, must=False)  # (a read of the API: refused past the budget)
            self.ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.answers.give_back(flow.id)  # (its answer, if counted, will not be written: its connection goes)
        out = self.out.get(flow.client_conn.id)
        if out is not None:
            out[1].pop(flow.id, None)
        self.ended(flow)

    def answer(self, flow: http.HTTPFlow, must: bool) -> None:
        """Count ``flow``'s answer, built whole by the gateway, in ``max_answers_waiting_mb``
        until it has left its connection's write buffer (``sweep_answers``); past the budget, a
        read (``must`` false) gets the refusal instead (a turn's Response, ``must``, never)."""
        from .gate import PASSTHROUGH, SHARE as G_SHARE  # (here: gate.py imports this module)
        response, conn = flow.response, flow.client_conn.id
        if (response is None or response.stream or flow.websocket is not None or conn not in self.clock
                or flow.metadata.get(META, {}).get(PASSTHROUGH)):
            return  # (the gateway's own answers only: a passthrough's are the upstream's)
        size = len(response.raw_content or b"")
        pending = waiting(conn) or 0
        # (a small one too behind others still waiting: mitmproxy answers pipelined requests one
        # after another, read or not; 2000 of 60 KiB on one unread socket held +113 MiB, uncounted)
        if not pending and size < SMALL_ANSWER or flow.id in self.out.get(conn, (0, {}))[1]:
            return
        self.settle(conn)  # (the answers before it on a keep-alive connection, out: given back first)
        # (a client's share, as of request bodies: the gate's ``who``, where there are several)
        err = self.answers.take(flow.id, conn, size, flow.metadata.get(META, {}).get(G_SHARE), must=must)
        if err is not None:
            flow.response = refusal(flow, err)
            return
        since, counted = self.out.setdefault(conn, (time.monotonic(), {}))
        counted[flow.id] = weakref.ref(flow)

    def settle(self, conn: str) -> bool:
        """Give back the answers counted on ``conn`` if they are all out: their flows done and
        nothing waits in its write buffer. Whether none is counted now."""
        out = self.out.get(conn)
        if out is None:
            return True
        pending = waiting(conn)
        if pending is not None and (pending or any(f() is not None and f().live for f in out[1].values())):
            return False
        self.answers.gone(conn)
        self.taking.gone(conn)
        del self.out[conn]
        return True

    def ended(self, flow: http.HTTPFlow) -> None:
        conn = flow.client_conn.id
        self.clock.ended(conn, flow.id, time.monotonic())
        if conn in self.clock:
            self.last[conn] = weakref.ref(flow)  # (not the flow: an idle connection holds no body)

    def client_disconnected(self, client: connection.Client) -> None:
        self.forget(client.id)

    def forget(self, conn: str) -> None:
        self.clock.gone(conn)
        self.stalls.gone(conn)
        self.bodies.gone(conn)
        self.last.pop(conn, None)
        self.answers.gone(conn)
        self.taking.gone(conn)
        self.out.pop(conn, None)

    # --- the sweep ---------------------------------------------------------------------------

    async def sweep(self) -> None:
        while True:
            limit = self.clock.limit
            await asyncio.sleep(min(SWEEP_SECS, limit / 4) if limit else SWEEP_SECS)
            now = time.monotonic()
            for conn in self.clock.overdue(now):
                try:
                    last = self.last.get(conn)
                    flow = last() if last is not None else None
                    if (flow is not None and flow.live) or writing(conn):
                        self.clock.waiting(conn, now)  # (its answer is still going out)
                    else:
                        self.close(conn, f"no request head within header_timeout_secs ({limit} s)")
                except Exception as exc:  # noqa: BLE001 — (the sweep goes on for the others)
                    log.warning(f"resp2chat: the head deadline sweep failed: {type(exc).__name__}: {exc}", exc_info=exc)
                    self.forget(conn)
            try:
                self.sweep_stalls(now)
            except Exception as exc:  # noqa: BLE001 — (the next sweep tries again)
                log.warning(f"resp2chat: the stalled reader sweep failed: {type(exc).__name__}: {exc}", exc_info=exc)
            try:
                self.sweep_bodies(now)
            except Exception as exc:  # noqa: BLE001 — (the next sweep tries again)
                log.warning(f"resp2chat: the slow body sweep failed: {type(exc).__name__}: {exc}", exc_info=exc)
            try:
                self.sweep_answers(now)
            except Exception as exc:  # noqa: BLE001 — (the next sweep tries again)
                log.warning(f"resp2chat: the slow answer sweep failed: {type(exc).__name__}: {exc}", exc_info=exc)

    def sweep_answers(self, now: float) -> None:
        """Give back each connection's answers counted once they are out (``settle``), and close
        each connection whose client took them slower than ``min_request_body_rate_kb`` over the
        last ``header_timeout_secs`` (``BodyRate``: the bytes taken are the answers' size less
        what still waits in the write buffer)."""
        self.taking.keep(self.out)
        for conn, (since, _) in list(self.out.items()):
            if self.settle(conn):
                continue
            pending = waiting(conn) or 0
            if self.taking.sample(conn, since, self.answers.on(conn) - pending, now):
                self.close(conn, f"the client took its answer slower than min_request_body_rate_kb "
                                 f"({self.taking.rate >> 10} KiB/s) over header_timeout_secs ({self.taking.window} s)",
                           abort=True)
                self.dropped = True
        if self.dropped:
            # A cut connection's answer is freed only by Python's cycle collector (its cancelled
            # layers refer to one another, as a cut body's do: ``sweep_bodies``), which large
            # bytes never prompt. One collection, at most once a sweep and only after a cut,
            # once the cancellations are through.
            self.dropped = False
            asyncio.get_running_loop().call_later(SWEEP_SECS / 2, gc.collect)

    def sweep_bodies(self, now: float) -> None:
        """Close each client connection whose request body, arriving, brought less than
        ``BodyRate.rate`` a second over the last ``header_timeout_secs`` (``BodyRate``; the bytes
        counted as mitmproxy's HTTP/1 layer reads them: ``mitm_head.BODIES``): what it holds of
        the body is let go, its flow ends in an error as when the client goes away."""
        arriving = {conn: body for conn, body in list(mitm_head.BODIES.items()) if not body.done}
        self.bodies.keep(arriving)
        cut = False
        for conn, body in arriving.items():
            if self.bodies.sample(conn, body.since, body.received, now):
                self.close(conn, f"its request body came slower than min_request_body_rate_kb "
                                 f"({self.bodies.rate >> 10} KiB/s) over header_timeout_secs ({self.bodies.window} s)")
                cut = True
        if cut:
            # A connection's layers refer to one another: once cancelled, the body they gathered
            # is freed only by Python's cycle collector, which may not run for minutes on a quiet
            # gateway (measured: 4 bodies of 8 MiB cut, a second round of them held as much
            # again). Once the cancellations are through (the next turn of the loop, and some),
            # one collection, at most once a sweep and only after a body was cut.
            asyncio.get_running_loop().call_later(SWEEP_SECS / 2, gc.collect)

    def sweep_stalls(self, now: float) -> None:
        """Close each client connection that took nothing of its waiting answer for
        ``header_timeout_secs`` (``Stalls``): its flow ends in an error, as when the client
        goes away, so its turn ends, the backend call is dropped and its client's slot freed."""
        server = ctx.master.addons.get("proxyserver")
        if server is None or not self.stalls.limit:
            return
        handlers = dict(server.connections)
        self.stalls.keep(handlers)
        for conn, handler in handlers.items():
            io = handler.transports.get(handler.client)
            transport = getattr(io.writer, "transport", None) if io is not None else None
            if transport is not None and self.stalls.sample(conn, pending(transport), now):
                self.close(conn, f"the client took none of its answer for header_timeout_secs ({self.stalls.limit} s)",
                           abort=True)

    def close(self, conn: str, why: str, abort: bool = False) -> None:
        self.forget(conn)
        close(conn, why, abort)


def _io(conn: str):
    """The live client connection ``conn`` (an id) as mitmproxy's proxy server holds it (None: gone)."""
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(conn) if server is not None else None
    return handler.transports.get(handler.client) if handler is not None else None


def writing(conn: str) -> bool:
    """Bytes of an answer still wait in the client connection's socket buffer (a slow reader;
    ``conn``: its id). Also upstreams.py's: a passthrough's backend is not read meanwhile."""
    return bool(waiting(conn))


def waiting(conn: str) -> int | None:
    """The bytes of answers waiting for the client connection ``conn`` (its id): in asyncio's
    write buffer and, not acknowledged by the client yet, in the kernel's send queue (``unsent``); None when it is gone
    (or not a live connection)."""
    io = _io(conn)
    transport = getattr(io.writer, "transport", None) if io is not None else None
    return pending(transport) if transport is not None else None


def pending(transport) -> int:
    """What waits to be written to ``transport``'s client: asyncio's write buffer and the
    kernel's bytes the client has not acknowledged. The kernel's count too: on loopback its send queue takes up to a few
    MiB, so a client reading slowly (but reading) moves only that, not asyncio's buffer, and was
    taken for one that reads nothing (``Stalls``) or takes nothing of its answer (the rate)."""
    return transport.get_write_buffer_size() + unsent(transport.get_extra_info("socket"))


def unsent(sock) -> int:
    """The bytes the kernel holds in ``sock``'s send queue, not acknowledged by the client yet (Linux's ``TIOCOUTQ``: sent or not; in flight on a slow network too);
    0 where that cannot be asked (another system, no socket)."""
    if sock is None or _TIOCOUTQ is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


class AnswersOut:
    """Last in the addon chain (``HeadDeadline.running`` adds it): the answers the gateway built
    whole that ``HeadDeadline.response`` did not count, a non-streamed turn's Response above all
    (http_turns.py makes it in its own ``response`` hook, after the deadline's), are counted in
    ``max_answers_waiting_mb``. Those marked ``KEPT`` are counted, never refused: a turn's
    Response (the client paid the backend for it; http_turns.py marks it) and the answer of a
    request that changed something (``HeadDeadline.request``: refused before its work, if at
    all). Any other (a turn's refusal, an error) is refused past the budget, as a read is."""

    name = "resp2chat_answers_out"

    def __init__(self, deadline: HeadDeadline) -> None:
        self.deadline = deadline

    def response(self, flow: http.HTTPFlow) -> None:
        self.deadline.answer(flow, must=bool(flow.metadata.get(META, {}).get(KEPT)))


def close(conn: str, why: str, abort: bool = False) -> None:
    """Close the client connection ``conn`` (its id) as mitmproxy's ``tcp_timeout`` does, its
    handler cancelled: its flow in progress ends in an error (``Client disconnected``), its
    backend connections close, and an answer under way is cut where it is (what was written
    goes out, then the connection's end: not the answer's). Nothing when it is gone already, or
    not a live connection (client replay). ``abort``: what waits in its write buffer, and in the
    kernel's, is dropped (a reset): a slow reader's answer is not kept, and written on, after the
    close (a plain close flushes them first, as slowly as the client reads)."""
    io = _io(conn)
    if io is not None and io.handler is not None:
        log.debug(f"resp2chat: closing a client connection: {why}")
        transport = getattr(io.writer, "transport", None)
        if abort and transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # (a reset: else the kernel still sends what it holds, as slowly)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        io.handler.cancel(why)


def stop_flow(flow: http.HTTPFlow) -> None:
    """End ``flow``, in progress: its backend connection is closed, as when the backend goes
    away (an answer under way ends as mitmproxy ends one cut short: its client connection is
    closed, the head having gone; before the head, the gateway's JSON error: upstreams.py
    ``error``); so is one still being opened (``_opening``); one not connected yet (its request
    still in the hooks: the gate's case only) is killed once they are done. The gate's, for a
    passthrough call of a key no longer accepted (gate.py ``stop_passing``), and the deadline of
    a passthrough's answer head (upstreams.py ``_overdue``: armed once the request left its
    hooks, so connecting or sent)."""
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server is not None else None
    opening = _opening(handler, flow) if handler is not None else None
    if handler is not None and flow.server_conn in handler.transports:
        handler.close_connection(flow.server_conn)
    elif opening is not None:
        handler.close_connection(opening)  # (its connect cancelled: mitmproxy's own has no timeout)
    elif flow.killable:
        flow.kill()


def _opening(handler, flow: http.HTTPFlow):
    """The backend connection mitmproxy is opening for ``flow`` (not its ``server_conn`` until
    connected): of its client connection's handler, the one to its request's address not set
    up yet (an HTTP/1 client connection carries one request at a time)."""
    address = (flow.request.host, flow.request.port)
    return next((conn for conn in list(handler.transports) if conn is not handler.client
                 and conn.timestamp_tcp_setup is None and tuple(conn.address or ()) == address), None)
