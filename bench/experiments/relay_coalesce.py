"""Experiment (bench only): the relay sends all it got from one upstream read as ONE chunk.

    .venv/bin/python bench/run.py --addon bench/experiments/relay_coalesce.py

Loads the real addon with ``Relay._pump`` replaced by a copy whose ``send`` buffers and flushes
with ``loop.call_soon``, i.e. once the pump waits for the upstream again: everything one
upstream read produced reaches mitmproxy (and the translator) as a single HTTP chunk. It patches
relay.py internals as of commit 0de5b39 and will break when they change; see docs/performance.md.
"""

import asyncio

import h11
from resp2chat_io import relay as R


async def _pump(self, target, request, body, down, conn):
    loop = asyncio.get_running_loop()
    buf = []

    def flush():
        if buf:
            data = b"".join(buf)
            buf.clear()
            down.write(conn.send(h11.Data(data=data)))

    def send(data):
        if data:
            if not buf:
                loop.call_soon(flush)  # runs when this task next waits: after the whole read
            buf.append(data)

    try:
        if dict(request.headers).get(R.WEB_SEARCH_HEADER.encode()) and self.brave_key:
            await self._search_loop(target, request, body, send, down)
        else:
            await self._round(target, request, body, send, send, down)
    finally:
        flush()


R.Relay._pump = _pump
import resp2chat  # noqa: E402

addons = resp2chat.addons
