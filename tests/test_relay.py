"""The upstream relay on its own (resp2chat_io/relay.py): flow control and connection reuse.

Here a raw asyncio client stands in for mitmproxy and a raw asyncio server for the backend, so
the test controls exactly when each side reads.
"""

from __future__ import annotations

import asyncio

import pytest

from resp2chat_io.relay import ACCEPTED, TARGET_HEADER, Relay

CHUNK = b"data: " + b"x" * 32000 + b"\n\n"
CHUNKS = 3000  # ~96 MB: far more than the socket buffers between the three of us hold (~25 MB)


async def _backend(sent: list[int], conns: list[int], head: bytes = b"HTTP/1.1 200 OK\r\n", chunks: int = CHUNKS):
    async def serve(reader, writer):
        conns.append(1)
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in request.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            writer.write(head + b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(chunks):
                writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                await writer.drain()
                sent[0] += len(CHUNK)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _request(reader, writer, port: int) -> None:
    body = b'{"stream":true}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\ncontent-length: %d\r\n%s: http://127.0.0.1:%d/v1/chat"
                 b"/completions\r\n\r\n%s" % (len(body), TARGET_HEADER.encode(), port, body))
    await reader.readuntil(b"\r\n\r\n")


async def _read_body(reader) -> bytes:
    """The relay's chunked answer, de-chunked, up to its last chunk."""
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += (await reader.readexactly(size + 2))[:-2]


def test_slow_reader_pushes_back_on_the_backend_and_the_connection_is_reused():
    async def main():
        sent, conns = [0], []
        backend = await _backend(sent, conns)
        port = backend.sockets[0].getsockname()[1]
        relay = Relay()
        relay_port = await relay.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port, limit=1 << 20)
        try:
            for turn in range(2):
                await _request(reader, writer, port)
                sent[0] = 0
                await asyncio.sleep(1.5)  # we do not read: the relay must stop reading the backend
                assert sent[0] < CHUNKS * len(CHUNK) // 2, f"turn {turn}: backend was not pushed back"
                body = await asyncio.wait_for(_read_body(reader), 60)
                assert len(body) == len(ACCEPTED) + CHUNKS * len(CHUNK)  # all of it, in order
                assert body.startswith(ACCEPTED) and body.count(CHUNK) == CHUNKS
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
        relay_port = await relay.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
        try:
            for _ in range(2):
                await _request(reader, writer, port)
                assert (await asyncio.wait_for(_read_body(reader), 10)).count(CHUNK) == 3
            assert len(conns) == 2 and not any(relay._pool.values())
        finally:
            writer.close()
            await relay.close()
            backend.close()

    asyncio.run(main())
