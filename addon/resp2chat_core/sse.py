"""Incremental Server-Sent Events parser (the WHATWG rules that chat backends actually exercise).

Bytes arrive in arbitrary pieces: an event, a line, even a CRLF pair may be split between two
socket reads. ``feed`` keeps the unfinished tail and returns only complete events, so any split
of the same bytes yields the same events. Lines end in LF, CRLF or a lone CR; ``data:`` lines of
one event are joined by LF; ``:`` comment lines (OpenRouter's ``: PROCESSING``) are counted but
not returned; ``event:``/``id:``/``retry:`` are ignored, as Codex and the openai SDK ignore them
for chat streams. Work per call is linear in the new bytes: no re-scan of the buffer.
"""

from __future__ import annotations


class SSEParser:
    __slots__ = ("_tail", "_data", "_pending_cr", "comments")

    def __init__(self) -> None:
        self._tail = b""  # an incomplete last line
        self._data: list[bytes] = []  # data lines of the event being read
        self._pending_cr = False  # previous piece ended in CR: a LF now belongs to it
        self.comments = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Return the data payloads of every event completed by ``chunk``."""
        if not chunk:
            return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = chunk.endswith(b"\r")
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
            # event:, id:, retry: and unknown fields are ignored
        return out
