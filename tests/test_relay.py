"""The upstream relay on its own (resp2chat_io/relay/): who it serves, flow control, connection reuse.

A raw asyncio client stands in for mitmproxy and a raw asyncio server for the backend, so the
test controls exactly when each side reads.
"""

from __future__ import annotations

import asyncio

import pytest

from resp2chat_core.channel import Accepted, Channel
from resp2chat_core.routing import Candidate
from resp2chat_io.relay import Exchange, Relay
from resp2chat_io.relay.server import TICK

CHUNK = b"data: " + b"x" * 32000 + b"\n\n"
CHUNKS = 3000  # ~96 MB: far more than the socket buffers between the three of us hold (~25 MB)


async def _backend(sent: list[int], conns: list[int], head: bytes = b"HTTP/1.1 200 OK\r\n", chunks: int = CHUNKS,
                   requests: list | None = None, state: dict | None = None):
    """``state["blocked"]``: the backend is waiting for its reader (its send buffer is full)."""
    async def serve(reader, writer):
        conns.append(1)
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            if requests is not None:
                requests.append(request)
            length = int(next(line.split(b":")[1] for line in request.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            writer.write(head + b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(chunks):
                writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                if state is not None:
                    state["blocked"] = writer.transport.get_write_buffer_size() > writer.transport.get_write_buffer_limits()[1]
                await writer.drain()
                if state is not None:
                    state["blocked"] = False
                sent[0] += len(CHUNK)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _request(headers: list[tuple[str, str]], body: bytes = b'{"stream":true}') -> bytes:
    lines = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in headers)
    return b"POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), lines, body)


async def _consume(reader, channel: Channel, take_slowly: float = 0.0) -> list:
    """What mitmproxy does: read the relay's head, then at each tick take the channel's items;
    at the end of the body, the last ones."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return await _consume_rest(reader, channel, take_slowly)


async def _until(condition, timeout: float = 60.0) -> None:
    """Wait for a condition on this event loop (never for a fixed time)."""
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def _exchange(turn_id: str, secret: str, port: int) -> Exchange:
    """An exchange as the addon registers one: one candidate, the backend on ``port``."""
    return Exchange(turn_id, secret, (Candidate("default", f"http://127.0.0.1:{port}/v1/chat/completions", b"{}"),))


def _data(items: list) -> bytes:
    return b"".join(i for i in items if isinstance(i, bytes))


def test_slow_consumer_pushes_back_on_the_backend_and_the_connection_is_reused():
    async def main():
        sent, conns, state = [0], [], {}
        backend = await _backend(sent, conns, state=state)
        port = backend.sockets[0].getsockname()[1]
        relay = Relay()
        await relay.start()
        reader, writer = await asyncio.open_connection(*relay.address, limit=1 << 20)
        try:
            for turn in range(2):
                ex = _exchange(f"turn{turn}", f"secret{turn}", port)
                writer.write(_request(relay.expect(ex)))
                sent[0] = 0
                await reader.readuntil(b"\r\n\r\n")
                # nobody takes: the relay must stop reading the backend (it waits for a take), and
                # the backend then waits for the relay
                await _until(lambda: ex.channel.on_take is not None and state.get("blocked"))
                assert sent[0] < CHUNKS * len(CHUNK) // 2, f"turn {turn}: backend was not pushed back"
                items = [ex.channel.take()]
                while True:
                    size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 60))[:-2], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    await reader.readexactly(size + 2)
                    items.append(ex.channel.take())
                items.append(ex.channel.take())
                flat = [i for batch in items for i in batch]
                assert flat[0] == Accepted()
                body = _data(flat)
                assert len(body) == CHUNKS * len(CHUNK) and body.count(CHUNK) == CHUNKS  # all of it, in order
            assert len(conns) == 1  # the second turn reused the backend connection (reading resumed)
        finally:
            writer.close()
            await relay.close()
            backend.close()

    asyncio.run(main())


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nconnection: close\r\n", b"HTTP/1.0 200 OK\r\n"])
def test_a_backend_that_closes_its_connection_is_not_reused(head):
    """cpp-httplib (llama.cpp's server) says "close" when a connection has served its share."""
    async def main():
        sent, conns = [0], []
        backend = await _backend(sent, conns, head, chunks=3)
        port = backend.sockets[0].getsockname()[1]
        relay = Relay()
        await relay.start()
        reader, writer = await asyncio.open_connection(*relay.address)
        try:
            for turn in range(2):
                ex = _exchange(f"t{turn}", "s", port)
                writer.write(_request(relay.expect(ex)))
                items = await asyncio.wait_for(_consume(reader, ex.channel), 10)
                assert _data(items).count(CHUNK) == 3
            assert len(conns) == 2 and relay.client.pooled == 0
        finally:
            writer.close()
            await relay.close()
            backend.close()

    asyncio.run(main())


@pytest.mark.parametrize("forge", ["no headers", "unknown turn", "wrong secret", "replayed"])
def test_a_forged_request_reaches_no_upstream(forge):
    """Only a request naming a registered exchange with its secret is served, once; the URL it
    would go to comes from the exchange, never from the request."""
    async def main():
        sent, conns, seen = [0], [], []
        backend = await _backend(sent, conns, chunks=1, requests=seen)
        port = backend.sockets[0].getsockname()[1]
        relay = Relay()
        await relay.start()
        ex = _exchange("flow-1", "the-secret", port)
        headers = relay.expect(ex)
        forged = {
            "no headers": [("x-resp2chat-target", f"http://127.0.0.1:{port}/v1/chat/completions")],
            "unknown turn": [("x-resp2chat-turn", "flow-2"), ("x-resp2chat-key", "the-secret")],
            "wrong secret": [("x-resp2chat-turn", "flow-1"), ("x-resp2chat-key", "the-secreT")],
            "replayed": headers,
        }[forge]
        try:
            if forge == "replayed":  # the real request first, then the same bytes again
                reader, writer = await asyncio.open_connection(*relay.address)
                writer.write(_request(headers))
                assert _data(await asyncio.wait_for(_consume(reader, ex.channel), 10)).count(CHUNK) == 1
                writer.close()
                seen.clear()
            reader, writer = await asyncio.open_connection(*relay.address)
            writer.write(_request(forged))
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
            writer.close()
            assert seen == [] and relay.refused == 1  # (it decides before it closes)
            if forge == "wrong secret":  # a failed guess does not spend the real turn
                reader, writer = await asyncio.open_connection(*relay.address)
                writer.write(_request(headers))
                assert _data(await asyncio.wait_for(_consume(reader, ex.channel), 10)).count(CHUNK) == 1
                writer.close()
        finally:
            await relay.close()
            backend.close()

    asyncio.run(main())


def test_a_turn_that_arrives_before_the_relay_runs_waits_for_it():
    """mitmproxy listens before the gateway's `running` hook starts the relay: a turn routed in
    that window must reach the relay's port (bound on first use) and be served once it runs."""
    async def main():
        sent, conns = [0], []
        backend = await _backend(sent, conns, chunks=2)
        port = backend.sockets[0].getsockname()[1]
        relay = Relay()
        assert relay.server is None and relay.address[1] != 0  # bound, not serving yet
        ex = _exchange("early", "s", port)
        reader, writer = await asyncio.open_connection(*relay.address)  # the kernel's backlog takes it
        writer.write(_request(relay.expect(ex)))
        await writer.drain()
        try:
            assert conns == []  # nothing served yet
            await relay.start()
            items = await asyncio.wait_for(_consume(reader, ex.channel), 10)
            assert _data(items).count(CHUNK) == 2
        finally:
            writer.close()
            await relay.close()
            backend.close()

    asyncio.run(main())


def test_accepted_connections_get_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and accepted sockets
    inherit the listening socket's: with proto 0 every tick to mitmproxy waited for a delayed ACK
    (the first token came ~40 ms late on every keep-alive request; make bench's c=1 TTFT)."""
    import socket as _socket

    async def main():
        relay = Relay()
        accepted = []
        serve = relay._serve

        async def spy(reader, writer):
            s = writer.get_extra_info("socket")
            accepted.append(s.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY))
            await serve(reader, writer)

        relay._serve = spy  # (start() serves with whatever _serve is then)
        await relay.start()
        reader, writer = await asyncio.open_connection(*relay.address)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await relay.close()
        assert accepted and accepted[0] != 0

    asyncio.run(main())


def test_a_begun_exchange_ticks_at_once_for_news_that_came_before_its_claim():
    """``Relay.begin`` runs an exchange before mitmproxy's request for it arrives: its news (the
    turn accepted, the backend's first bytes) waits in the channel with no one to tick. The
    request claims the run under way and gets one tick at once for it, while the backend says
    nothing more (without it the client would hear of the turn only at the backend's next bytes)."""
    async def main():
        seen, go_on = [], asyncio.Event()

        async def serve(reader, writer):
            request = await reader.readuntil(b"\r\n\r\n")
            seen.append(request)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
            await writer.drain()
            await go_on.wait()  # (silent until the test has its tick)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        backend = await asyncio.start_server(serve, "127.0.0.1", 0)
        relay = Relay()
        await relay.start()
        ex = _exchange("begun", "s", backend.sockets[0].getsockname()[1])
        headers = relay.expect(ex)
        try:
            relay.begin("begun")
            await _until(lambda: ex.channel.size == len(CHUNK))  # the backend answered: nobody was there to tick
            assert len(seen) == 1 and ex.task is not None and not ex.task.done()
            reader, writer = await asyncio.open_connection(*relay.address)
            writer.write(_request(headers))
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5))[:-2], 16)  # the tick, unprompted
            assert size == 1 and await reader.readexactly(3) == TICK[-3:]
            items = ex.channel.take()
            assert items[0] == Accepted() and _data(items) == CHUNK
            go_on.set()
            assert _data(await asyncio.wait_for(_consume_rest(reader, ex.channel), 10)) == b""
            assert relay.active == 0 and relay.expected == 0 and len(seen) == 1  # (one backend call: the begun one)
            writer.close()
        finally:
            go_on.set()
            await relay.close()
            backend.close()

    asyncio.run(main())


def test_forget_cancels_a_begun_exchange():
    """The flow ended without its request reaching the relay: the backend call begun for it is
    dropped (its connection closed), and nothing is left."""
    async def main():
        asked, closed = asyncio.Event(), asyncio.Event()

        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            asked.set()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            await reader.read()  # (EOF: the relay dropped the call)
            closed.set()

        backend = await asyncio.start_server(serve, "127.0.0.1", 0)
        relay = Relay()
        await relay.start()
        ex = _exchange("gone", "s", backend.sockets[0].getsockname()[1])
        relay.expect(ex)
        try:
            relay.begin("gone")
            await asyncio.wait_for(asked.wait(), 10)
            relay.forget("gone")
            await asyncio.wait_for(closed.wait(), 10)
            await _until(ex.task.done)
            assert ex.task.cancelled() and relay.expected == 0 and not relay._unclaimed
        finally:
            await relay.close()
            backend.close()

    asyncio.run(main())


async def _consume_rest(reader, channel: Channel, take_slowly: float = 0.0) -> list:
    """The rest of a relay body after its head: at each tick the channel's items; at the end of
    the body, the last ones."""
    items = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return items + channel.take()
        assert await reader.readexactly(size + 2) == TICK[-3:]  # a tick's content means nothing
        if take_slowly:
            await asyncio.sleep(take_slowly)
        items += channel.take()
