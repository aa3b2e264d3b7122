"""Background responses (resp2chat_core/background.py, addons/background.py) as properties: a
resume from any ``starting_after`` streams exactly the tail of the run's events (the same
events, the same sequence numbers), while it runs and once it ended, past its end an empty
stream; a bad ``starting_after`` is a 400; a cancellation at any point leaves one answer, the
one a GET and a second cancellation give; the events a running log holds stay bounded.

The core and the running log (``Log``, its ``FeedStream``s) first, with many examples (the log's
bounds made small); then a few examples through a real mitmdump gateway and the scripted
upstream. Found: a ``starting_after`` of digits that are not ASCII (``²``) or of more than 4300
of them was a 500 (``int`` refused what ``str.isdigit`` took), and ``١`` was taken as 1; a
cancellation whose write lost a race (another replica's GET storing the run ``failed``, the run
ending) answered ``cancelled`` while the store kept, and a GET and a second cancel answered,
something else.
"""

from __future__ import annotations

import asyncio
import json
import time

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import iter_sse, parse_sse
from resp2chat_core import background as B
from resp2chat_core.errors import GatewayError
from resp2chat_core.sse import DONE
from resp2chat_io.addons import background as A
from resp2chat_io.relay.server import Feed
from resp2chat_io.store import ResponseStore

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def event(seq: int, pad: int) -> bytes:
    return b"event: response.output_text.delta\ndata: " + json.dumps(
        {"type": "response.output_text.delta", "sequence_number": seq, "delta": "x" * pad}).encode() + b"\n\n"


# --- the core ------------------------------------------------------------------------------------

STARTING_AFTER = st.one_of(st.text(alphabet=st.sampled_from("0123456789²١٣-+. xe"), max_size=6),
                           st.integers(0, 10 ** 30).map(str), st.integers(4200, 4400).map(lambda n: "1" * n))


@settings(max_examples=150, **SETTINGS)
@given(STARTING_AFTER)
def test_starting_after_is_an_ascii_integer_or_a_400(value):
    try:
        n = B.starting_after({"starting_after": value})
    except GatewayError as err:
        assert (err.status, err.param) == (400, "starting_after")
        assert not (value.isascii() and value.isdigit() and len(value) <= 4300), value
    else:
        assert value.isascii() and value.isdigit() and n == int(value)


@settings(max_examples=100, **SETTINGS)
@given(st.lists(st.integers(0, 40), max_size=20), st.integers(-1, 25))
def test_after_is_the_tail(pads, n):
    events = [event(i, p) for i, p in enumerate(pads)]
    assert B.after(b"".join(events), n) == b"".join(events[n + 1:])


# --- the running log -----------------------------------------------------------------------------


@settings(max_examples=150, **SETTINGS)
@given(st.data())
def test_a_running_log_streams_each_resume_its_tail_and_stays_bounded(monkeypatch, data):
    """Events come in chunks; resumes come at any point from any ``starting_after`` (refused
    only when the event after it went from the log's front), their clients read at any pace:
    each gets the tail after its ``starting_after`` and ``[DONE]``, or, one that fell ``LAG``
    behind, a front of it and the ``stream_lagged`` error numbered after it. The log holds about
    ``LIVE`` bytes, or what a feed not cut yet has not taken (``LAG`` and one chunk)."""
    monkeypatch.setattr(A, "LIVE", 4000)
    monkeypatch.setattr(A, "LAG", 8000)
    pads = data.draw(st.lists(st.integers(0, 1500), min_size=1, max_size=40))
    events = [event(i, p) for i, p in enumerate(pads)]
    chunks, i = [], 0
    while i < len(events):
        k = data.draw(st.integers(1, 4))
        chunks.append(b"".join(events[i:i + k]))
        i += k
    log, feeds, held = A.Log(), [], set()
    for chunk in chunks:
        if data.draw(st.booleans()):  # (a resume now)
            n = data.draw(st.integers(-1, len(events) + 2))
            if n < log.gone:
                assert event(n + 1, pads[n + 1]) not in log.sse  # (refused: its next event went)
            else:
                feed = Feed("flow", "secret")
                feed.wake = lambda: None
                log.feeds[feed] = stream = A.FeedStream(log, n, feed)
                feeds.append((stream, n, bytearray()))
        log.add(chunk)
        for stream, _, got in feeds:
            if data.draw(st.booleans()):  # (a tick)
                got += bytes(stream(b".") or b"")
        held.add(len(log.sse))
        assert len(log.sse) <= A.LAG + 2 * len(chunk) + (0 if log.feeds else A.LIVE - A.LAG), len(log.sse)
    log.end()
    whole = b"".join(events)
    for stream, n, got in feeds:
        while not stream.ended:
            got += bytes(stream(b"") or b"")
        tail = B.after(whole, n)
        if b"stream_lagged" in got:
            streamed = parse_sse(bytes(got))
            *kept, error = streamed
            assert bytes(got).startswith(b"".join(event(e["sequence_number"], pads[e["sequence_number"]]) for e in kept))
            assert [e["sequence_number"] for e in kept] == list(range(n + 1, n + 1 + len(kept)))
            assert error["sequence_number"] == n + 1 + len(kept) and got.endswith(DONE)
        else:
            assert bytes(got) == tail + DONE, (n, log.gone)


def test_a_slow_reader_of_a_running_log_is_handed_one_piece_at_a_time():
    """A running log grows while its client reads nothing: each growth asked its feed for a tick,
    and each of its own pieces asked for one more, so ticks piled up in the relay's connection;
    once the client took something, mitmproxy read them all at once and called the stream for each
    with no drain between: the backlog went into the client's write buffer after all (up to
    ``LAG``, the review of the PIECE change). One tick on its way at a time (``FeedStream.poke``):
    however many come, what one burst of ticks hands out is a piece."""
    log, ticks = A.Log(), []
    feed = Feed("flow", "secret")
    feed.wake = lambda: ticks.append(1)
    log.feeds[feed] = stream = A.FeedStream(log, -1, feed)
    ticks.append(1)  # (the one the relay sends as it starts)
    chunk = 100 << 10
    for i in range(40):
        log.add(event(i, chunk))  # (the client reads nothing meanwhile)
    out, burst = bytearray(), len(ticks)
    ticks.clear()
    for _ in range(burst):  # (the client took a little: mitmproxy reads every tick waiting, calling the stream for each)
        out += bytes(stream(b".") or b"")
    assert 0 < len(out) <= A.PIECE + 2 * chunk, len(out)
    assert len(ticks) == 1  # (the next piece's, read once the client took this one)
    while ticks:  # a client that reads gets the rest, in order
        ticks.pop()
        out += bytes(stream(b".") or b"")
    assert bytes(out) == b"".join(event(i, chunk) for i in range(40))


# --- a cancellation racing other writers ---------------------------------------------------------


class Racing:
    """The store addon's ``get`` and ``status`` (its writes passed through) over a real ``ResponseStore``,
    where other replicas write between a read and the write that follows it: after the k-th read (of
    the entry, or of its status alone: a cancellation polls that), ``moves[k]`` (a GET of a dead run
    stores it ``failed``, as ``Store.seen`` does; the run's replica renews it, or ends it, as
    ``_renew`` and ``_end`` do, a cancellation asked making it end ``cancelled``); once they ran
    out, the run ends at the next read (it heeded the cancellation)."""

    def __init__(self, moves: list[str]) -> None:
        self.store, self.moves, self.reads = ResponseStore(ttl=3600, max_entries=100, max_bytes=1 << 20), moves, 0

    async def get(self, response_id: str, owner: str):
        entry = await self.store.get(response_id, owner=owner)
        await self._race(response_id, owner, entry)
        return entry

    async def status(self, response_id: str, owner: str):
        brief = await self.store.status(response_id, owner=owner)
        await self._race(response_id, owner, await self.store.get(response_id, owner=owner))
        return brief

    async def _race(self, response_id: str, owner: str, entry) -> None:
        """What the other replicas write after a read (of the entry, or of its status alone)."""
        move = self.moves[self.reads] if self.reads < len(self.moves) else "ends"
        self.reads += 1
        if entry is not None and B.is_running(entry["response"]):
            response, now = entry["response"], time.time()
            new = {"seen": B.dead(response) if B.is_dead(response, now) else None,
                   "renews": None if B.is_dead(response, now) else B.running({**response, "status": "in_progress"}, now),
                   "ends": {**B.public(response), "status": "cancelled" if B.cancel_asked(response) else "completed"},
                   "none": None}[move]
            if new is not None:
                await self.store.put(response_id, [], new, owner=owner, expect=entry["version"])

    # (the store's writes, passed through as the store addon's are: what Background writes with)
    async def put_now(self, response_id: str, items: list, response: dict, *, owner: str, expect=None):
        return await self.store.put(response_id, items, response, owner=owner, expect=expect)

    async def renew(self, response_id: str, response: dict, *, owner: str, expect: int, ended: bool = False):
        return await self.store.renew(response_id, response, owner=owner, expect=expect, ended=ended)

    async def delete(self, response_id: str, *, owner: str):
        return await self.store.delete(response_id, owner=owner)


@settings(max_examples=150, **SETTINGS)
@given(st.lists(st.sampled_from(["none", "seen", "renews", "ends"]), max_size=6), st.booleans())
def test_a_cancellation_answers_what_the_store_then_holds(monkeypatch, moves, dead):
    """A cancellation of a run of another replica (alive, or dead: its lease passed), whatever
    the other replicas write meanwhile, answers the response as it ended, as the store keeps it:
    a GET says the same, a second cancellation too."""
    monkeypatch.setattr(A, "POLL", 0)
    racing = Racing(moves)
    queued = {"id": "resp_r", "object": "response", "status": "queued", "background": True, "output": []}
    asyncio.run(racing.store.put("resp_r", [], B.running(queued, time.time() - (100 if dead else 0)), owner=""))
    background = A.Background(None, racing, None)
    answer = asyncio.run(background.cancel("resp_r", ""))
    stored = asyncio.run(racing.store.get("resp_r", owner=""))["response"]
    assert not B.is_running(stored) and answer == B.public(stored), (answer["status"], stored["status"])
    assert asyncio.run(background.cancel("resp_r", "")) == answer


# --- through a real gateway ----------------------------------------------------------------------


def create(gw, words: int, stream: bool):
    """A background response of ``words`` words 20 ms apart: its id, and (created with ``stream``)
    a function reading the rest of its stream: all of it, as its client got it."""
    r = requests.post(f"{gw.base_url}/responses", stream=stream, timeout=30, json={
        "model": "demo-model", "input": f"noreason\nwords: {words}\nslow: 20", "background": True, "stream": stream})
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["id"], None
    raw = bytearray()
    reading = iter_sse(r, into=raw)
    rid = next(reading)["response"]["id"]

    def rest() -> bytes:
        for _ in reading:
            pass
        return bytes(raw)
    return rid, rest


def resume(gw, rid: str, n: int | str, stream: bool = True) -> requests.Response:
    return requests.get(f"{gw.base_url}/responses/{rid}?stream=true" + (f"&starting_after={n}" if n != -1 else ""),
                        stream=stream, timeout=30)


@settings(max_examples=5, **SETTINGS)
@given(st.integers(2, 12), st.lists(st.integers(-1, 40), min_size=1, max_size=3),
       st.sampled_from(["²", "١", "1" * 4301, "-1", "1.5", "", "0x1"]))
def test_a_resume_from_any_sequence_number_is_the_tail(gateway, words, ns, bad):
    """Resumes asked while the run goes on and once it ended, from any ``starting_after`` (past
    the end included): each streams exactly the tail of the creating client's stream, byte for
    byte, and ends; a bad ``starting_after`` is a 400 naming it."""
    rid, rest = create(gateway, words, stream=True)
    live = [(n, resume(gateway, rid, n)) for n in ns]
    raw = rest()
    assert raw.endswith(DONE)
    for when, answers in (("live", live), ("ended", [(n, resume(gateway, rid, n, stream=False)) for n in ns])):
        for n, answer in answers:
            assert answer.status_code == 200 and answer.content == B.after(raw, n) + DONE, (when, n, answer.content[-300:])
    refused = resume(gateway, rid, bad, stream=False)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "starting_after", (bad, refused.text)


@settings(max_examples=5, **SETTINGS)
@given(st.sampled_from([0, 0.02, 0.1, 0.3]), st.booleans(), st.lists(st.integers(-1, 8), max_size=2))
def test_a_cancellation_at_any_point_is_one_answer_and_streams_end(gateway, delay, stream, ns):
    """A cancellation at any point of a run: it answers it ``cancelled`` (or ``completed``, had it
    ended first), as a GET and a second cancellation do; the streams that followed it end, each
    the tail of its events as a resume from the start gives them once it ended."""
    rid, rest = create(gateway, 20, stream)
    followers = [(n, resume(gateway, rid, n)) for n in ns] if stream else []
    time.sleep(delay)
    cancelled = requests.post(f"{gateway.base_url}/responses/{rid}/cancel", timeout=30)
    again = requests.post(f"{gateway.base_url}/responses/{rid}/cancel", timeout=30)
    got = requests.get(f"{gateway.base_url}/responses/{rid}", timeout=30)
    assert cancelled.status_code == again.status_code == got.status_code == 200
    assert cancelled.json()["status"] in ("cancelled", "completed") and cancelled.json() == again.json() == got.json()
    if stream:
        raw = rest()
        assert raw == resume(gateway, rid, -1, stream=False).content and raw.endswith(DONE)
        assert parse_sse(raw)[-1]["type"] == f"response.{cancelled.json()['status']}"
        for n, follower in followers:
            assert follower.content == B.after(raw, n) + DONE, (n, follower.content[-300:])
