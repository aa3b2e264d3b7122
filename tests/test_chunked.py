"""ChunkedDecoder: the relay's decoder of a backend's chunked body, checked against h11's."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resp2chat_core.chunked import ChunkedDecoder, ChunkedError


def frame(pieces: list[bytes], tail: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + tail


def decode(*reads: bytes) -> tuple[bytes, ChunkedDecoder]:
    d = ChunkedDecoder()
    return b"".join(d.feed(r) for r in reads), d


def h11_decode(raw: bytes) -> bytes:
    """The reference: h11 reading the same body after a response head."""
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    c.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + raw)
    out = b""
    while not isinstance(event := c.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            out += event.data
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20), st.data())
def test_any_split_decodes_like_h11(pieces, data):
    raw = frame(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    reads = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    body, d = decode(*reads)
    assert body == b"".join(pieces) == h11_decode(raw)
    assert d.done and d.extra == b""


def test_one_read_of_many_chunks_is_one_piece():
    d = ChunkedDecoder()
    assert d.feed(frame([b"data: a\n\n", b"data: b\n\n"], tail=b"")) == b"data: a\n\ndata: b\n\n"
    assert not d.done


def test_extensions_trailers_and_what_follows():
    raw = b"5;name=value\r\nhello\r\n0\r\nx-checksum: 1\r\n\r\nHTTP/1.1 200 OK"
    body, d = decode(raw)
    assert body == b"hello" and d.done and d.extra == b"HTTP/1.1 200 OK"
    assert d.feed(b"more") == b"" and d.extra.endswith(b"more")


def test_upper_case_hex_and_whitespace_before_extension():
    assert decode(b"A \r\n0123456789\r\n0\r\n\r\n")[0] == b"0123456789"


@pytest.mark.parametrize("raw", [
    b"zz\r\nhello\r\n",  # not hex
    b"0x5\r\nhello\r\n",  # int(..., 16) would accept it
    b"-5\r\nhello\r\n",
    b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the data
    b"\r\nhello\r\n",  # empty size line
])
def test_bad_framing_is_an_error(raw):
    with pytest.raises(ChunkedError):
        decode(raw)


def test_endless_size_line_is_an_error():
    d = ChunkedDecoder()
    with pytest.raises(ChunkedError):
        for _ in range(10):
            d.feed(b"f" * 1000)


def test_incomplete_body_is_not_done():
    body, d = decode(b"5\r\nhel")
    assert body == b"hel" and not d.done
    assert d.feed(b"lo\r\n") == b"lo" and not d.done


@pytest.mark.parametrize("tail", [b"0\r\n\n", b"0\r\nx-a: 1\n\n", b"0\r\nx-a: 1\r\n\n", b"0\r\n\r\n"])
def test_bare_lf_ends_the_trailer_section_as_in_h11(tail):
    raw = b"5\r\nhello\r\n" + tail
    body, d = decode(raw)
    assert body == b"hello" == h11_decode(raw) and d.done and d.extra == b""


@pytest.mark.parametrize("raw", [b"5\r\nhello\r\n0\r\nbad line\r\n\r\n", b"5\r\nhello\r\n0\r\n: x\r\n\r\n",
                                 b"5\r\nhello\r\n0\r\n folded: x\r\n\r\n"])
def test_malformed_trailer_is_an_error(raw):
    with pytest.raises(ChunkedError):
        decode(raw)


def test_long_lines_fail_however_the_reads_are_split():
    raw = b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n"
    for cut in (0, 3, 2000, len(raw) - 1):
        with pytest.raises(ChunkedError):
            decode(raw[:cut], raw[cut:])
    assert decode(b"00000000000000000005\r\nhello\r\n0\r\n\r\n")[0] == b"hello"  # h11 takes 20 digits too


def test_an_endless_trailer_section_is_an_error():
    """Trailers are dropped as they are read, but a finished body must not go on for ever."""
    from resp2chat_core.chunked import MAX_TRAILERS

    d = ChunkedDecoder()
    assert d.feed(b"2\r\nok\r\n0\r\n") == b"ok"
    with pytest.raises(ChunkedError, match="trailer section too long"):
        for _ in range(MAX_TRAILERS // 20 + 1):
            d.feed(b"x-trailer: 12345678\r\n")
    assert not d.done
