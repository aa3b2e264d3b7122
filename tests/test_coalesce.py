"""Time-based coalescing (``coalesce_ms``, resp2chat_core/channel.py ``Channel.window``): once a
turn's first tokens are out, deliveries are at most one per window (news that comes sooner waits
for it), so that one mitmproxy pass (HTTP) or one round of messages (WebSocket) carries several
paced tokens. The first token is never held, nor the end of a burst that ends within its first
window; a slow stream never is. A stream that goes on past a held delivery is read once per
window (relay/exchange.py ``_Window``: its socket no longer wakes the loop for each token): its
end, like its tokens, waits at most a window.

The channel's rules alone (sans-I/O, the relay's timer stood in for), the relay's deferred reads
on real sockets, then through a real mitmdump and a backend of the test's own that streams one
token per write, at the test's command.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time

import pytest

from helpers import start_sse, DONE, LocalServer, QuietHandler, chat_event, http_chunk, parse_sse, terminal
from resp2chat_core import settings as S
from resp2chat_core.channel import Accepted, Channel, Keepalive, Reader
from wsclient import WSClient


# --- the channel's rules -----------------------------------------------------------------------


class Timer:
    """The relay's clock and timer stood in for: ``clock`` is now, ``asked`` the delays asked
    for (the test fires ``due`` itself)."""

    def __init__(self, channel: Channel, now: float = 100.0) -> None:
        self.asked: list[float] = []
        self.clock = now
        channel.later = self.asked.append
        channel.now = lambda: self.clock


def _ticks(channel: Channel) -> list[int]:
    ticks = [0]
    channel.wake = lambda: ticks.__setitem__(0, ticks[0] + 1)
    return ticks


def test_once_the_first_tokens_are_out_deliveries_are_a_window_apart():
    ch = Channel()
    ch.window = 0.04
    timer, ticks = Timer(ch), _ticks(ch)
    ch.event(Accepted())
    ch.data(b"data: first\n\n")  # (not started: the response's first events and the first token go at once)
    assert ticks == [1] and timer.asked == []
    assert ch.take() == [Accepted(), b"data: first\n\n"]
    ch.started = True  # (the consumer's Reader sets it when its first events from backend data left)
    timer.clock += 0.01
    ch.data(b"data: 2\n\n")
    assert ticks == [1] and timer.asked == [pytest.approx(0.03)]  # held until a window after the last delivery…
    ch.data(b"data: 3\n\n")
    ch.event(Keepalive())
    assert ticks == [1] and len(timer.asked) == 1  # …and what comes meanwhile rides on it
    timer.clock += 0.03
    ch.due()
    assert ticks == [2] and ch.take() == [b"data: 2\n\n", b"data: 3\n\n", Keepalive()]
    ch.due()  # (a late timer finds nothing held: no tick)
    assert ticks == [2]
    timer.clock += 0.05
    ch.data(b"data: 4\n\n")  # a window after the last delivery: at once (a slow stream is never held)
    assert ticks == [3] and len(timer.asked) == 1
    ch.take()
    timer.clock += 0.001
    ch.data(b"data: 5\n\n")
    assert ticks == [3] and timer.asked[-1] == pytest.approx(0.039)
    ch.flush()  # the relay's work ended: no timer any more; the tick consumer's last call takes it
    ch.wake = None
    ch.due()
    ch.data(b"data: 6\n\n")
    assert ticks == [3] and ch.take() == [b"data: 5\n\n", b"data: 6\n\n"]


def test_without_a_window_or_a_timer_nothing_is_held():
    for window, later in ((0.0, True), (0.04, False)):
        ch = Channel()
        ch.window, ch.started = window, True
        timer, ticks = Timer(ch), _ticks(ch)
        if not later:
            ch.later = None
        ch.data(b"a")
        ch.take()
        ch.data(b"b")
        assert ticks == [2] and timer.asked == []


def test_a_push_consumer_gets_what_was_held_together_and_at_the_end_at_once():
    got: list[list] = []
    ch = Channel(push=got.append)
    ch.window = 0.04
    timer = Timer(ch)
    ch.event(Accepted())
    assert got == [[Accepted()]]
    ch.started = True
    ch.data(b"x")
    ch.data(b"y")
    assert got == [[Accepted()]] and len(timer.asked) == 1
    timer.clock += 0.04
    ch.due()
    assert got == [[Accepted()], [b"x", b"y"]]
    ch.data(b"z")
    ch.flush()  # the end is never held
    assert got[-1] == [b"z"] and ch.later is None
    ch.data(b"after")  # (nothing holds it any more)
    assert got[-1] == [b"after"]


def test_the_reader_says_when_the_first_tokens_left():
    class T:
        done = merge = False

        def feed(self, data: bytes) -> bytes:
            return data if data != b"nothing" else b""

        def accepted(self) -> bytes:
            return b"created"

    ch = Channel()
    reader = Reader(T(), 1 << 20, channel=ch)
    firsts = []
    reader.on_first = lambda: firsts.append(1)
    reader.apply(Accepted())
    reader.apply(b"nothing")  # (backend data that made no events: the role chunk)
    assert not ch.started and firsts == []
    reader.apply(b"token")
    reader.apply(b"token")
    assert ch.started and firsts == [1]
    assert reader.apply_all([b"a", Accepted(), b"b"]) == b"acreatedb"


def test_the_window_is_a_setting_of_at_most_a_second():
    assert S.BY_NAME["coalesce_ms"].default > 0
    S.validate("coalesce_ms", 1000)
    with pytest.raises(S.SettingsError) as err:
        S.validate("coalesce_ms", 1001)
    assert "at most 1000" in err.value.why
    with pytest.raises(S.SettingsError):
        S.coerce(S.BY_NAME["coalesce_ms"], "-5")


# --- through a real gateway --------------------------------------------------------------------


class _Stepped(QuietHandler):
    """A backend streaming one chat event per write, each at the test's command (``steps``:
    bytes to write as one HTTP chunk, ``None`` to end the body; ``pause`` seconds after each
    token write: a model's pace)."""

    steps: queue.Queue = queue.Queue()
    wrote: dict = {}

    peers: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        type(self).peers.append(self.client_address)
        start_sse(self)
        self.wfile.write(http_chunk(chat_event({"role": "assistant", "content": ""})))
        self.wfile.flush()
        while True:
            step = type(self).steps.get(timeout=60)
            if step is None:
                usage = chat_event(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
                type(self).wrote["end"] = time.monotonic()  # (before the write: the client may see it first)
                self.wfile.write(http_chunk(chat_event(finish="stop")) + http_chunk(usage) + http_chunk(DONE)
                                 + b"0\r\n\r\n")
                self.wfile.flush()
                return
            for event in step:
                type(self).wrote[event] = time.monotonic()
                self.wfile.write(http_chunk(event))
                self.wfile.flush()
                time.sleep(0.05)  # (the model's pace: each token its own backend read)


def _token(n: int) -> bytes:
    return chat_event({"content": f"t{n} "})


@pytest.fixture
def stepped():
    _Stepped.steps = queue.Queue()
    _Stepped.wrote = {}
    with LocalServer(_Stepped) as server:
        yield server


def _chunks(gw, body: dict):
    """The gateway's answer to a streamed POST, one HTTP chunk at a time (as each arrives)."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (gw.port, len(data), data))
    f = sock.makefile("rb")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.readline()
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
    try:
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                return
            chunk = f.read(size)
            f.readline()
            yield chunk
    finally:
        f.close()
        sock.close()


def _deltas(chunk: bytes) -> list[str]:
    return [e["delta"] for e in parse_sse(chunk) if e["type"] == "response.output_text.delta"]


@pytest.mark.parametrize("window_ms", [0, 1000])
def test_paced_tokens_share_a_chunk_the_first_token_never_waits_and_the_end_at_most_a_window(stepped,
                                                                                              gateway_factory,
                                                                                              window_ms):
    gw = gateway_factory(stepped.url, "--set", f"resp2chat_coalesce_ms={window_ms}",
                         "--set", "resp2chat_max_replay_entries=0")
    steps = _Stepped.steps
    steps.put([_token(0)])
    chunks = _chunks(gw, {"model": "m", "input": "hi", "stream": True})
    seen: list[list[str]] = []
    raw = b""
    for chunk in chunks:  # the first token, not held (the window is a second long)
        raw += chunk
        if deltas := _deltas(chunk):
            seen.append(deltas)
            break
    assert seen == [["t0 "]]
    assert time.monotonic() - _Stepped.wrote[_token(0)] < 0.5
    steps.put([_token(1), _token(2), _token(3)])  # three backend reads, 50 ms apart
    for chunk in chunks:  # (a hold without a bound would never let t3 out: the backend waits for it)
        raw += chunk
        if deltas := _deltas(chunk):
            seen.append(deltas)
            if deltas[-1] == "t3 ":
                break
    if window_ms:
        assert seen == [["t0 "], ["t1 ", "t2 ", "t3 "]]  # one pass through mitmproxy for the three
    else:
        assert seen == [["t0 "], ["t1 "], ["t2 "], ["t3 "]]
    steps.put(None)
    for chunk in chunks:
        raw += chunk
    # the stream went on past a held delivery: it is read once per window, its end too
    assert time.monotonic() - _Stepped.wrote["end"] < window_ms / 1000 + 0.5
    events = parse_sse(raw)
    assert terminal(events)["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "t0 t1 t2 t3 "


@pytest.mark.parametrize("window_ms", [0, 1000])
def test_over_the_websocket_the_held_tokens_are_one_message(stepped, gateway_factory, window_ms):
    gw = gateway_factory(stepped.url, "--set", f"resp2chat_coalesce_ms={window_ms}",
                         "--set", "resp2chat_max_replay_entries=0")
    steps = _Stepped.steps
    steps.put([_token(0)])
    ws = WSClient(gw.base_url, timeout=30)
    try:
        ws.send({"type": "response.create", "model": "m", "input": "hi"})
        deltas: list[str] = []
        while not deltas:
            event = ws.next_message()
            if event["type"] == "response.output_text.delta":
                deltas.append(event["delta"])
        assert time.monotonic() - _Stepped.wrote[_token(0)] < 0.5
        steps.put([_token(1), _token(2), _token(3)])
        while not deltas[-1].endswith("t3 "):
            event = ws.next_message()
            if event["type"] == "response.output_text.delta":
                deltas.append(event["delta"])
        assert deltas == (["t0 ", "t1 t2 t3 "] if window_ms else ["t0 ", "t1 ", "t2 ", "t3 "])
        steps.put(None)
        while (event := ws.next_message())["type"] not in ("response.completed", "response.failed"):
            pass
        assert event["type"] == "response.completed"
        assert time.monotonic() - _Stepped.wrote["end"] < window_ms / 1000 + 0.5
    finally:
        ws.sock.close()


def test_a_burst_that_ends_within_its_first_window_is_not_held(stepped, gateway_factory):
    """A fast backend (or a short answer): the end comes while the first held delivery waits,
    and takes everything out at once."""
    gw = gateway_factory(stepped.url, "--set", "resp2chat_coalesce_ms=1000",
                         "--set", "resp2chat_max_replay_entries=0")
    steps = _Stepped.steps
    steps.put([_token(0)])
    chunks = _chunks(gw, {"model": "m", "input": "hi", "stream": True})
    raw = b""
    for chunk in chunks:
        raw += chunk
        if _deltas(chunk):
            break
    steps.put([_token(1), _token(2), _token(3)])
    steps.put(None)
    for chunk in chunks:
        raw += chunk
    assert time.monotonic() - _Stepped.wrote["end"] < 0.5  # (the window is a second)
    assert terminal(parse_sse(raw))["type"] == "response.completed"


def test_the_next_answer_on_a_pooled_connection_is_heard_at_once(stepped, gateway_factory):
    """A deferred stream's backend connection goes back to the pool waking the loop for every
    read again: the next turn's head and first token on it are not left in the kernel."""
    gw = gateway_factory(stepped.url, "--set", "resp2chat_coalesce_ms=200",
                         "--set", "resp2chat_max_replay_entries=0")
    steps = _Stepped.steps
    peers = []
    for turn in range(2):
        steps.put([_token(0)])
        chunks = _chunks(gw, {"model": "m", "input": f"hi {turn}", "stream": True})
        for chunk in chunks:
            if _deltas(chunk):
                break
        assert time.monotonic() - _Stepped.wrote[_token(0)] < 0.15  # (less than the window)
        steps.put([_token(n) for n in range(1, 9)])  # 8 tokens 50 ms apart: held deliveries, then deferred
        steps.put(None)
        assert "".join(d for chunk in chunks for d in _deltas(chunk)) == "".join(f"t{n} " for n in range(1, 9))
        peers.append(_Stepped.peers[-1])
    assert peers[0] == peers[1]  # (the second turn went over the pooled connection)


def test_a_deferred_socket_is_read_by_the_timer_and_wakes_the_loop_again_after_listen():
    """The relay's deferred reads (relay/upstream.py ``_BodyPump``) on a real loopback
    connection: deferred, a token does not wake the loop; ``drain`` reads it; past ``listen``
    the next one wakes it."""
    from resp2chat_io.relay import upstream

    async def main():
        got: list[bytes] = []
        server_side: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(lambda r, w: server_side.append(w), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        while not server_side:
            await asyncio.sleep(0.01)
        channel = Channel(push=lambda items: got.extend(items))
        pump = upstream._BodyPump(lambda data: channel.data(data) or True, channel,
                                  upstream._Watch(60.0, 15.0, channel), keep=True)
        pump.transport = writer.transport
        pump.sock = writer.transport.get_extra_info("socket")
        writer.transport.set_protocol(pump)
        backend = server_side[0]
        backend.write(b"5\r\nhello\r\n")
        await asyncio.sleep(0.1)
        assert got == [b"hello"]  # (not deferred: at once)
        assert pump.defer()
        backend.write(b"5\r\nworld\r\n")
        await asyncio.sleep(0.2)
        assert got == [b"hello"]  # the kernel keeps it: the loop was not woken
        assert pump.drain() and got == [b"hello", b"world"]
        assert not pump.drain()  # (nothing more there)
        backend.write(b"1\r\n!\r\n")
        await asyncio.sleep(0.1)
        assert got == [b"hello", b"world"]
        pump.listen()  # what was queued wakes the loop now, and every read after it
        await asyncio.sleep(0.1)
        assert got == [b"hello", b"world", b"!"]
        backend.write(b"0\r\n\r\n")
        assert await asyncio.wait_for(pump.outcome, 5) is upstream.CallEnd.REUSABLE
        writer.close()
        backend.close()
        server.close()

    asyncio.run(main())
