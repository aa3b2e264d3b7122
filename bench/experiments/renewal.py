"""What a background response's renewal costs (addons/background.py ``_renew``, every 2 s while it
runs), on each store, for a large conversation and a small one, in one run: the renewal as it
was (``get`` of the whole entry, then ``put`` of conversation and output over its version) and as
it is (store.py ``renew``: the Response part alone). Memory and directory: the time in this
process (the gateway's event loop); Redis (a real ``redis-server`` this script starts on a free
port, no persistence): the awaited call's wall time. Medians of ``--n`` renewals
(docs/performance.md, "Background renewals").

    .venv/bin/python bench/experiments/renewal.py [--kb 2500] [--n 40]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "addon"), str(ROOT / "tests")]

from redis_server import RedisServer  # noqa: E402  (tests/redis_server.py: a real redis-server)
from resp2chat_io.redis_state import RedisResponseStore, RedisState  # noqa: E402
from resp2chat_io.store import ResponseStore  # noqa: E402


def conversation(kb: int) -> list:
    """About ``kb`` KiB of turns: a user message and an assistant answer, ~5 KiB each."""
    items, n = [], 0
    while n * 5 < kb:
        items.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"q{n} " * 1000}]})
        items.append({"type": "message", "id": f"msg_{n:08d}", "role": "assistant", "status": "completed",
                      "content": [{"type": "output_text", "text": f"a{n} " * 1000, "annotations": []}]})
        n += 2
    return items


def running(rid: str, k: int) -> dict:
    """A running Response with ``k`` output text deltas' worth of output so far."""
    out = [{"type": "message", "id": "msg_out", "role": "assistant", "status": "in_progress",
            "content": [{"type": "output_text", "text": "word " * k, "annotations": []}]}]
    return {"id": rid, "object": "response", "status": "in_progress", "background": True, "output": out,
            "_resp2chat_background": {"streamed": True, "until": time.time() + 10}}


async def as_it_was(store, rid: str, items: list, k: int) -> None:
    entry = await store.get(rid)
    response = running(rid, k)
    await store.put(rid, items + response["output"], response, expect=entry["version"])


async def as_it_is(store, rid: str, items: list, k: int, version: list) -> None:
    found = await store.renew(rid, running(rid, k), expect=version[0])
    version[0] = found.version


async def measure(store, kb: int, n: int) -> dict:
    out = {}
    for size in (kb, 1):
        items = conversation(size)
        for way in ("was", "is"):
            rid = f"resp_{way}{size:08d}"
            queued = running(rid, 0)
            queued["output"] = []
            assert await store.put(rid, items, queued)
            version, times = [1], []
            for k in range(n):
                t = time.perf_counter()
                if way == "was":
                    await as_it_was(store, rid, items, k)
                else:
                    await as_it_is(store, rid, items, k, version)
                times.append(time.perf_counter() - t)
            out[(size, way)] = statistics.median(times) * 1e3
    return out


async def main(args) -> None:
    rows = []
    bounds = dict(ttl=3600, max_entries=100, max_bytes=256 << 20)
    rows.append(("memory", await measure(ResponseStore(**bounds), args.kb, args.n)))
    with tempfile.TemporaryDirectory() as d:
        rows.append(("directory", await measure(ResponseStore(directory=d, **bounds), args.kb, args.n)))
    with tempfile.TemporaryDirectory() as d:
        server = RedisServer(Path(d)).start()
        try:
            state = RedisState(server.url)
            rows.append(("redis", await measure(RedisResponseStore(state, **bounds), args.kb, args.n)))
            await state.close()
        finally:
            server.stop()
    print(f"ms per renewal (median of {args.n}); conversation {args.kb} KiB against 1 KiB")
    print(f"{'store':<10} {'was, large':>11} {'is, large':>10} {'was, small':>11} {'is, small':>10}")
    for name, r in rows:
        print(f"{name:<10} {r[(args.kb, 'was')]:>11.2f} {r[(args.kb, 'is')]:>10.2f} {r[(1, 'was')]:>11.3f} "
              f"{r[(1, 'is')]:>10.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kb", type=int, default=2500)
    parser.add_argument("--n", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
