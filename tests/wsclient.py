"""A small blocking WebSocket client for the Responses WebSocket (tests and bench), on wsproto
(mitmproxy's own dependency): connect, send ``response.create`` messages, read the events of
each turn until its terminal event."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import wsproto
import wsproto.events as E

import helpers

TERMINAL = {*helpers.TERMINAL, "error"}  # a turn's last message on the socket


class Refused(Exception):
    def __init__(self, status: int, body: bytes, headers: dict | None = None):
        super().__init__(f"upgrade refused: {status} {body[:200]!r}")
        self.status, self.body, self.headers = status, body, headers or {}


class WSClient:
    def __init__(self, base_url: str, path: str = "/responses", headers: dict | None = None, timeout: float = 60,
                 tls=None):
        """``tls``: an ``ssl.SSLContext`` (a wss:// gateway)."""
        url = urlsplit(base_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=url.hostname)
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.sock.sendall(self.ws.send(E.Request(host=url.netloc, target=url.path.rstrip("/") + path,
                                                 extra_headers=extra)))
        self.pending: list = []
        self.partial = ""  # a text message wsproto handed over in pieces (a large one), until its last
        self.closed: tuple[int, str] | None = None  # the server's close frame (code, reason), once it came
        try:
            self._upgrade()
        except Refused:
            self.sock.close()  # (a refused upgrade's connection is not kept)
            raise

    def _upgrade(self) -> None:
        refused, body, heads = None, b"", {}
        while True:
            for event in self._read():
                if isinstance(event, E.AcceptConnection):
                    return
                if isinstance(event, E.RejectConnection):
                    refused = event.status_code
                    heads = {k.decode().lower(): v.decode() for k, v in event.headers}
                    if not event.has_body:
                        raise Refused(refused, body, heads)
                elif isinstance(event, E.RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Refused(refused, body, heads)

    def _read(self) -> list:
        data = self.sock.recv(1 << 20)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def send(self, message) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.sock.sendall(self.ws.send(E.TextMessage(data=text)))

    def next_message(self) -> dict | None:
        """The next server message (None once the socket closed: the messages before its close
        frame first)."""
        while not self.pending:
            if self.closed is not None:
                return None
            events = self._read()
            for event in events:
                if isinstance(event, E.TextMessage):
                    self.partial += event.data
                    if event.message_finished:
                        self.pending.append(json.loads(self.partial))
                        self.partial = ""
                elif isinstance(event, E.CloseConnection):
                    self.closed = (event.code, event.reason)
                elif isinstance(event, E.Ping):
                    self.sock.sendall(self.ws.send(event.response()))
        return self.pending.pop(0)

    def events(self) -> list[dict]:
        """One turn's messages, through its terminal event (or an ``error``)."""
        out = []
        while True:
            event = self.next_message()
            if event is None:
                raise ConnectionError(f"socket closed after {out}")
            out.append(event)
            if event.get("type") in TERMINAL:
                return helpers.check_spec(out)  # (every message as the Open Responses spec requires)

    def turn(self, message) -> list[dict]:
        self.send(message)
        return self.events()

    def ping(self, payload: bytes = b"hi") -> None:
        self.sock.sendall(self.ws.send(E.Ping(payload=payload)))

    def close(self) -> None:
        try:
            self.sock.sendall(self.ws.send(E.CloseConnection(code=1000)))
            self._read()
        except OSError:
            pass
        finally:
            self.sock.close()


def opened(base_url: str, headers: dict | None = None, within: float = 10) -> WSClient:
    """A socket, once the gateway has room for it (its ``max_sockets``, ``max_websockets``): a
    socket its client closed stops counting once the gateway has seen it end, a moment later."""
    def attempt() -> WSClient | None:
        try:
            return WSClient(base_url, headers=headers)
        except Refused:
            return None
    return helpers.wait_until(attempt, within, "room for a socket")


def refused_upgrade(base_url: str, headers: dict | None = None) -> Refused:
    """The refusal of an upgrade that must be refused (an AssertionError if it was taken)."""
    try:
        sock = WSClient(base_url, headers=headers)
    except Refused as refused:
        return refused
    sock.close()
    raise AssertionError("the upgrade was taken")
