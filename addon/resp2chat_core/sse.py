"""Incremental Server-Sent Events parser (the WHATWG rules that chat backends actually exercise).

Bytes arrive in arbitrary pieces: an event, a line, even a CRLF pair may be split between two
socket reads. ``feed`` keeps the unfinished tail and returns only complete events, so any split
of the same bytes yields the same events. Lines end in LF, CRLF or a lone CR; ``data:`` lines of
one event are joined by LF; ``:`` comment lines (OpenRouter's ``: PROCESSING``, DeepSeek's
``: keep-alive``) are counted but not returned; ``event:``/``id:``/``retry:`` are ignored, as Codex
and the openai SDK ignore them for chat streams; a leading byte-order mark is dropped. Work per
call is linear in the new bytes: no re-scan of the buffer, and an unfinished line is kept as the
pieces it came in, joined once when its end arrives (a line that takes many reads is never copied
again at each read).

Bounded: what is held for the event being read (its ``data:`` lines so far and the unfinished
line) never exceeds ``max_event`` bytes (the ``max_upstream_event_mb`` setting; a backend that
sends a line without end, or an event without its blank line, must not grow the gateway). Past
it the parser drops what it held, sets ``oversized`` and reads nothing more: the caller ends the
turn (translator.py: ``response.failed`` with code ``upstream_event_too_large``). Events completed
before are still returned.

One liberty with the spec: a line that is a whole JSON object (``{`` … ``}``) outside any
``data:`` field is returned as a payload of its own. Servers that fail after the stream began
write their error that way (a bare ``{"error": …}`` line), and the spec would silently drop it.
Other lines that are no SSE field at all are kept in ``stray`` (up to 64 KiB) until the reader
sets it to None: a body that was never SSE (a pretty-printed JSON error served as
``text/event-stream``, an HTML error page) can then still be read as a whole.
"""

from __future__ import annotations

import json

# How the gateway's own HTTP Responses stream ends, after its terminal event (the Open Responses
# spec's terminal event; OpenAI's API sends none, and every client in the suite takes it: README).
# Only over HTTP: a WebSocket turn ends with its terminal event's message.
DONE = b"data: [DONE]\n\n"

_BOM = b"\xef\xbb\xbf"
_FIELDS = (b"event:", b"id:", b"retry:")
STRAY_MAX = 1 << 16
MAX_EVENT = 4 << 20  # the default of max_upstream_event_mb (settings.py), in bytes
_SHORT = 4096  # an unfinished line up to this long is extended by copying; a longer one, by keeping pieces


class SSEParser:
    __slots__ = ("_tail", "_more", "_held", "_data", "_data_size", "_pending_cr", "_started", "comments", "stray",
                 "_stray_size", "max_event", "oversized")

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._tail = b""  # an incomplete last line, as the last read with a line end left it
        self._more: list[bytes] = []  # reads without any line end since: the same line, going on
        self._held = 0  # bytes of the incomplete line (tail and more)
        self._data: list[bytes] = []  # data lines of the event being read
        self._data_size = 0
        self._pending_cr = False  # previous piece ended in CR: a LF now belongs to it
        self._started = False  # the first bytes (and a possible BOM) are behind us
        self.comments = 0
        self.stray: list[bytes] | None = []  # non-SSE lines, while the reader wants them
        self._stray_size = 0
        self.max_event = max_event
        self.oversized = False  # an event outgrew max_event: nothing more is read

    def feed(self, chunk: bytes) -> list[str]:
        """Return the data payloads of every event completed by ``chunk``."""
        if not chunk or self.oversized:
            return []
        if not self._started:
            if len(self._tail) + len(chunk) < 3 and _BOM.startswith(self._tail + chunk):
                self._tail += chunk  # too short to tell whether a BOM starts the stream
                self._held = len(self._tail)
                return []
            self._started = True
            chunk, self._tail, self._held = (self._tail + chunk).removeprefix(_BOM), b"", 0
            if not chunk:
                return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = chunk.endswith(b"\r")
        if not self._tail and not self._data and chunk.endswith(b"\n\n") and b"\r" not in chunk \
                and len(chunk) <= self.max_event:
            # Fast path: whole one-line `data:` events, the shape nearly every backend sends.
            parts = chunk[:-2].split(b"\n\n")
            for part in parts:
                if not part.startswith(b"data: ") or b"\n" in part:
                    break
            else:
                return [part[6:].decode("utf-8", "replace") for part in parts]
        if b"\n" not in chunk and b"\r" not in chunk:  # the line goes on
            if self._more or len(self._tail) + len(chunk) > _SHORT:
                self._more.append(chunk)  # kept as it came, joined once the line ends
            else:
                self._tail += chunk  # (a short one: copied, as cheap)
            self._held += len(chunk)
            if self._held + self._data_size > self.max_event:
                self._oversize()
            return []
        if self._more:
            buf = b"".join([self._tail, *self._more, chunk])  # each byte of a long line is copied once, here
            self._more = []
        else:
            buf = self._tail + chunk if self._tail else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._tail = lines.pop()
        self._held = len(self._tail)
        out = self._lines(lines, len(buf) > self.max_event)
        if self._held + self._data_size > self.max_event:
            self._oversize()
        return out

    def finish(self) -> list[str]:
        """End of stream: an event not closed by a blank line still counts (many servers)."""
        if self.oversized:
            return []
        tail = b"".join([self._tail, *self._more]) if self._more else self._tail
        self._tail, self._more, self._held = b"", [], 0
        return self._lines([tail, b""] if tail else [b""], len(tail) > self.max_event)

    def _oversize(self) -> None:
        self.oversized = True
        self._tail, self._more, self._held, self._data, self._data_size = b"", [], 0, [], 0

    def _lines(self, lines: list[bytes], long: bool) -> list[str]:
        """``long``: the lines may hold one longer than ``max_event`` (they came in more bytes)."""
        out: list[str] = []
        data = self._data
        counted = len(data)  # data lines of the event being read whose size is in _data_size
        limit = self.max_event
        for line in lines:
            if not line:
                if data:
                    out.append(b"\n".join(data).decode("utf-8", "replace"))
                    data.clear()
                    self._data_size = counted = 0
            elif long and len(line) > limit:
                self._oversize()  # (a line of any kind, a comment too)
                return out
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
                if long:
                    self._data_size += len(data[-1]) + 1
                    counted += 1
                    if self._data_size > limit:
                        self._oversize()
                        return out
            elif line[0] == 0x3A:  # ":" comment / keep-alive
                self.comments += 1
            elif line[0] == 0x7B and line.rstrip().endswith(b"}"):  # a bare JSON object line
                out.append(line.decode("utf-8", "replace"))
            elif self.stray is not None and not line.startswith(_FIELDS) and self._stray_size < STRAY_MAX:
                self.stray.append(line)
                self._stray_size += len(line) + 1
            # event:, id:, retry: and unknown fields are otherwise ignored
        if len(data) > counted:  # (an event that goes on into the next read: its size so far)
            self._data_size += sum(len(d) for d in data[counted:]) + len(data) - counted
        return out


def _line_end(chunk: bytes, start: int) -> int:
    """Where the first line end (LF or CR) at or after ``start`` is; -1: none."""
    lf, cr = chunk.find(b"\n", start), chunk.find(b"\r", start)
    return lf if cr < 0 else cr if lf < 0 else min(lf, cr)


class Progress:
    """Whether the pieces of an SSE stream bring anything but comments: the relay's test of a
    backend making progress (relay/upstream.py ``_Watch``; the ``upstream_data_timeout_secs``
    setting). A backend may send ``: keep-alive`` comment lines for as long as it likes (OpenRouter
    while a request is queued, DeepSeek while it is busy): they keep the connection alive, but a
    stream of nothing else answers nothing. Any other line (``data:``, an ``event:``, a bare JSON
    error, even a stray line of a body that was never SSE) is progress, and so is any byte of it;
    blank lines and line ends are not. Splits between reads are followed as ``SSEParser`` follows
    them (a line, or a CRLF pair, may be cut anywhere); the work per piece is a find of its last
    line end, and for a piece of comments one find per line."""

    __slots__ = ("_mid", "_comment")

    def __init__(self) -> None:
        self._mid = False  # the last piece ended inside a line…
        self._comment = False  # …that is a comment

    @property
    def in_comment(self) -> bool:
        """The last piece ended inside a comment line."""
        return self._mid and self._comment

    def feed(self, chunk: bytes) -> bool:
        """Whether ``chunk`` holds any byte of a line that is not a comment."""
        if not chunk:
            return False
        mid, comment = self._mid, self._comment
        last = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))  # where the piece's last line starts (after it)
        if last < 0:  # no line end: the line goes on, or one starts
            if not mid:
                self._mid, self._comment = True, chunk[0] == 0x3A
            return not self._comment
        if last == len(chunk) - 1:
            self._mid = False
        else:
            self._mid, self._comment = True, chunk[last + 1] == 0x3A
        i = 0
        if mid:
            if not comment:
                return True  # (the rest of a data line, or its end: the event is complete now)
            i = _line_end(chunk, 0) + 1
        n = len(chunk)
        while i < n:
            c = chunk[i]
            if c == 0x0A or c == 0x0D:
                i += 1
            elif c != 0x3A:
                return True
            else:
                end = _line_end(chunk, i)
                if end < 0:
                    return False
                i = end + 1
        return False


class Opening:
    """The start of a 200 chat stream, held until it answers anything (relay/upstream.py, while
    the next upstream could still answer the turn instead). An empty answer, a stream properly
    ended with no choice in it (``data: [DONE]`` alone, no event at all, chunks with an empty
    ``choices`` such as a usage chunk), is no answer: nothing of it reached the client, so it
    fails as a stream cut before any data does, and the next upstream is asked. The first event
    with a choice, an error object, or anything the translator must judge (not JSON, a stray line
    that is no SSE) begins the answer: ``feed`` then returns all that was held, and from then on
    each piece as it is. Held at most ``limit`` bytes (then it begins: the translator decides)."""

    __slots__ = ("_parser", "_held", "begun", "limit")

    def __init__(self, limit: int = STRAY_MAX) -> None:
        self._parser = SSEParser(limit)
        self._held = bytearray()
        self.begun = False
        self.limit = limit

    def feed(self, piece: bytes) -> bytes:
        """What of ``piece`` (and of what was held) goes on now."""
        if self.begun:
            return piece
        self._held += piece
        if len(self._held) > self.limit or self._answers(self._parser.feed(piece)):
            return self.release()
        return b""

    def release(self) -> bytes:
        """The answer begins (or the caller lets it, the last upstream's): all that was held."""
        self.begun = True
        held, self._held = bytes(self._held), bytearray()
        return held

    def empty(self) -> bool:
        """The stream ended: whether all it held answers nothing (its last event, without the
        blank line that ends it, is read too)."""
        return not self.begun and not self._answers(self._parser.feed(b"\n\n"))

    def _answers(self, payloads: list[str]) -> bool:
        if self._parser.stray or self._parser.oversized:
            return True
        for payload in payloads:
            if payload.strip() == "[DONE]":
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                return True
            if not isinstance(chunk, dict) or chunk.get("choices") or "error" in chunk:
                return True
        return False
