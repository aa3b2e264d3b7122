"""Incremental Server-Sent Events parser (the WHATWG rules that chat backends actually exercise).

Bytes arrive in arbitrary pieces: an event, a line, even a CRLF pair may be split between two
socket reads. ``feed`` keeps the unfinished tail and returns only complete events, so any split
of the same bytes yields the same events. Lines end in LF, CRLF or a lone CR; ``data:`` lines of
one event are joined by LF; ``:`` comment lines (OpenRouter's ``: PROCESSING``, DeepSeek's
``: keep-alive``) are counted but not returned; ``event:``/``id:``/``retry:`` are ignored, as Codex
and the openai SDK ignore them for chat streams; a leading byte-order mark is dropped. Work per
call is linear in the new bytes: no re-scan of the buffer.

One liberty with the spec: a line that is a whole JSON object (``{`` … ``}``) outside any
``data:`` field is returned as a payload of its own. Servers that fail after the stream began
write their error that way (a bare ``{"error": …}`` line), and the spec would silently drop it.
Other lines that are no SSE field at all are kept in ``stray`` (up to 64 KiB) until the reader
sets it to None: a body that was never SSE (a pretty-printed JSON error served as
``text/event-stream``, an HTML error page) can then still be read as a whole.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"
_FIELDS = (b"event:", b"id:", b"retry:")
STRAY_MAX = 1 << 16


class SSEParser:
    __slots__ = ("_tail", "_data", "_pending_cr", "_started", "comments", "stray", "_stray_size")

    def __init__(self) -> None:
        self._tail = b""  # an incomplete last line
        self._data: list[bytes] = []  # data lines of the event being read
        self._pending_cr = False  # previous piece ended in CR: a LF now belongs to it
        self._started = False  # the first bytes (and a possible BOM) are behind us
        self.comments = 0
        self.stray: list[bytes] | None = []  # non-SSE lines, while the reader wants them
        self._stray_size = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Return the data payloads of every event completed by ``chunk``."""
        if not chunk:
            return []
        if not self._started:
            if len(self._tail) + len(chunk) < 3 and _BOM.startswith(self._tail + chunk):
                self._tail += chunk  # too short to tell whether a BOM starts the stream
                return []
            self._started = True
            chunk, self._tail = (self._tail + chunk).removeprefix(_BOM), b""
            if not chunk:
                return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = chunk.endswith(b"\r")
        if not self._tail and not self._data and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            # Fast path: whole one-line `data:` events, the shape nearly every backend sends.
            parts = chunk[:-2].split(b"\n\n")
            for part in parts:
                if not part.startswith(b"data: ") or b"\n" in part:
                    break
            else:
                return [part[6:].decode("utf-8", "replace") for part in parts]
        buf = self._tail + chunk if self._tail else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._tail = lines.pop()
        return self._lines(lines)

    def finish(self) -> list[str]:
        """End of stream: an event not closed by a blank line still counts (many servers)."""
        lines = [self._tail, b""] if self._tail else [b""]
        self._tail = b""
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[str]:
        out: list[str] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(b"\n".join(data).decode("utf-8", "replace"))
                    data.clear()
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[0] == 0x3A:  # ":" comment / keep-alive
                self.comments += 1
            elif line[0] == 0x7B and line.rstrip().endswith(b"}"):  # a bare JSON object line
                out.append(line.decode("utf-8", "replace"))
            elif self.stray is not None and not line.startswith(_FIELDS) and self._stray_size < STRAY_MAX:
                self.stray.append(line)
                self._stray_size += len(line) + 1
            # event:, id:, retry: and unknown fields are otherwise ignored
        return out
