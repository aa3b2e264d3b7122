"""HTTP/1.1 chunked transfer coding, decoded incrementally: ``feed(bytes) -> body bytes``.

Why not h11, which the relay uses for everything else: the relay forwards a backend's stream to
mitmproxy as one chunk per socket read, so it must strip the backend's framing. h11 does that
through its whole connection state machine, one event object per chunk (~10 µs each), and a
fast backend packs a hundred chunks into one read: the relay then held the first token back
for a millisecond while it decoded the rest. This decoder is a ``find`` and a slice per chunk.

Strict where it matters (a bad size line, a missing CRLF or a malformed trailer is an error,
never a guess), lenient where h11 is (the trailer section may end its lines with a bare LF);
chunk extensions and trailers are read and dropped; a trailer section longer than
``MAX_TRAILERS`` is an error (a backend must not keep a finished body going with trailers). ``done`` turns true after the last chunk and
its trailers; bytes after them (a pipelined response nobody asked for) are in ``extra``.
"""

from __future__ import annotations

import re

_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})[ \t]*(?:;[^\r\n]*)?")
_HEX = b"0123456789abcdefABCDEF"
_TRAILER = re.compile(rb"[^:\s][^:]*:.*")  # a header field: name, colon, value (no obs-fold)
MAX_LINE = 4096  # a size line or trailer longer than this is no chunked body
MAX_TRAILERS = 16 * MAX_LINE  # the whole trailer section


class ChunkedError(ValueError):
    pass


class ChunkedDecoder:
    __slots__ = ("done", "extra", "_buf", "_need", "_crlf", "_trailers", "_trailer_bytes")

    def __init__(self) -> None:
        self.done = False
        self.extra = b""
        self._buf = b""  # undecoded bytes: part of a size line, trailer or CRLF
        self._need = 0  # data bytes of the current chunk still to come
        self._crlf = False  # the CRLF after a chunk's data is due
        self._trailers = False  # after the last chunk: trailer lines until an empty one
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.extra += data
            return b""
        buf = self._buf + data if self._buf else data
        out = []
        pos, end = 0, len(buf)
        need, crlf = self._need, self._crlf  # (locals in the loop, stored back at the end)
        find, size_line, append = buf.find, _SIZE.fullmatch, out.append
        while pos < end:
            if need:
                take = min(need, end - pos)
                append(buf[pos:pos + take])
                pos += take
                need -= take
                crlf = not need
                continue
            if crlf:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkedError("chunk data not followed by CRLF")
                pos += 2
                crlf = False
                continue
            j = find(b"\n" if self._trailers else b"\r\n", pos)
            if (end if j < 0 else j) - pos > MAX_LINE:  # however the reads were split
                raise ChunkedError("chunk size line or trailer too long")
            if j < 0:
                break
            if self._trailers:
                line = buf[pos:j - 1] if j > pos and buf[j - 1] == 0x0D else buf[pos:j]
                self._trailer_bytes += j + 1 - pos
                if self._trailer_bytes > MAX_TRAILERS:
                    raise ChunkedError("trailer section too long")
                pos = j + 1
                if not line:  # the empty line: the body is complete
                    self.done = True
                    self.extra = buf[pos:]
                    pos = end
                    break
                if _TRAILER.fullmatch(line) is None:
                    raise ChunkedError(f"bad trailer line {bytes(line)[:40]!r}")
                continue
            line = buf[pos:j]
            if line and not line.lstrip(_HEX) and len(line) <= 20:  # hex digits only (nearly always)
                size = int(line, 16)
            else:  # extensions, whitespace, or no size line at all
                m = size_line(line)
                if m is None:
                    raise ChunkedError(f"bad chunk size line {bytes(line)[:40]!r}")
                size = int(m[1], 16)
            pos = j + 2
            if not size:
                self._trailers = True
                continue
            stop = pos + size
            if stop + 2 <= end:  # the whole chunk and its CRLF are here: one step (the common case)
                if not buf.startswith(b"\r\n", stop):
                    raise ChunkedError("chunk data not followed by CRLF")
                append(buf[pos:stop])
                pos = stop + 2
            else:
                need = size
        self._need, self._crlf = need, crlf
        self._buf = buf[pos:] if pos < end else b""
        return out[0] if len(out) == 1 else b"".join(out)
