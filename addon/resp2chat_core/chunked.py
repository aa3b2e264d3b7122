"""HTTP/1.1 chunked transfer coding, decoded incrementally: ``feed(bytes) -> body bytes``.

Why not h11, which the relay uses for everything else: the relay forwards a backend's stream to
mitmproxy as one chunk per socket read, so it must strip the backend's framing. h11 does that
through its whole connection state machine, one event object per chunk (~10 µs each), and a
fast backend packs a hundred chunks into one read: the relay then held the first token back
for a millisecond while it decoded the rest. This decoder is a ``find`` and a slice per chunk.

Strict where it matters (a bad size line or a missing CRLF is an error, never a guess); chunk
extensions and trailers are read and dropped. ``done`` turns true after the last chunk and its
trailers; bytes after them (a pipelined response nobody asked for) are in ``extra``.
"""

from __future__ import annotations

import re

_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
MAX_LINE = 4096  # a size line or trailer longer than this is no chunked body


class ChunkedError(ValueError):
    pass


class ChunkedDecoder:
    __slots__ = ("done", "extra", "_buf", "_need", "_crlf", "_trailers")

    def __init__(self) -> None:
        self.done = False
        self.extra = b""
        self._buf = b""  # undecoded bytes: part of a size line, trailer or CRLF
        self._need = 0  # data bytes of the current chunk still to come
        self._crlf = False  # the CRLF after a chunk's data is due
        self._trailers = False  # after the last chunk: trailer lines until an empty one

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.extra += data
            return b""
        buf = self._buf + data if self._buf else data
        out = []
        pos, end = 0, len(buf)
        while pos < end:
            if self._need:
                take = min(self._need, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._need -= take
                self._crlf = not self._need
                continue
            if self._crlf:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkedError("chunk data not followed by CRLF")
                pos += 2
                self._crlf = False
                continue
            j = buf.find(b"\r\n", pos)
            if j < 0:
                if end - pos > MAX_LINE:
                    raise ChunkedError("chunk size line too long")
                break
            if self._trailers:
                if j == pos:  # the empty line: the body is complete
                    self.done = True
                    self.extra = buf[j + 2:]
                    pos = end
                    break
                pos = j + 2
                continue
            m = _SIZE.fullmatch(buf, pos, j)
            if m is None:
                raise ChunkedError(f"bad chunk size line {bytes(buf[pos:j])[:40]!r}")
            size = int(m[1], 16)
            pos = j + 2
            if size:
                self._need = size
            else:
                self._trailers = True
        self._buf = buf[pos:] if pos < end else b""
        return out[0] if len(out) == 1 else b"".join(out)
