"""What a stored response's write costs, this checkout's store against another revision's, in one
run (docs/performance.md, "Per-owner shares of the response store").

Both stores are filled to ``max_sessions`` first, so every measured write also evicts one entry
(the case shares change). Memory: the time of ``ResponseStore.put`` in this process. Redis (a
real ``redis-server`` this script starts on a free port, no persistence): the Lua script's own
time as Redis counts it (``INFO commandstats``, usec per EVALSHA: what every replica's writes
queue behind) and the wall time of an awaited ``put`` (one round trip, redis-py included).
Rounds alternate baseline and current; medians are printed.

    .venv/bin/python bench/experiments/store_put.py [--base REV] [--rounds 5] [--puts 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "addon"), str(ROOT / "tests")]

from redis_server import RedisServer  # noqa: E402  (tests/redis_server.py: a real redis-server)


def module_at(rev: str, path: str, name: str):
    """``path`` as it is at git revision ``rev``, imported as module ``name``."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                          check=True).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(text, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def workload(n: int, owners: int, seed: int) -> list[tuple[str, str, list]]:
    """(owner, id, items) writes: one owner writes half of them (a runaway agent), the rest spread."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        owner = "client.runaway" if rng.random() < 0.5 else f"client.dev{rng.randrange(owners)}"
        out.append((owner, f"resp_{seed:04d}{i:010d}", [{"role": "user", "content": "x" * rng.randrange(500, 3000)}]))
    return out


async def run_puts(store, writes) -> float:
    t = time.perf_counter()
    for owner, rid, items in writes:
        await store.put(rid, items, {"id": rid}, owner=owner)
    return (time.perf_counter() - t) / len(writes) * 1e6


async def memory_round(module, cap: int, owners: int, puts: int, seed: int) -> float:
    store = module.ResponseStore(ttl=1e9, max_entries=cap, max_bytes=1 << 40)
    await run_puts(store, workload(cap, owners, seed))  # full: every write below evicts one
    assert len(store) == cap
    return await run_puts(store, workload(puts, owners, seed + 1))


def evalsha_usec(r) -> float:
    return float(r.info("commandstats").get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


async def redis_round(module, server, cap: int, owners: int, puts: int, seed: int) -> tuple[float, float]:
    r = server.client()
    r.flushdb()
    state = module.RedisState(server.url)
    try:
        store = module.RedisResponseStore(state, ttl=3600, max_entries=cap, max_bytes=1 << 40)
        await run_puts(store, workload(cap, owners, seed))
        r.config_resetstat()
        wall = await run_puts(store, workload(puts, owners, seed + 1))
        assert len(store) == cap
        return evalsha_usec(r), wall
    finally:
        await state.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="main", help="the baseline's git revision (default: main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--puts", type=int, default=2000)
    args = parser.parse_args()
    from resp2chat_io import redis_state, store

    base_store = module_at(args.base, "addon/resp2chat_io/store.py", "baseline_store")
    base_redis = module_at(args.base, "addon/resp2chat_io/redis_state.py", "baseline_redis_state")
    sides = {"baseline": (base_store, base_redis), "shares": (store, redis_state)}
    results: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        for cap, owners in ((256, 20), (10_000, 1_000)):
            for rnd in range(args.rounds):
                for side, (mem, red) in sides.items():
                    results.setdefault((cap, owners, side, "memory"), []).append(
                        await memory_round(mem, cap, owners, args.puts, rnd))
                    server_us, wall = await redis_round(red, server, cap, owners, args.puts, rnd)
                    results.setdefault((cap, owners, side, "redis script"), []).append(server_us)
                    results.setdefault((cap, owners, side, "redis put"), []).append(wall)
    print(f"{'max_sessions':>12} {'owners':>7} {'what':>13} {'baseline µs':>12} {'shares µs':>10} {'ratio':>6}")
    for cap, owners in ((256, 20), (10_000, 1_000)):
        for what in ("memory", "redis script", "redis put"):
            b = statistics.median(results[(cap, owners, "baseline", what)])
            s = statistics.median(results[(cap, owners, "shares", what)])
            print(f"{cap:>12} {owners:>7} {what:>13} {b:>12.1f} {s:>10.1f} {s / b:>6.2f}")


if __name__ == "__main__":
    asyncio.run(main())
