"""The relay's WebSocket side: it terminates the Responses WebSocket that mitmproxy forwards.

Why the relay: an addon cannot answer the upgrade itself. mitmproxy accepts a 101 made by an
addon, but its WebSocket layer then forwards the client's pings and the close handshake to a
server connection that does not exist, and the connection crashes (mitmproxy 12.3). So, like
a turn, a socket takes one in-process hop: the addon registers a ``Socket`` (named by the
flow id, with its own secret compared in constant time), points the upgrade at the relay, and
the relay answers ``101`` and speaks WebSocket with mitmproxy. Every message still passes
through mitmproxy: its websocket hooks, flow files and mitmweb see the whole conversation.

What happens to messages: each complete client message goes, in order and one at a time, to
the socket's ``on_message`` (resp2chat_io/addons/websocket.py), which answers through ``send``
(a list of text messages). Reading goes on meanwhile: pings are answered, and a close frame or
EOF (the client went away) cancels the message being served, and with it the backend call.

How a socket ends: one way, whoever ends it. The read loop returns — at the client's close frame
or EOF, or at the gateway's shutdown (its task cancelled) — and the message being served is
cancelled (the worker), the connection closed; mitmproxy then ends the flow (the addon's
``websocket_end``). The gateway closes a socket itself with ``Socket.close`` (a code, a reason,
its last messages: the addon's, for a key no longer accepted): its last messages and a close
frame go out, nothing more is read into the inbox nor served from it, and the client's answering
close frame (mitmproxy answers at once) ends the read loop as a client's close does;
``CLOSE_WAIT`` seconds without one, the connection is dropped, which ends it the same way.

Bounds: a message larger than the socket's ``max_message`` (``max_request_body_mb``) closes the
socket with 1009; none gets here, as mitmproxy refuses one while it arrives (the addon answers it
with a 413 ``error`` through ``Socket.send``: resp2chat_io/mitm_websocket.py).
Messages waiting behind the one being served are at most ``max_message`` bytes (or ``MAX_QUEUED``
messages): past that the relay stops reading the socket until the worker takes one, and the
backpressure reaches the client through mitmproxy (it stops reading a client whose messages it
cannot pass on). A client that goes away meanwhile is noticed when reading resumes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError, generate_accept_token

from .constants import READ

log = logging.getLogger("resp2chat.relay")

MAX_QUEUED = 16  # client messages waiting behind the one being served, at most
CLOSE_WAIT = 5.0  # seconds the gateway's close frame waits for the client's before the connection is dropped

Send = Callable[[list[str | bytes]], None]  # text messages: str, or UTF-8 bytes (framed as they are)


def text_frame(message: bytes) -> bytes:
    """A whole text message in one frame, from its UTF-8 bytes (what wsproto's ``send`` makes of
    its ``str``: a server's frames are not masked), so bytes the translator encoded are sent
    without a round trip through ``str`` (resp2chat_core/websocket.py ``events``)."""
    n = len(message)
    if n < 126:
        return bytes((0x81, n)) + message
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big") + message
    return b"\x81\x7f" + n.to_bytes(8, "big") + message


@dataclass(eq=False)
class Socket:
    turn_id: str  # the upgrade flow's id: names the socket in mitmproxy's request to the relay
    secret: str  # per socket, random; compared in constant time
    on_message: Callable[[str | bytes, Send], Awaitable[None]]  # serves one client message (text, or binary)
    max_message: int  # bytes (characters of a text message) a client message may have: max_request_body_mb
    send: Send | None = None  # set once the socket is open: the addon answers a message mitmproxy refused with it
    closing: tuple[int, str, list[str | bytes]] | None = None  # (``close``: its code, reason, last messages)
    _close: Callable[[], None] | None = None  # set while the socket is served: sends ``closing`` now

    def close(self, code: int, reason: str, last: list[str | bytes] = ()) -> None:
        """The gateway closes the socket: ``last`` (text messages) then a close frame with
        ``code`` and ``reason``, at once (or as soon as it is open: just after its ``101``). The
        socket then ends as when its client closes it (``serve``). Only the first call counts."""
        if self.closing is None:
            self.closing = (code, reason, list(last))
            if self._close is not None:
                self._close()


async def serve(sock: Socket, request: h11.Request, conn: h11.Connection, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    """Answer the upgrade (claimed by the relay for ``sock``) and run the socket until it closes."""
    key = next((v for n, v in request.headers if n == b"sec-websocket-key"), b"")
    while (event := conn.next_event()) is h11.NEED_DATA:  # the request's end (a GET has no body)
        conn.receive_data(await reader.read(READ))
    if not key or not isinstance(event, h11.EndOfMessage):
        writer.write(conn.send(h11.Response(status_code=400, headers=[(b"content-length", b"0")])))
        return
    writer.write(conn.send(h11.InformationalResponse(status_code=101, headers=[
        (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", generate_accept_token(key))])))
    ws = Connection(ConnectionType.SERVER, trailing_data=conn.trailing_data[0])
    inbox: asyncio.Queue[str | bytes] = asyncio.Queue()
    queued = [0]  # size of the messages in the inbox
    room = asyncio.Event()  # set when the worker takes a message

    def send(texts: list[str | bytes]) -> None:
        if ws.state is ConnectionState.OPEN and not writer.is_closing():
            writer.write(b"".join(text_frame(text) if text.__class__ is bytes else ws.send(TextMessage(data=text))
                                  for text in texts))

    def close() -> None:
        """``sock.closing`` sent; the messages still waiting are dropped, none is read any more."""
        code, reason, last = sock.closing
        send(last)
        if ws.state is ConnectionState.OPEN and not writer.is_closing():
            writer.write(ws.send(CloseConnection(code=code, reason=reason)))
        while not inbox.empty():
            inbox.get_nowait()
        queued[0] = 0
        room.set()
        drop.append(asyncio.get_running_loop().call_later(CLOSE_WAIT, writer.transport.abort))

    drop: list[asyncio.TimerHandle] = []
    sock.send = send
    sock._close = close
    if sock.closing is not None:  # (closed before it opened)
        close()

    async def work() -> None:
        while True:
            message = await inbox.get()
            queued[0] -= len(message)
            room.set()
            try:
                await sock.on_message(message, send)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — a bug of ours: log it, keep the socket
                log.warning(f"resp2chat relay: websocket message failed: {type(exc).__name__}: {exc}", exc_info=exc)

    worker = asyncio.ensure_future(work())
    parts: list[str | bytes] = []
    size = 0
    try:
        while True:
            for event in ws.events():
                if isinstance(event, Message):
                    if sock.closing is not None:
                        continue  # (the gateway closed it: nothing more is served)
                    parts.append(event.data)
                    size += len(event.data)
                    if size > sock.max_message:
                        sock.close(1009, "message too big: larger than max_request_body_mb")
                        return
                    if event.message_finished:
                        # a binary message stays bytes: the addon reads it as strictly as an HTTP body
                        message = b"".join(parts) if isinstance(event, BytesMessage) else "".join(parts)
                        parts, size = [], 0
                        inbox.put_nowait(message)
                        queued[0] += len(message)
                elif isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        writer.write(ws.send(event.response()))
                    return
            await writer.drain()
            while inbox.qsize() >= MAX_QUEUED or (queued[0] and queued[0] >= sock.max_message):  # enough waits: read no more for now
                room.clear()
                await room.wait()
            ws.receive_data(await reader.read(READ) or None)
    except (ConnectionError, LocalProtocolError, RemoteProtocolError):
        pass
    finally:
        sock._close = None
        for timer in drop:
            timer.cancel()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
