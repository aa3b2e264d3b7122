"""The upstream relay: an in-process asyncio hop between mitmproxy and the chat backend.

Why it exists: mitmproxy streams a response body only as it arrives from the server, and an
addon can neither write into a live stream nor stream a body it makes itself. Yet a gateway
must speak *when the backend is silent*: keep Codex's idle timer alive during a long prefill,
fail a turn whose backend stalls, say "cannot connect" as a proper event, and (later) run
tool loops such as web search inside one turn. So the addon points each translated request at
this relay, which answers mitmproxy at once with ``200 text/event-stream`` and then forwards the
backend's body, adding its own events in band where needed:

    data: {"resp2chat": {"accepted": true}}                        at once: the turn has started
    data: {"resp2chat": {"keepalive": true}}                       backend silent (first byte pending)
    data: {"resp2chat": {"upstream_error": {"status": 429, "body": "…", "retry_after": "2"}}}
    data: {"resp2chat": {"upstream_json": "…"}}                    backend ignored stream=true

A marker is only ever inserted between two SSE events, never inside one. The relay closes the
backend connection when mitmproxy's side goes away (the client disconnected), so a cancelled
turn stops costing GPU time. Backend connections are pooled across clients (keep-alive).

The relay speaks HTTP/1.1 on both sides with h11 (mitmproxy's own dependency), except on the hot
path: a backend's chunked stream is decoded by resp2chat_core/chunked.py inside the backend
socket's own callback (``_BodyPump``) and written to mitmproxy as one chunk per read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from urllib.parse import urlencode, urlsplit

import h11

from resp2chat_core import searchloop
from resp2chat_core.chunked import ChunkedDecoder, ChunkedError
from resp2chat_core.searchloop import RoundFilter

log = logging.getLogger("resp2chat.relay")

TARGET_HEADER = "x-resp2chat-target"  # full upstream URL for this request
WEB_SEARCH_HEADER = "x-resp2chat-web-search"  # the gateway runs this turn's web searches
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host",
        b"proxy-connection", b"te", b"upgrade", TARGET_HEADER.encode(), WEB_SEARCH_HEADER.encode()}
MAX_ERROR_BODY = 1 << 20
READ = 65536


def marker(payload: dict) -> bytes:
    return b"data: " + json.dumps({"resp2chat": payload}, ensure_ascii=False).encode() + b"\n\n"


ACCEPTED = marker({"accepted": True})


class Relay:
    def __init__(self, *, connect_timeout: float = 10.0, idle_timeout: float = 60.0, keepalive: float = 15.0,
                 verify_tls: bool = True):
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.verify_tls = verify_tls
        self.brave_key = ""  # web search runs only with a key
        self.brave_base_url = "https://api.search.brave.com"
        self.brave_max_results = 5
        self.max_search_rounds = 5
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.exchanges = 0  # in flight: tests check that aborted turns leave nothing behind
        self._pool: dict[tuple, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self.server:
            self.server.close()
        for conns in self._pool.values():
            for _, w in conns:
                w.close()
        self._pool.clear()

    # --- mitmproxy side ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_message(conn, reader)
                if request is None:
                    return
                await self._exchange(request, body, reader, writer, conn)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _exchange(self, request: h11.Request, body: bytes, reader, writer, conn: h11.Connection) -> None:
        self.exchanges += 1
        headers = dict(request.headers)
        target = headers.get(TARGET_HEADER.encode(), b"").decode()
        searching = bool(headers.get(WEB_SEARCH_HEADER.encode())) and bool(self.brave_key)
        writer.write(conn.send(h11.Response(status_code=200, headers=[
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"transfer-encoding", b"chunked")])))
        # The client hears "response.created" now, not after the backend's prefill.
        writer.write(conn.send(h11.Data(data=ACCEPTED)))
        # The only thing mitmproxy may send while we stream is EOF: the client went away.
        gone = asyncio.ensure_future(reader.read(1))
        pump = asyncio.ensure_future(self._pump(target, request, body, writer, searching))
        try:
            await asyncio.wait({gone, pump}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (gone, pump):
                if not task.done():
                    task.cancel()
            # Wait for the cancellations: a still-pending read would steal the next request.
            await asyncio.gather(gone, pump, return_exceptions=True)
            self.exchanges -= 1
        if pump.done() and not pump.cancelled() and pump.exception() is None:
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()

    async def _pump(self, target: str, request: h11.Request, body: bytes, down: asyncio.StreamWriter,
                    searching: bool) -> None:
        def send(data: bytes) -> None:
            if data:
                # chunked framing by hand: h11 adds nothing here but cost on the hot path
                # (our response is always chunked; h11 still writes its end in _exchange)
                down.write(b"%x\r\n%s\r\n" % (len(data), data))

        if searching:
            await self._search_loop(target, request, body, send, down)
        else:
            await self._round(target, request, body, send, send, down)

    async def _round(self, target: str, request: h11.Request, body: bytes, send, sink, down) -> bool:
        """One upstream request; the body of a 200 stream goes to ``sink``, everything else to
        ``send``. True when the backend answered 200 and its stream ended properly."""
        def fail(status: int, message: str, kind: str) -> None:
            send(marker({"upstream_error": {"status": status, "body": json.dumps(
                {"error": {"message": message, "type": kind}})}}))

        url = urlsplit(target)
        key = (url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80))
        for attempt in (1, 2):
            try:
                up_reader, up_writer, pooled = await self._connect(key)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
                fail(502, f"cannot connect to the upstream {url.scheme}://{url.netloc}: {reason}", "upstream_unavailable")
                return False
            outcome, answered = "broken", [False]
            try:
                outcome = await self._forward(url, request.headers, body, up_reader, up_writer, send, sink, down, answered)
            except (OSError, h11.ProtocolError) as exc:
                outcome = "stale" if pooled and not answered[0] else "broken"
                if outcome == "broken" and not answered[0]:
                    fail(502, f"the upstream connection failed: {exc}", "upstream_unavailable")
            finally:
                if outcome == "reusable":
                    self._pool.setdefault(key, []).append((up_reader, up_writer))
                else:
                    up_writer.close()
            if outcome != "stale" or attempt == 2:
                return outcome in ("reusable", "ended")
            # a pooled connection the backend had closed meanwhile: once more on a fresh one
        return False

    async def _search_loop(self, target: str, request: h11.Request, body: bytes, send, down) -> None:
        """Rounds of: stream the model, run its web searches, ask again (see searchloop.py)."""
        chat, usages, rounds = json.loads(body), [], 0
        while True:
            filt = RoundFilter()
            ok = await self._round(target, request, body, send, lambda d: send(filt.feed(d)), down)
            tail, result = filt.finish()
            send(tail)
            if not ok or not result.done:
                send(_round_end(result))  # a failed round: let the translator see how it ended
                return
            if result.usage:
                usages.append(result.usage)
            results = []
            for call in result.searches:
                send(marker({"web_search": {"phase": "started", "id": call["id"], "query": call["query"]}}))
                await down.drain()
                text, sources = await self._brave(call["query"])
                results.append((call["id"], text))
                send(marker({"web_search": {"phase": "done", "id": call["id"], "query": call["query"],
                                            "sources": sources}}))
            if not result.searches or result.client_calls:
                # Nothing to search, or the client has tool calls to run first: the turn ends here.
                send(searchloop.final_chunks(result.finish_reason, usages))
                return
            rounds += 1
            chat = searchloop.next_request(chat, result.assistant, results, rounds >= self.max_search_rounds)
            body = json.dumps(chat, ensure_ascii=False, separators=(",", ":")).encode()

    async def _brave(self, query: str) -> tuple[str, list[str]]:
        """Brave Search -> (text for the model, source URLs). Failures become text, not errors."""
        url = urlsplit(self.brave_base_url.rstrip("/") + "/res/v1/web/search?"
                      + urlencode({"q": query, "count": self.brave_max_results}))
        key = (url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80))
        try:
            reader, writer, _ = await self._connect(key)
            try:
                status, data = await asyncio.wait_for(_get(url, reader, writer, [
                    (b"accept", b"application/json"), (b"x-subscription-token", self.brave_key.encode())]),
                    self.idle_timeout if self.idle_timeout != float("inf") else None)
            finally:
                writer.close()
            if status != 200:
                message = data.decode("utf-8", "replace")[:300].replace(self.brave_key, "[redacted]")
                return f"Web search failed (HTTP {status}): {message}", []
            return searchloop.format_results(query, json.loads(data), self.brave_max_results)
        except (OSError, asyncio.TimeoutError, ValueError, h11.ProtocolError) as exc:
            return f"Web search failed: {type(exc).__name__}: {exc}", []

    # --- backend side ----------------------------------------------------------------------

    async def _connect(self, key: tuple):
        idle = self._pool.get(key)
        while idle:
            r, w = idle.pop()
            if not w.is_closing() and not r.at_eof():
                return r, w, True
            w.close()
        scheme, host, port = key
        tls = None
        if scheme == "https":
            tls = ssl.create_default_context()
            if not self.verify_tls:
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), self.connect_timeout)
        return r, w, False

    async def _forward(self, url, request_headers, body: bytes, up_reader, up_writer, send, sink, down,
                       answered: list[bool]) -> str:
        """Send the request, stream the answer back; "reusable" or "broken" for the connection.
        ``answered[0]`` turns true with the backend's first byte (a stale pooled connection
        fails before it, and is retried)."""
        client = h11.Connection(h11.CLIENT)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [(n, v) for n, v in request_headers if n not in _HOP]
        headers += [(b"host", url.netloc.encode()), (b"content-length", str(len(body)).encode())]
        up_writer.write(client.send(h11.Request(method="POST", target=path, headers=headers)))
        up_writer.write(client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))

        at_boundary, streamed, last = True, False, time.monotonic()

        async def recv() -> bytes | None:
            """The backend's next bytes (b"" at EOF); None once it was silent for idle_timeout."""
            nonlocal last
            while True:
                wait = self.idle_timeout - (time.monotonic() - last)
                if wait <= 0:
                    if at_boundary:
                        send(_stalled(self.idle_timeout))
                    return None
                try:
                    async with asyncio.timeout(min(wait, self.keepalive)):
                        # all it holds: the chunked path hands the socket to _BodyPump after this
                        data = await up_reader.read(1 << 22)
                except TimeoutError:
                    if at_boundary and not streamed:  # prefill: keep the client's idle timer alive
                        send(marker({"keepalive": True}))
                        await down.drain()
                    continue
                answered[0] = answered[0] or bool(data)
                last = time.monotonic()
                return data

        async def forward(data: bytes) -> None:
            # One downstream chunk per upstream read, not per upstream chunk: mitmproxy and the
            # translator pay per chunk, and a read under load carries many.
            nonlocal at_boundary, streamed
            sink(data)
            streamed = True
            at_boundary = data.endswith((b"\n\n", b"\r\n\r\n"))
            if down.transport.get_write_buffer_size() > 1 << 20:
                await down.drain()  # a slow client: push back on the backend

        async def next_event():
            """h11's next event, reading from the backend as needed; None once it went silent."""
            while (event := client.next_event()) is h11.NEED_DATA:
                data = await recv()
                if data is None:
                    return None
                client.receive_data(data)
            return event

        # The head, through h11.
        while not isinstance(event := await next_event(), h11.Response):
            if event is None:
                return "broken"
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("closed before answering")
        hdrs = dict(event.headers)
        status, ctype, retry_after = event.status_code, hdrs.get(b"content-type", b""), hdrs.get(b"retry-after")
        stream = status == 200 and b"json" not in ctype

        if stream and b"chunked" in hdrs.get(b"transfer-encoding", b"").lower():
            # The hot path: the body goes from the backend's socket to mitmproxy's in the
            # transport's own callback (_BodyPump), with no task switch or timer per read.
            # Pooled afterwards only if the backend keeps the connection (h11 checked this itself
            # before; cpp-httplib, llama.cpp's server, says "close" when a connection is used up).
            keep = event.http_version == b"1.1" and b"close" not in hdrs.get(b"connection", b"").lower()
            pump = _BodyPump(sink, down, keep)
            transport = pump.transport = up_writer.transport
            original = transport.get_protocol()
            transport.set_protocol(pump)  # recv() read all the StreamReader held: nothing is lost
            try:
                pump.data_received(client.trailing_data[0])
                if up_reader.at_eof() or up_reader.exception() is not None:
                    pump.eof_received()  # what the StreamReader heard before the switch
                while not pump.outcome.done():
                    now = time.monotonic()
                    if now - pump.last >= self.idle_timeout:
                        if pump.at_boundary:
                            send(_stalled(self.idle_timeout))
                        return "broken"
                    wait = self.idle_timeout - (now - pump.last)
                    if not pump.streamed:  # prefill: keep the client's idle timer alive
                        quiet = now - max(pump.last, pump.last_keepalive)
                        if quiet >= self.keepalive:
                            send(marker({"keepalive": True}))
                            pump.last_keepalive = now
                            await down.drain()
                            continue
                        wait = min(wait, self.keepalive - quiet)
                    await asyncio.wait({pump.outcome}, timeout=None if wait == float("inf") else max(wait, 0.001))
                return pump.outcome.result()
            finally:
                transport.set_protocol(original)
                pump.close()

        held = bytearray()  # an error or JSON body, kept to be sent as one marker
        while True:
            event = await next_event()
            if event is None:
                return "broken"
            if isinstance(event, h11.Data):
                if stream:
                    await forward(event.data)
                elif len(held) < MAX_ERROR_BODY:
                    held += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if status != 200:
            error = {"status": status, "body": held.decode("utf-8", "replace")}
            if retry_after:
                error["retry_after"] = retry_after.decode("latin-1")
            send(marker({"upstream_error": error}))
        elif not stream:
            send(marker({"upstream_json": held.decode("utf-8", "replace")}))
        done = client.our_state is h11.DONE and client.their_state is h11.DONE
        return "reusable" if done else ("ended" if stream else "broken")


def _stalled(idle_timeout: float) -> bytes:
    return marker({"upstream_error": {"status": 504, "body": json.dumps({"error": {
        "message": f"the upstream sent nothing for {idle_timeout:g} s", "type": "upstream_timeout"}})}})


class _BodyPump(asyncio.Protocol):
    """Stands in for the backend connection's protocol while a chunked stream is forwarded:
    each read is decoded and written to mitmproxy's side at once, as one chunk. ``outcome``
    resolves to "reusable" (the last chunk came, nothing after it, the backend keeps the
    connection), "ended" (complete, but the connection is not to be reused) or "broken"."""

    def __init__(self, sink, down: asyncio.StreamWriter, keep: bool = True) -> None:
        self.sink, self.down, self.keep = sink, down, keep
        self.decoder = ChunkedDecoder()
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.last = self.last_keepalive = time.monotonic()
        self.at_boundary, self.streamed = True, False
        self.transport: asyncio.Transport | None = None
        self._resume: asyncio.Task | None = None

    def data_received(self, data: bytes) -> None:
        if self.outcome.done() or not data:
            return
        self.last = time.monotonic()
        try:
            piece = self.decoder.feed(data)
        except ChunkedError:
            self._end("broken")
            return
        if piece:
            self.sink(piece)
            self.streamed = True
            self.at_boundary = piece.endswith((b"\n\n", b"\r\n\r\n"))
            if self.down.transport.get_write_buffer_size() > 1 << 20 and self._resume is None:
                self._pause()  # a slow client: push back on the backend
        if self.decoder.done:
            self._end("reusable" if self.keep and not self.decoder.extra else "ended")

    def _pause(self) -> None:
        up = self.transport
        if up is None:
            return
        up.pause_reading()

        async def resume() -> None:
            try:
                await self.down.drain()
            except ConnectionError:
                pass  # the client went away: the exchange is being torn down anyway
            finally:
                self._resume = None
                if not up.is_closing():
                    up.resume_reading()

        self._resume = asyncio.ensure_future(resume())

    def eof_received(self) -> bool:
        self._end("broken")  # closed before the last chunk
        return False

    def connection_lost(self, exc) -> None:
        self._end("broken")

    def _end(self, outcome: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    def close(self) -> None:
        self._end("broken")
        if self._resume is not None:
            self._resume.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()  # a pooled connection must read again (a no-op unless paused)


def _round_end(result) -> bytes:
    """Close a round that failed or was cut: its finish reason if it had one, else nothing
    (the translator then reports the stream as cut short)."""
    return searchloop.final_chunks(result.finish_reason, []) if result.finish_reason else b""


async def _get(url, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: list) -> tuple[int, bytes]:
    client = h11.Connection(h11.CLIENT)
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    writer.write(client.send(h11.Request(method="GET", target=target, headers=[
        (b"host", url.netloc.encode()), (b"connection", b"close"), *headers])))
    writer.write(client.send(h11.EndOfMessage()))
    status, body = 0, bytearray()
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await reader.read(READ))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, bytes(body)


async def _read_message(conn: h11.Connection, reader: asyncio.StreamReader):
    """One request and its whole body from mitmproxy; (None, b"") at EOF."""
    request, body = None, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(READ)
            conn.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""
