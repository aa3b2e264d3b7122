"""One narrow patch of mitmproxy 12's WebSocket layer: a client's message is bounded while it
arrives, and gathering its pieces costs linear time.

Why. mitmproxy sits between the client and the relay (relay/websocket.py) and reads a whole
client message into its WebSocket layer before any addon hook sees it
(``mitmproxy/proxy/layers/websocket.py``, ``WebsocketLayer.relay_messages``: each piece wsproto
hands out is appended to ``src_ws.frame_buf[-1]``, and wsproto itself has no size limit). So a
client could make the gateway hold a message of any size before ``max_request_body_mb`` could
refuse it, and, as ``bytes += piece`` copies the message so far at every read, spend seconds
of mitmproxy's only event loop on it (a 40 MB message: ~9 s). No hook chooses that layer
(mitmproxy's HTTP layer makes a ``WebsocketLayer`` directly), but ``WebsocketLayer.start`` looks
``WebsocketConnection`` up in its module when a socket opens: that class is the one place to act.

What. ``install()`` (once; calling it again changes nothing) puts ``BoundedConnection``, a
subclass, in place of ``mitmproxy.proxy.layers.websocket.WebsocketConnection``. It changes two
things and nothing else (messages, hooks, pings and the close handshake stay mitmproxy's):

- The client's side (the connection on which mitmproxy is the server): once the message in
  progress holds more than ``limit`` bytes (``max_request_body_mb``, set by the WebSocket addon
  at ``configure``), what it held is dropped, the rest of it is read and dropped as it comes
  (the layer never sees it: no hook, nothing forwarded, nothing recorded), and ``refused`` is
  called at once with the client's connection: the WebSocket addon answers the client with the
  ``error`` message an oversized message gets (413 ``request_too_large``), so the client hears
  it while it is still sending, and the socket goes on. A message in more than
  ``MAX_FRAGMENTS`` frames (no client sends that; each frame costs memory of its own) ends the
  socket instead: a close with code 1009, as wsproto's own events end with one on a protocol
  error (the layer sends it to both sides and closes them).
- Both sides: ``frame_buf`` holds bytearrays, so the layer's ``frame_buf[-1] += piece`` grows the
  message in place instead of copying it at every read.

And one guard on mitmproxy's connection handler, for a close the gateway starts (the one above,
the relay's, or addons/head_deadline.py's): the layer asks to close the client's connection while mitmproxy is still
handling that client's data, so the handler
task cancels itself, and the cancellation lands on the handler's next wait, which may be one
that does not expect it (taking the event lock for the client's further data, buffered while it
kept sending): the handler then ends without closing the client's socket, which stays open, its
buffers full, until the garbage collector finds it (mitmproxy#5034 is the same kind of bug at
another wait). ``_closing_handler`` wraps ``ConnectionHandler.handle_connection``: when it ends
and its connection's writer is still open, the writer is closed (what the handler's own last
lines do). It does nothing in any other case.

Checked against mitmproxy 12.3 (tests/test_security_memory.py drives real sockets through it,
tests/test_websocket.py and the Codex tests use it throughout): ``install`` refuses to patch a
layer module that no longer has the class it replaces.
"""

from __future__ import annotations

from wsproto.events import CloseConnection, Message

from mitmproxy.proxy import server as _server
from mitmproxy.proxy.layers import websocket as _layer

MAX_FRAGMENTS = 1 << 14  # frames of one client message (4 KB frames: 64 MB; 1-byte frames cost ~60 bytes each)
limit = 32 << 20  # bytes of one client message: max_request_body_mb (addons/websocket.py sets it)
refused = None  # called with the client's connection when one of its messages passes ``limit`` (addons/websocket.py)


class _Frames(list):
    """``frame_buf``: the frames of the message in progress, each a bytearray (appended to in
    place), and ``size``, the bytes they hold (the layer only ever grows the last one)."""

    def __init__(self, frames=()) -> None:
        super().__init__(bytearray(f) for f in frames)
        self.size = sum(len(f) for f in self)
        self._last = len(self[-1]) if self else 0

    def append(self, frame) -> None:
        super().append(bytearray(frame))
        self.size += len(frame)
        self._last = len(frame)

    def __setitem__(self, index, frame) -> None:  # frame_buf[-1] += piece: the last frame grew
        super().__setitem__(index, frame)
        self.size += len(frame) - self._last
        self._last = len(frame)


class BoundedConnection(_layer.WebsocketConnection):
    """mitmproxy's ``WebsocketConnection`` with a bounded client message (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._bounded = not self.client  # wsproto's SERVER side: the client's messages arrive here
        self._dropping = False  # the rest of a refused message is being read and dropped

    @property
    def frame_buf(self) -> _Frames:
        return self._frames

    @frame_buf.setter
    def frame_buf(self, frames) -> None:
        self._frames = _Frames(frames)

    def events(self):
        for event in super().events():
            if self._bounded and isinstance(event, Message):
                if self._dropping:
                    self._dropping = not event.message_finished
                    continue
                if len(self._frames) > MAX_FRAGMENTS:
                    self.frame_buf = [b""]
                    yield CloseConnection(code=1009, reason=f"message too big: more than {MAX_FRAGMENTS} frames")
                    return
                if self._too_big(event):
                    self.frame_buf = [b""]
                    self._dropping = not event.message_finished
                    if refused is not None:
                        refused(self.conn)
                    continue
            yield event

    def _too_big(self, event: Message) -> bool:
        size = self._frames.size
        data = event.data
        if isinstance(data, str):  # (what the layer will append: its UTF-8, 1 to 4 bytes a character)
            grown = len(data) if size + 4 * len(data) <= limit else len(data.encode("utf-8", "surrogatepass"))
        else:
            grown = len(data)
        return size + grown > limit


def _closing_handler(handle_connection):
    async def closing(self, connection):
        try:
            return await handle_connection(self, connection)
        finally:
            io = self.transports.get(connection)
            if io is not None and io.writer is not None and not io.writer.is_closing():
                io.writer.close()  # (the handler ended early: see the module docstring)
                self.transports.pop(connection, None)

    closing.resp2chat = True
    return closing


def install() -> None:
    """Make every WebSocket mitmproxy opens from now on a ``BoundedConnection``, and guard the
    connection handler (once)."""
    current = getattr(_layer, "WebsocketConnection", None)
    if current is BoundedConnection:
        return
    handler = getattr(_server.ConnectionHandler, "handle_connection", None)
    if current is not BoundedConnection.__mro__[1] or handler is None:
        raise RuntimeError("mitmproxy's WebSocket layer changed: resp2chat_io/mitm_websocket.py needs a look")
    _layer.WebsocketConnection = BoundedConnection
    if not getattr(handler, "resp2chat", False):
        _server.ConnectionHandler.handle_connection = _closing_handler(handler)
