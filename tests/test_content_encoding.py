"""resp2chat_core/content_encoding.py: compressed request bodies decoded with a bound."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import brotli
import pytest

from resp2chat_core import content_encoding as ce
from resp2chat_core.content_encoding import _zstd as zstd

BODY = b'{"model":"demo-model","input":"hello"}' * 200
ENCODERS = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstd.compress,
            "br": brotli.compress}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_each_coding_round_trips(name):
    assert ce.decode(ENCODERS[name](BODY), name, len(BODY)) == BODY


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_one_byte_past_the_limit_is_too_large(name):
    with pytest.raises(ce.TooLarge):
        ce.decode(ENCODERS[name](BODY), name, len(BODY) - 1)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_truncated_or_corrupt_is_a_bad_body(name):
    packed = ENCODERS[name](BODY)
    with pytest.raises(ce.BadBody):
        ce.decode(packed[:-6], name, 1 << 20)
    with pytest.raises(ce.BadBody):
        ce.decode(b"\x00garbage, not " + name.encode(), name, 1 << 20)


def test_raw_deflate_and_concatenated_members_and_frames():
    raw = zlib.compressobj(wbits=-15)
    assert ce.decode(raw.compress(BODY) + raw.flush(), "deflate", 1 << 20) == BODY
    assert ce.decode(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 10) == b"abcd"
    assert ce.decode(zstd.compress(b"ab") + zstd.compress(b"cd"), "zstd", 10) == b"abcd"
    with pytest.raises(ce.BadBody):
        ce.decode(zlib.compress(BODY) + b"tail", "deflate", 1 << 20)


def test_stacked_codings_are_undone_in_reverse_and_identity_is_nothing():
    assert ce.decode(gzip.compress(zstd.compress(BODY)), "zstd, gzip", 1 << 20) == BODY
    assert ce.decode(BODY, "identity", 1) == BODY
    assert ce.codings(" Identity , GZIP") == ["gzip"]


def test_unknown_coding_is_unsupported():
    with pytest.raises(ce.Unsupported) as err:
        ce.decode(b"x", "compress", 10)
    assert str(err.value) == "compress"


@pytest.mark.parametrize("name", ["gzip", "zstd", "br"])
def test_a_zip_bomb_stops_at_the_limit_with_bounded_memory(name):
    """64 MiB of zeros packed into a few dozen KB: refused having held about the limit."""
    bomb = ENCODERS[name](b"\0" * (64 << 20))
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ce.TooLarge):
            ce.decode(bomb, name, 4 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"decoding held {peak >> 20} MiB for a 4 MiB limit"
