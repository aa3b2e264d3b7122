"""Which client connections owe the gateway a request head, and which are overdue (no I/O).

A client connection is *waiting* from its connect, and again from the end of each answer on a
keep-alive connection, until the next request's head is in: all that time it costs the gateway
a socket and its buffers while the client need send nothing (or a byte now and then, which
resets mitmproxy's own ``tcp_timeout``). Two bounds, applied by resp2chat_io/addons/head_deadline.py:

- ``limit`` (``header_timeout_secs``): a connection waiting longer is overdue, and closed;
- ``cap`` (``MAX_WAITING``): at most this many wait at once; a new connection past it has the
  oldest waiting one closed (an idle keep-alive one, or one that stalls: a client that means to
  ask sends its head within milliseconds of connecting).

A connection with a request in flight (its head in, its answer not yet ended: a slow upload, a
long stream) is not waiting, nor one upgraded to a WebSocket (its answer never ends here). Its
body, while it arrives, has its own bound (``BodyRate``: at least ``min_request_body_rate_kb``,
by default ``MIN_BODY_RATE``, over each ``header_timeout_secs``), and a client that takes
nothing of its answer its own (``Stalls``); so has a large answer the gateway built itself
while its client takes it (``BodyRate`` again, the bytes taken: the answer's size less what still
waits in the socket's write buffer; at the same rate).
Connections are named by the caller (mitmproxy's client id), requests too (a flow id); ``now``
is any clock that does not go back (``time.monotonic``).
"""

from __future__ import annotations

from collections import deque
from typing import Hashable

MAX_WAITING = 1000  # connections waiting for a head at once (~20 KB of the gateway's memory each)


class HeadDeadline:
    def __init__(self, limit: float, cap: int = MAX_WAITING) -> None:
        self.limit = limit  # seconds; 0: no deadline (the cap still holds)
        self.cap = cap
        self._waiting: dict[Hashable, float] = {}  # connection -> waiting since, oldest first
        self._open: dict[Hashable, set] = {}  # every connection known -> its requests in flight

    def __len__(self) -> int:
        """How many connections wait for a head now."""
        return len(self._waiting)

    def __contains__(self, conn: Hashable) -> bool:
        """A connection known (connected, not gone)."""
        return conn in self._open

    def connected(self, conn: Hashable, now: float) -> list:
        """A new connection, waiting from ``now``. Returns the connections to close to stay
        within ``cap`` (the oldest waiting ones), forgotten here."""
        self._open[conn] = set()
        self.waiting(conn, now)
        excess = []
        while len(self._waiting) > self.cap:
            oldest = next(iter(self._waiting))
            self.gone(oldest)
            excess.append(oldest)
        return excess

    def head(self, conn: Hashable, request: Hashable) -> None:
        """A request's head is in: the connection no longer waits."""
        if conn in self._open:
            self._open[conn].add(request)
            self._waiting.pop(conn, None)

    def ended(self, conn: Hashable, request: Hashable, now: float) -> None:
        """A request's answer ended (or it failed): with none other in flight, the connection
        waits for the next head from ``now``."""
        requests = self._open.get(conn)
        if requests is None:
            return  # (already gone: closed here, or disconnected before its last hook)
        requests.discard(request)
        if not requests:
            self.waiting(conn, now)

    def waiting(self, conn: Hashable, now: float) -> None:
        """The connection waits for a head from ``now`` (again: its clock restarts)."""
        if conn in self._open:
            self._waiting.pop(conn, None)
            self._waiting[conn] = now  # (at the end: ``now`` never goes back, so oldest first)

    def gone(self, conn: Hashable) -> None:
        """The connection closed: forgotten."""
        self._open.pop(conn, None)
        self._waiting.pop(conn, None)

    def overdue(self, now: float) -> list:
        """The connections that have waited ``limit`` seconds or more, oldest first (the caller
        closes them, ``gone``, or lets them wait again, ``waiting``)."""
        if not self.limit:
            return []
        late = []
        for conn, since in self._waiting.items():
            if now - since < self.limit:
                break
            late.append(conn)
        return late


class Stalls:
    """Client connections that take nothing of an answer waiting for them, for ``limit`` seconds
    (``header_timeout_secs``: the same bound on how long a client may keep the gateway waiting).

    A client that stops reading its stream (a frozen process, a suspended laptop, on purpose)
    without closing its socket pushes back on the gateway, which pauses the backend (the relay
    reads no more once 1 MiB waits): nothing grows, but nothing ends either. Its turn, its client's
    ``max_streams`` slot and the backend's request were held for as long as the socket lived.
    Sampled about once a second (``sample``): ``pending``, the bytes waiting for the client (in
    asyncio's write buffer and, not acknowledged yet, in the kernel's send queue), does not change while the
    client reads nothing (nothing can be sent); a client that reads, however slowly, changes it.
    Both buffers: on loopback the kernel's queue takes up to a few MiB, and a client reading
    steadily moves only that one for many seconds (taken, with asyncio's alone, for one that
    reads nothing: reset mid-answer)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit  # seconds; 0: no deadline
        self._seen: dict[Hashable, tuple[int, float]] = {}  # connection -> (pending bytes, unchanged since)

    def sample(self, conn: Hashable, pending: int, now: float) -> bool:
        """``pending`` bytes wait to be written to ``conn`` at ``now``: whether the client has
        taken none of them for ``limit`` seconds (the caller closes it, ``gone``)."""
        if not self.limit or pending <= 0:
            self._seen.pop(conn, None)
            return False
        last = self._seen.get(conn)
        if last is None or last[0] != pending:
            self._seen[conn] = (pending, now)
            return False
        return now - last[1] >= self.limit

    def keep(self, conns) -> None:
        """Only ``conns`` are still open: the others are forgotten."""
        self._seen = {conn: seen for conn, seen in self._seen.items() if conn in conns}

    def gone(self, conn: Hashable) -> None:
        self._seen.pop(conn, None)


MIN_BODY_RATE = 4 << 10  # bytes a second a request body must bring, over each window, by default (4 KiB/s: 32 kbit/s)


class BodyRate:
    """Request bodies that arrive slower than ``rate`` bytes a second over the last ``window``
    seconds (``header_timeout_secs``), once ``window`` seconds passed since their head.

    The head deadline stops at the head: past it, a client that declared a large body and sends
    a byte now and then was held as long as it liked, its body so far in memory (12 connections,
    16 MiB each then a byte every 10 s: +231 MiB held, none closed). The bound is the usual one
    (Apache's ``mod_reqtimeout`` ``MinRate``, nginx's ``client_body_timeout``): a body must keep
    coming, at ``rate`` averaged over a sliding ``window`` (not since its head, which a fast start
    would pay for a long stall after it). An honest slow upload above the rate is never cut,
    however long it lasts. Sampled about once a second (``sample``) with the bytes of the body
    arrived so far; ``since`` names the body (its head's time: a new one on the same connection
    starts afresh).

    The same rule bounds how slowly a client may take a large answer the gateway built itself
    (a stored response, a conversation's items page, a non-streamed turn's Response: whole, in
    its connection's write buffer, counted by ``max_answers_waiting_mb``): the bytes "arrived"
    are the bytes taken (the answers' size less what still waits: asyncio's buffer and the
    kernel's bytes not acknowledged yet, as ``Stalls`` counts them), ``since`` the
    first answer's time. A client reading a few bytes every few seconds defeats ``Stalls`` (what
    waits changes) but not this: it is closed after a window or two, its answer let go. The
    trade-off: a genuinely slow link (below the rate) cannot read a large page; it can read it in
    smaller pages (``limit``), or the operator lowers the rate."""

    def __init__(self, window: float, rate: int = MIN_BODY_RATE) -> None:
        self.window = window  # seconds; 0: no bound
        self.rate = rate  # bytes a second (``min_request_body_rate_kb``); 0: no bound
        self._seen: dict[Hashable, tuple[float, deque]] = {}  # connection -> (since, [(time, bytes)])

    def sample(self, conn: Hashable, since: float, received: int, now: float) -> bool:
        """``received`` bytes of the body whose head came at ``since`` arrived on ``conn`` by
        ``now``: whether fewer than ``rate * window`` came over the last ``window`` seconds (the
        caller closes it, ``gone``)."""
        if not self.window or not self.rate:
            self._seen.pop(conn, None)
            return False
        seen = self._seen.get(conn)
        if seen is None or seen[0] != since:
            seen = self._seen[conn] = (since, deque([(since, 0)]))
        history = seen[1]
        history.append((now, received))
        while len(history) > 1 and history[1][0] <= now - self.window:
            history.popleft()  # (the first left is the last sample at least ``window`` ago)
        start, before = history[0]
        return now - since >= self.window and received - before < self.rate * self.window

    def keep(self, conns) -> None:
        """Only ``conns`` still have a body arriving: the others are forgotten."""
        self._seen = {conn: seen for conn, seen in self._seen.items() if conn in conns}

    def gone(self, conn: Hashable) -> None:
        self._seen.pop(conn, None)
