"""SSEParser: the incremental WHATWG-style event parser the translator reads upstream with."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resp2chat_core.sse import Progress, SSEParser


def parse(*pieces: bytes) -> tuple[list[str], SSEParser]:
    p = SSEParser()
    out: list[str] = []
    for piece in pieces:
        out += p.feed(piece)
    out += p.finish()
    return out, p


def events(*pieces: bytes) -> list[str]:
    return parse(*pieces)[0]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol):
    raw = b"data: one" + eol + eol + b"data: two" + eol + eol
    assert events(raw) == ["one", "two"]


def test_feed_returns_only_completed_events():
    p = SSEParser()
    assert p.feed(b"data: a\n") == []
    assert p.feed(b"\ndata: b") == ["a"]
    assert p.feed(b"\n") == []
    assert p.feed(b"\n") == ["b"]
    assert p.finish() == []


def test_crlf_split_between_feeds():
    # "\r" ends one read, "\n" starts the next: one line ending, not two
    assert events(b"data: a\r", b"\ndata: b\r\n\r\n") == ["a\nb"]
    assert events(b"data: a\r\n\r", b"\n") == ["a"]


def test_lone_cr_then_next_line_in_next_feed():
    assert events(b"data: a\r", b"data: b\r\r") == ["a\nb"]


def test_empty_feed_between_cr_and_lf():
    # feed(b"") is a valid call; it must not forget that a CR is waiting for its LF
    assert events(b"data: a\r", b"", b"\ndata: b\n\n") == ["a\nb"]


def test_multiline_data_joined_by_lf():
    assert events(b"data: {\"a\":\ndata: 1}\n\n") == ['{"a":\n1}']


def test_comments_counted_and_not_returned():
    out, p = parse(b": PROCESSING\n\n:keep-alive\ndata: x\n\n: bye\n\n")
    assert out == ["x"]
    assert p.comments == 3


def test_event_id_retry_fields_ignored():
    assert events(b"event: message\nid: 7\nretry: 100\ndata: x\n\nevent: ping\n\n") == ["x"]


def test_data_without_space_and_extra_spaces():
    assert events(b"data:x\n\ndata:  y\n\n") == ["x", " y"]


def test_empty_data_line_is_an_event():
    assert events(b"data:\n\n") == [""]


def test_trailing_event_without_blank_line_returned_by_finish():
    p = SSEParser()
    assert p.feed(b"data: a\n\ndata: [DONE]") == ["a"]
    assert p.finish() == ["[DONE]"]
    p = SSEParser()
    assert p.feed(b"data: last\n") == []
    assert p.finish() == ["last"]


def test_utf8_char_split_across_feeds():
    raw = "data: héllo 世界 🎉\n\n".encode()
    star = raw.index("🎉".encode())
    cut = raw.index("世".encode()) + 1
    assert events(raw[:cut], raw[cut:star + 2], raw[star + 2:]) == ["héllo 世界 🎉"]


def test_finish_on_empty_stream():
    assert events() == []
    assert events(b"") == []


# --- property: any split of any encoding parses the same -----------------------------------

_value = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
_event = st.lists(_value, min_size=1, max_size=4)  # the data lines of one event
_stream = st.lists(st.tuples(_event, st.booleans()), min_size=0, max_size=6)  # (event, comment before?)


def _encode(stream, eols: list[bytes]) -> bytes:
    """Serialize events; line endings drawn from ``eols`` in turn. A CR followed by an empty
    LF-terminated line would read as one CRLF, so that pairing is avoided (it is not ambiguity
    the parser can resolve)."""
    lines: list[bytes] = []
    for data_lines, comment in stream:
        if comment:
            lines.append(b": ping")
        lines += [b"data: " + v.encode() for v in data_lines]
        lines.append(b"")
    out, prev = [], b""
    for k, line in enumerate(lines):
        eol = eols[k % len(eols)]
        if prev == b"\r" and eol == b"\n" and not line:
            eol = b"\r"
        out.append(line + eol)
        prev = eol
    return b"".join(out)


@settings(max_examples=300, deadline=None)
@given(stream=_stream,
       eols=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1, max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_property_random_splits_match_unsplit_parse(stream, eols, cuts):
    raw = _encode(stream, eols)
    expected = ["\n".join(data_lines) for data_lines, _ in stream]
    whole, p_whole = parse(raw)
    assert whole == expected
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)])]
    split, p_split = parse(*pieces)
    assert split == whole
    assert p_split.comments == p_whole.comments == sum(c for _, c in stream)


# --- bounds: what a backend's stream may make the parser hold -----------------------------------


def test_a_line_without_end_is_refused_past_max_event_and_nothing_is_held():
    p = SSEParser(max_event=1 << 20)
    assert p.feed(b"data: before\n\ndata: ") == ["before"]
    for _ in range(15):
        assert p.feed(b"x" * 65536) == []
    assert not p.oversized  # 15 * 64 KiB + the "data: " so far: under 1 MiB
    assert p.feed(b"x" * 65536 + b"\n\ndata: after\n\n") == []  # the line outgrew the bound
    assert p.oversized and p._tail == b"" and p._more == [] and p._data == []  # nothing of it is kept
    assert p.feed(b"data: more\n\n") == [] and p.finish() == []  # a refused stream is read no further


def test_an_event_of_many_data_lines_without_its_blank_line_is_refused():
    p = SSEParser(max_event=1 << 16)
    out = []
    for _ in range(2000):
        out += p.feed(b"data: " + b"y" * 60 + b"\n")
        if p.oversized:
            break
    assert p.oversized and out == [] and p._data == [] and p._tail == b""


def test_a_long_line_in_one_piece_is_refused_too():
    """The bound does not depend on how the bytes were split: a long comment, a long bare line."""
    for line in (b": " + b"k" * 5000, b"{" + b"1" * 5000 + b"}", b"data: " + b"z" * 5000):
        p = SSEParser(max_event=4096)
        assert p.feed(b"data: ok\n\n" + line + b"\n\ndata: next\n\n") == ["ok"]
        assert p.oversized


def test_under_the_bound_any_split_of_a_long_event_reads_the_same():
    payload = b"w" * 200_000
    raw = b"data: " + payload + b"\n\n"
    p = SSEParser(max_event=1 << 20)
    out = []
    for i in range(0, len(raw), 977):
        out += p.feed(raw[i:i + 977])
    assert out == [payload.decode()] and not p.oversized
    assert SSEParser(max_event=1 << 20).feed(raw) == [payload.decode()]  # (the fast path: one read)


def test_one_read_holding_an_event_over_the_bound_is_refused_on_the_fast_path_too():
    p = SSEParser(max_event=1000)
    assert p.feed(b"data: " + b"a" * 2000 + b"\n\n") == [] and p.oversized


def test_a_long_line_is_accumulated_in_linear_time():
    """64 MiB of one line in 4 KiB reads: kept as pieces and joined once. Copying the held part
    again at every read (the old ``tail + chunk``) is ~500 GB of copying for this: hours."""
    import time

    p = SSEParser(max_event=128 << 20)
    piece = b"q" * 4096
    assert p.feed(b"data: ") == []
    started = time.monotonic()
    for _ in range(16384):
        p.feed(piece)
        assert time.monotonic() - started < 10, "re-copying what is held at every read"
    [event] = p.feed(b"\n\n")
    assert len(event) == 64 << 20 and time.monotonic() - started < 10


# --- Progress: whether pieces of a stream bring anything but comments (upstream_data_timeout_secs)


def _data_bytes(stream: bytes) -> list[bool]:
    """Per byte of ``stream``: whether it belongs to a line that is not a comment (its end with it)."""
    marks, i = [], 0
    while i < len(stream):
        if stream[i] in b"\r\n":
            marks.append(False)  # a blank line, or the LF of a CRLF
            i += 1
            continue
        end = min((j for j in (stream.find(b"\n", i), stream.find(b"\r", i)) if j >= 0), default=len(stream))
        marks += [stream[i] != ord(":")] * (min(end + 1, len(stream)) - i)
        i = end + 1
    return marks


_line = st.sampled_from([b": keep-alive", b":", b": queued data: 7", b": OPENROUTER PROCESSING", b"data: {\"x\": 1}", b"data: [DONE]",
                         b"event: ping", b"{\"error\": {}}", b"", b"d"])
_eol = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(lines=st.lists(st.tuples(_line, _eol), max_size=12), cuts=st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=400, deadline=None)
def test_progress_is_any_byte_of_a_line_that_is_no_comment(lines, cuts):
    stream = b"".join(line + eol for line, eol in lines)
    marks = _data_bytes(stream)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    progress = Progress()
    for a, b in zip(bounds, bounds[1:]):
        assert progress.feed(stream[a:b]) == any(marks[a:b]), (stream, a, b)


def test_comments_alone_are_no_progress_however_split():
    stream = b": keep-alive\n\n: OPENROUTER PROCESSING\r\n\r\n:\r\r" * 3
    for size in range(1, len(stream) + 1):
        progress = Progress()
        assert not any(progress.feed(stream[i:i + size]) for i in range(0, len(stream), size))
    progress = Progress()
    assert not progress.feed(b": keep-alive\n\n: still") and progress.feed(b" queued\n\ndata: {}\n\n")


@given(lines=st.lists(st.tuples(_line, _eol), max_size=12), cuts=st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=400, deadline=None)
def test_comments_dropped_before_the_first_data_leave_the_same_events(lines, cuts):
    """The relay keeps the comments a backend sends before its first data out of the turn's
    stream (relay/upstream.py ``_Watch.heard``: they answer nothing, and the call may still give
    way to the next upstream): what it passes on parses to the same events as the whole stream,
    however the pieces are cut (a comment cut off by a dropped piece is made whole)."""
    from resp2chat_io.relay.upstream import _Watch
    stream = b"".join(line + eol for line, eol in lines)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    watch = _Watch(60.0, 15.0, None)
    passed = [watch.heard(stream[a:b]) for a, b in zip(bounds, bounds[1:])]
    whole, relayed = SSEParser(), SSEParser()
    assert relayed.feed(b"".join(passed)) == whole.feed(stream), (stream, bounds, passed)
    marks = _data_bytes(stream)
    first = marks.index(True) if True in marks else len(stream)
    assert not any(passed[:next((i for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > first), len(passed))])


def test_a_comment_cut_off_by_a_dropped_piece_stays_a_comment():
    from resp2chat_io.relay.upstream import _Watch
    watch = _Watch(60.0, 15.0, None)
    passed = [watch.heard(b": queued "), watch.heard(b"data: 7\r\ndata: {}\r\n\r\n")]
    assert passed[0] == b"" and SSEParser().feed(b"".join(passed)) == ["{}"]
