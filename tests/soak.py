"""Soak: many concurrent Codex-like streams through a gateway, every event checked.

    python tests/soak.py --streams 64 --seconds 60        (what `make soak` runs)

Each stream posts a real Codex request (tests/fixtures/codex-0.169.0) whose last user message
asks the scripted upstream for N words, reads the whole SSE answer over a raw asyncio socket and
checks it: contiguous sequence numbers, exactly one terminal event and it is
`response.completed`, and the text deltas joined equal the expected words (nothing lost,
duplicated or garbled). Streams are started back to back until the time is up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from helpers import TERMINAL, codex_fixture, parse_sse, start_gateway


@dataclass
class Stats:
    streams: int = 0
    events: int = 0
    failures: list[str] = field(default_factory=list)


def codex_body(words: int, tag: str) -> bytes:
    body = codex_fixture("01-text-only.json")["body"]
    body["input"][-1]["content"] = [{"type": "input_text", "text": f"words: {words}\nnoreason\nslow: 5\n{tag}"}]
    return json.dumps(body).encode()


async def one_stream(base_url: str, words: int, tag: str, stats: Stats) -> None:
    url = urlsplit(base_url)
    body = codex_body(words, tag)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(
            f"POST {url.path}/responses HTTP/1.1\r\nhost: {url.netloc}\r\ncontent-type: application/json\r\n"
            f"accept: text/event-stream\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        raw = await asyncio.wait_for(reader.read(-1), 120)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        stats.failures.append(f"{tag}: {head[:80]!r}")
        return
    payload = _dechunk(rest) if b"chunked" in head.lower() else rest
    events = parse_sse(payload)  # (a stream that is not well formed raises: a failure, noted by the worker)
    stats.streams += 1
    stats.events += len(events)
    problems = []
    if [e["sequence_number"] for e in events] != list(range(len(events))):
        problems.append("sequence numbers not contiguous")
    terminal = [e["type"] for e in events if e["type"] in TERMINAL]
    if terminal != ["response.completed"]:
        error = (events[-1].get("response") or {}).get("error") if events else None
        problems.append(f"terminal events {terminal} {error or ''}")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    if text.split() != [f"word{i}" for i in range(words)]:
        problems.append(f"text garbled: {text[:80]!r}")
    if problems:
        stats.failures.append(f"{tag}: {'; '.join(problems)}")


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


async def soak(base_url: str, streams: int, seconds: float, words: int = 40) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + seconds
    counter = 0

    async def worker(n: int) -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            counter += 1
            try:
                await one_stream(base_url, words, f"soak-{n}-{counter}", stats)
            except Exception as exc:  # noqa: BLE001 — every failure is a finding
                stats.failures.append(f"soak-{n}: {exc!r}")

    await asyncio.gather(*(worker(n) for n in range(streams)))
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--gateway", help="base URL of a running gateway (default: start one with the demo upstream)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))
    import tempfile

    from resp2chat_io.demo_upstream import serve_in_thread

    server = gw = None
    base = args.gateway
    if not base:
        server, up = serve_in_thread()
        gw = start_gateway(up.removesuffix("/v1"), Path(tempfile.mkdtemp()), "--set", "resp2chat_max_replay_entries=0",
                           "--set", "flow_detail=0")
        base = gw.base_url
    try:
        started = time.monotonic()
        stats = asyncio.run(soak(base, args.streams, args.seconds))
        took = time.monotonic() - started
    finally:
        if gw:
            gw.stop()
        if server:
            server.shutdown()
    print(f"{stats.streams} streams, {stats.events} events in {took:.1f} s "
          f"({stats.events / took:.0f} events/s), {len(stats.failures)} failures")
    for f in stats.failures[:20]:
        print("  " + f)
    return 1 if stats.failures or not stats.streams else 0


if __name__ == "__main__":
    sys.exit(main())
