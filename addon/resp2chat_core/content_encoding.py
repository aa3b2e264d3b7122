"""Compressed request bodies (``content-encoding: gzip | deflate | zstd | br``), decoded with a bound.

Rules of this file:
- Bounded. The decoded size is checked while decoding, never after: a small body that inflates
  past ``limit`` (a zip bomb) stops with ``TooLarge`` once ``limit + 1`` bytes came out, so memory
  stays at the limit whatever the ratio. Each decoder is asked for at most what is left.
- Strict. A body that is not what its header says (corrupt, truncated, trailing garbage) is
  ``BadBody``; an encoding this gateway cannot decode is ``Unsupported``. Nothing is guessed.

Codex compresses its request bodies with zstd (feature ``enable_request_compression``) when it
talks to OpenAI with a ChatGPT login; other clients and proxies use gzip or deflate. Several
encodings (``gzip, zstd``) were applied in order, so they are undone in reverse.
"""

from __future__ import annotations

import zlib

try:  # Python >= 3.14
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:  # mitmproxy depends on the backport
    from backports import zstd as _zstd  # type: ignore[no-redef]

import brotli  # a mitmproxy dependency

_STEP = 1 << 16  # input handed to a decoder at a time


class DecodeError(ValueError):
    """Base of the three outcomes that refuse a body."""


class TooLarge(DecodeError):
    pass


class Unsupported(DecodeError):
    pass


class BadBody(DecodeError):
    pass


def codings(header: str) -> list[str]:
    """The codings a ``content-encoding`` value names, in the order they were applied
    (``identity`` dropped)."""
    names = [c.strip().lower() for c in header.split(",")]
    return [c for c in names if c and c != "identity"]


def decode(body: bytes, header: str, limit: int) -> bytes:
    """``body`` with every coding of ``header`` undone; at most ``limit`` bytes."""
    for coding in reversed(codings(header)):
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise Unsupported(coding)
        body = decoder(body, limit)
    return body


class _Out:
    __slots__ = ("parts", "size", "limit")

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size, self.limit = 0, limit

    @property
    def room(self) -> int:
        return self.limit + 1 - self.size  # one byte past the limit proves it is exceeded

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge()
        self.parts.append(data)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _zlib(body: bytes, limit: int, wbits: int, name: str) -> bytes:
    """gzip (several members may follow each other) or deflate."""
    out = _Out(limit)
    rest = body
    while True:
        d = zlib.decompressobj(wbits)
        data = rest
        try:
            while True:
                out.add(d.decompress(data, out.room))
                data = d.unconsumed_tail
                if d.eof or not data:
                    break
            if not d.eof:
                out.add(d.flush(out.room))
        except zlib.error as exc:
            raise BadBody(f"not valid {name}: {exc}") from None
        if not d.eof:
            raise BadBody(f"not valid {name}: truncated")
        rest = d.unused_data
        if not rest or wbits != 31:
            break
    if rest:
        raise BadBody(f"not valid {name}: data after the end")
    return out.bytes()


def _gzip(body: bytes, limit: int) -> bytes:
    return _zlib(body, limit, 31, "gzip")


def _deflate(body: bytes, limit: int) -> bytes:
    # HTTP's "deflate" is the zlib format; some clients send raw deflate: the header tells.
    zlib_header = len(body) >= 2 and body[0] & 0x0F == 8 and ((body[0] << 8) | body[1]) % 31 == 0
    return _zlib(body, limit, 15 if zlib_header else -15, "deflate")


def _zstd_frames(body: bytes, limit: int) -> bytes:
    out = _Out(limit)
    pos = 0
    try:
        while pos < len(body):  # one frame after another
            d = _zstd.ZstdDecompressor()
            while True:
                chunk = body[pos:pos + _STEP]
                pos += len(chunk)
                out.add(d.decompress(chunk, out.room))
                while not d.eof and not d.needs_input:  # output held back by the bound
                    out.add(d.decompress(b"", out.room))
                if d.eof:
                    pos -= len(d.unused_data)
                    break
                if pos >= len(body):
                    raise BadBody("not valid zstd: truncated")
    except _zstd.ZstdError as exc:
        raise BadBody(f"not valid zstd: {exc}") from None
    return out.bytes()


def _brotli(body: bytes, limit: int) -> bytes:
    out = _Out(limit)
    d = brotli.Decompressor()
    try:
        for i in range(0, len(body), _STEP):
            if d.is_finished():
                raise BadBody("not valid br: data after the end")
            out.add(d.process(body[i:i + _STEP], output_buffer_limit=out.room))
            while not d.can_accept_more_data():
                out.add(d.process(b"", output_buffer_limit=out.room))
    except brotli.error as exc:
        raise BadBody(f"not valid br: {exc}") from None
    if not d.is_finished():
        raise BadBody("not valid br: truncated")
    return out.bytes()


_DECODERS = {"gzip": _gzip, "x-gzip": _gzip, "deflate": _deflate, "zstd": _zstd_frames, "br": _brotli}
SUPPORTED = tuple(sorted(_DECODERS))
