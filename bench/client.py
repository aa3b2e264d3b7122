"""A lean streaming HTTP/1.1 client over raw asyncio sockets (no HTTP library in the hot loop),
and its WebSocket twin for the Responses WebSocket transport (``WSConn``).

One ``Conn`` is one keep-alive TCP connection with TCP_NODELAY (as Codex's reqwest client has);
``Conn.request`` sends one POST in a single write and reads the streamed answer, timestamping
every SSE event when the read that completed it returned. It understands both sides:

- ``chat``: Chat Completions chunks (the direct and plain-passthrough paths);
- ``responses``: Responses events (resp2chat and codex-relay).

For each answer it keeps what the bench reports (time to the first event and to the first text
token, total time, event counts, delta arrival times) and what it checks: the joined reasoning,
text and tool-argument strings and whether a terminal event arrived.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

_loads = json.loads
_now = time.perf_counter

# A client key the load sends with every request (``run.py --clients N``: the gateway has N
# clients configured, and this is the first one's); empty: none.
AUTH: list[tuple[str, str]] = []

RESPONSES_DELTAS = {
    b"response.output_text.delta": "text",
    b"response.reasoning_summary_text.delta": "reasoning",
    b"response.reasoning_text.delta": "reasoning",
    b"response.function_call_arguments.delta": "args",
}
RESPONSES_TERMINAL = {b"response.completed": True, b"response.failed": False, b"response.incomplete": False}


@dataclass
class Answer:
    t0: float = 0.0
    status: int = 0
    first_event: float | None = None
    first_text: float | None = None  # first text token (output_text.delta / delta.content)
    end: float | None = None
    events: int = 0
    deltas: int = 0
    parts: dict = field(default_factory=lambda: {"reasoning": [], "text": [], "args": []})
    delta_times: list | None = None
    terminal: bool = False  # a completed terminal event ([DONE] / response.completed)
    error: str | None = None
    response_id: str | None = None  # (WSConn: what the next turn continues)

    @property
    def ttft(self) -> float | None:
        return None if self.first_text is None else self.first_text - self.t0

    @property
    def total(self) -> float | None:
        return None if self.end is None else self.end - self.t0

    def lost(self, expect: dict) -> int:
        """Expected deltas (and the terminal event) that did not arrive intact."""
        lost = 0 if self.terminal else 1
        for kind, pieces in expect.items():
            got = "".join(self.parts[kind])
            pos = 0
            for i, piece in enumerate(pieces):
                if got.startswith(piece, pos):
                    pos += len(piece)
                else:
                    lost += len(pieces) - i
                    break
            else:
                if pos != len(got):
                    lost += 1  # extra content: something was corrupted
        return lost


class ProtocolError(Exception):
    pass


class Conn:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None

    async def request(self, path: str, body: bytes, mode: str, *, gaps: bool = False,
                      timeout: float = 120.0) -> Answer:
        if self.writer is None:
            await self.open()
        try:
            return await asyncio.wait_for(self._request(path, body, mode, gaps), timeout)
        except (asyncio.TimeoutError, OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
            self.close()
            ans = Answer()
            ans.error = f"{type(exc).__name__}: {exc}"
            return ans

    async def _request(self, path: str, body: bytes, mode: str, gaps: bool) -> Answer:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in AUTH) +
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        ans = Answer(delta_times=[] if gaps else None)
        reader, writer = self.reader, self.writer
        ans.t0 = _now()
        writer.write(head + body)
        buf = bytearray()
        while (i := buf.find(b"\r\n\r\n")) < 0:
            data = await reader.read(1 << 16)
            if not data:
                raise ProtocolError("connection closed before response headers")
            buf += data
        lines = bytes(buf[:i]).split(b"\r\n")
        del buf[:i + 4]
        ans.status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
        length = int(headers[b"content-length"]) if b"content-length" in headers else None
        keep = headers.get(b"connection") != b"close"
        handle = self._chat_event if mode == "chat" else self._responses_event

        sse = bytearray()  # de-chunked body bytes not yet split into events
        raw = buf  # undecoded bytes of the body
        need = 0  # bytes left in the current chunk
        received = 0
        done = False
        t = _now()
        while True:
            # --- decode what we have
            if chunked:
                while raw:
                    if need > 0:
                        take = min(need, len(raw))
                        sse += raw[:take]
                        del raw[:take]
                        need -= take
                        if need == 0:
                            need = -2  # then the CRLF after the chunk
                        continue
                    if need < 0:
                        if len(raw) < 2:
                            break
                        del raw[:2]
                        need = 0
                        continue
                    j = raw.find(b"\r\n")
                    if j < 0:
                        break
                    size = int(bytes(raw[:j]).split(b";")[0], 16)
                    if size == 0:
                        if raw.find(b"\r\n\r\n", j) < 0:  # the last chunk (and any trailers) ends here
                            break
                        done = True
                        raw.clear()
                        break
                    del raw[:j + 2]
                    need = size
            else:
                received += len(raw)
                sse += raw
                raw.clear()
                if length is not None and received >= length:
                    done = True
            # --- split events
            if sse:
                start = 0
                while (k := sse.find(b"\n\n", start)) >= 0:
                    handle(ans, bytes(sse[start:k]), t)
                    start = k + 2
                if start:
                    del sse[:start]
            if done:
                break
            data = await reader.read(1 << 16)
            t = _now()
            if not data:
                if length is None and not chunked:
                    break  # close-delimited body
                raise ProtocolError("connection closed mid-body")
            raw += data
        if sse.strip():
            handle(ans, bytes(sse), t)
        ans.end = t
        if not keep:
            self.close()
        return ans

    @staticmethod
    def _chat_event(ans: Answer, block: bytes, t: float) -> None:
        ans.events += 1
        if ans.first_event is None:
            ans.first_event = t
        for line in block.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                ans.terminal = True
                continue
            chunk = _loads(data)
            if "error" in chunk:
                ans.error = str(chunk["error"])[:200]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                got = False
                r = delta.get("reasoning_content") or delta.get("reasoning")
                if r:
                    ans.parts["reasoning"].append(r)
                    got = True
                c = delta.get("content")
                if c:
                    ans.parts["text"].append(c)
                    if ans.first_text is None:
                        ans.first_text = t
                    got = True
                for call in delta.get("tool_calls") or ():
                    a = (call.get("function") or {}).get("arguments")
                    if a:
                        ans.parts["args"].append(a)
                        got = True
                if got:
                    ans.deltas += 1
                    if ans.delta_times is not None:
                        ans.delta_times.append(t)

    @staticmethod
    def _responses_event(ans: Answer, block: bytes, t: float) -> None:
        if block.strip() == b"data: [DONE]":  # (the stream's end after its terminal event: not an event)
            return
        ans.events += 1
        if ans.first_event is None:
            ans.first_event = t
        etype = None
        data = None
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                etype = line[6:].strip()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if etype is None and data is not None:  # servers that omit the event: line
            etype = _loads(data).get("type", "").encode()
        kind = RESPONSES_DELTAS.get(etype)
        if kind is not None:
            ans.parts[kind].append(_loads(data)["delta"])
            ans.deltas += 1
            if kind == "text" and ans.first_text is None:
                ans.first_text = t
            if ans.delta_times is not None:
                ans.delta_times.append(t)
        elif etype in RESPONSES_TERMINAL:
            ans.terminal = RESPONSES_TERMINAL[etype]
            if not ans.terminal:
                ans.error = (data or b"")[:300].decode("utf-8", "replace")


class WSConn:
    """One Responses WebSocket (``ws://…/v1/responses``), as Codex uses it: ``turn`` sends a
    ``response.create`` and reads its event messages, timestamped like ``Conn``'s SSE events,
    until the terminal one. wsproto (mitmproxy's dependency) does the framing."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ws = None
        self.pending: list[tuple[bytes, float]] = []

    async def open(self) -> None:
        import wsproto
        import wsproto.events as E

        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.writer.write(self.ws.send(E.Request(host=f"{self.host}:{self.port}", target="/v1/responses",
                                                     extra_headers=[(k.encode(), v.encode()) for k, v in AUTH])))
        while True:
            data = await self.reader.read(1 << 16)
            if not data:
                raise ProtocolError("closed during the upgrade")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, E.AcceptConnection):
                    return
                if isinstance(event, E.RejectConnection):
                    raise ProtocolError(f"upgrade refused: {event.status_code}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None

    async def turn(self, message: dict, timeout: float = 120.0) -> Answer:
        try:
            return await asyncio.wait_for(self._turn(message), timeout)
        except (asyncio.TimeoutError, OSError, ProtocolError) as exc:
            self.close()
            ans = Answer()
            ans.error = f"{type(exc).__name__}: {exc}"
            return ans

    async def _turn(self, message: dict) -> Answer:
        import wsproto.events as E

        ans = Answer(status=200)  # (a turn on the socket: no HTTP status of its own)
        ans.t0 = _now()
        self.writer.write(self.ws.send(E.TextMessage(data=json.dumps(message))))
        parts: list[str] = []
        while True:
            data = await self.reader.read(1 << 16)
            t = _now()
            if not data:
                raise ProtocolError("socket closed mid-turn")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, E.TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        text, parts = "".join(parts), []
                        if self._event(ans, text, t):
                            ans.end = t
                            return ans
                elif isinstance(event, E.CloseConnection):
                    raise ProtocolError("socket closed mid-turn")

    @staticmethod
    def _event(ans: Answer, text: str, t: float) -> bool:
        """One event message; True once it is the turn's last."""
        ans.events += 1
        if ans.first_event is None:
            ans.first_event = t
        event = _loads(text)
        etype = event.get("type", "").encode()
        kind = RESPONSES_DELTAS.get(etype)
        if kind is not None:
            ans.parts[kind].append(event["delta"])
            ans.deltas += 1
            if kind == "text" and ans.first_text is None:
                ans.first_text = t
            return False
        if etype in RESPONSES_TERMINAL:
            ans.terminal = RESPONSES_TERMINAL[etype]
            ans.response_id = event["response"]["id"]
            if not ans.terminal:
                ans.error = text[:300]
            return True
        if etype == b"error":
            ans.error = text[:300]
            return True
        return False
