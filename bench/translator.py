#!/usr/bin/env python3
"""Micro-benchmark: the translator alone on real Codex-shaped streams (no sockets, no mitmproxy).

    .venv/bin/python bench/translator.py                 # every stream, µs per upstream chunk
    .venv/bin/python bench/translator.py --repeat 9      # more trials (the best is reported)

The streams are what the demo upstream sends for the bench workload's Codex requests
(workload.py: text, reasoning then text, reasoning then a tool call; ~200 content chunks each),
in its vLLM and Ollama wire formats, plus the round filter of a web-search turn in front of the
translator. Each stream is fed as the relay does: one upstream chunk per ``feed`` (paced: one
socket read per event) and 16 chunks per ``feed`` (bursty). A trial translates the stream
``--turns`` times (a new translator per turn; the request is lowered once); the best of ``--repeat`` trials
is reported, in µs per upstream chunk, with the run-to-run spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workload import make_variant  # noqa: E402

from resp2chat_core import websearch  # noqa: E402
from resp2chat_core.lowering import LoweringOptions  # noqa: E402
from resp2chat_core.turn import begin_turn  # noqa: E402
from resp2chat_io import demo_upstream  # noqa: E402


def streams() -> dict[str, tuple[bytes, list[bytes]]]:
    """name -> (the Responses request, the upstream's SSE events)."""
    out = {}
    for kind in ("text", "reasoning", "tool"):
        v = make_variant(kind, deltas=200, reasoning_words=60)
        chat = json.loads(v.chat_body)
        plan = demo_upstream.plan_answer(chat)
        ctx = demo_upstream.Ctx(id="chatcmpl-0123456789abcdef0123456789abcdef", created=1795311942,
                                model=chat["model"], prompt_tokens=9000, cached_tokens=8192, include_usage=True)
        for dialect in ("vllm", "ollama"):
            out[f"{kind}/{dialect}"] = (v.responses_body, demo_upstream.DIALECTS[dialect].stream(plan, ctx))
    return out


def one_turn(turn, reads: list[bytes], search: bool) -> int:
    t = turn.translator()
    n = len(t.accepted())
    if search:
        loop = websearch.SearchLoop(b"{}", 1)
        for data in reads:
            n += len(t.feed(loop.feed(data)))
        tail, step = loop.end_round(True)
        n += len(t.feed(tail + step.tail))
    else:
        for data in reads:
            n += len(t.feed(data))
    n += len(t.finish())
    assert t.done and t.response()["status"] == "completed", t.response()
    return n


def measure(body: bytes, events: list[bytes], per_read: int, turns: int, repeat: int, search: bool) -> list[float]:
    reads = [b"".join(events[i:i + per_read]) for i in range(0, len(events), per_read)]
    chunks = sum(1 for e in events if not e.startswith(b"data: [DONE]"))
    turn = begin_turn(body, LoweringOptions(), "resp_0123456789abcdef0123456789abcdef", 1795311942)
    one_turn(turn, reads, search)  # warm up
    results = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        for _ in range(turns):
            one_turn(turn, reads, search)
        results.append((time.perf_counter() - start) * 1e6 / (turns * chunks))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    figures = {}
    for name, (body, events) in streams().items():
        cases = [("paced", 1, False), ("burst16", 16, False)]
        if name.endswith("/vllm"):
            cases.append(("paced+search", 1, True))
        for case, per_read, search in cases:
            r = measure(body, events, per_read, args.turns, args.repeat, search)
            figures[f"{name} {case}"] = {"us_per_chunk": round(min(r), 3), "median": round(statistics.median(r), 3),
                                         "chunks": len(events) - 1}
            if not args.json:
                print(f"{name + ' ' + case:28} {min(r):6.3f} µs/chunk  (median {statistics.median(r):6.3f},"
                      f" {len(events) - 1} chunks)", flush=True)
    if args.json:
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
