"""Shared state in Redis (or Valkey): stored responses and the replay cache, for replicas.

With ``state_store_url`` set, every gateway replica keeps what ``previous_response_id`` (and
item references) continue from, and the replay cache, in one Redis through the ``redis`` client
library (``redis.asyncio`` on mitmproxy's event loop), so any replica continues any
conversation.

Keys (``resp2chat:`` prefix; one Redis database per gateway fleet, chosen by the URL's ``/db``):

| key | type | what |
| --- | --- | --- |
| ``resp2chat:response:{id}`` | hash | ``data``: the entry JSON (items + Response, as store.py keeps it); ``items``: its item ids. Expires after ``session_ttl_hours`` |
| ``resp2chat:item:{item_id}`` | string | the id of the newest stored response whose conversation (inputs or output) holds the item (item references): same expiry, dropped with its response |
| ``resp2chat:responses`` | sorted set | response ids by the time they were stored (Redis's clock): the oldest go first |
| ``resp2chat:responses:sizes`` / ``:bytes`` | hash / integer | each entry's size and their sum: ``max_session_memory_mb`` |
| ``resp2chat:replay:{sha256}`` | string | a replay-cache entry (resp2chat_core/replay.py ``pack``), at most 4 MiB |
| ``resp2chat:replays`` | sorted set | replay keys in the order they came: ``max_replay_entries`` (FIFO) |

Bounds: each write runs one Lua script (atomic: a replica killed mid-write leaves either the
whole entry or nothing) that first drops entries past their time, then the oldest until the
count (``max_sessions``) and byte (``max_session_memory_mb``) caps hold again. Keys also carry
Redis expiries, so nothing outlives its time even if no replica writes again.

Redis unreachable: ``StateUnavailable`` is raised for what needs it (the addons answer 503 for
``previous_response_id`` and ``GET /v1/responses/{id}``; plain turns go on: a replay lookup is a
miss, a response that cannot be stored is logged). After a failure, calls fail at once for a
short back-off instead of waiting on a dead server each time; the next call after it tries
again, so recovery is automatic when Redis returns. Redis reachable but refusing a command (an
error reply: ``OOM`` past ``maxmemory``, ``READONLY`` on a replica, ``NOPERM`` from an ACL) is
``StateUnavailable`` too, without the back-off. Writes run as tasks (``write``) that never raise:
a write that fails is a warning, and ``close`` waits for those still running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import urlsplit

log = logging.getLogger("resp2chat")

PREFIX = "resp2chat:"
CONNECT_TIMEOUT = 1.0  # seconds: Redis is expected close by
IO_TIMEOUT = 3.0
BACKOFF = (0.5, 5.0)  # seconds without calls after a failure: first, and at most (doubling)


class StateUnavailable(Exception):
    """Redis cannot be reached (or timed out) right now."""


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    where = parts.hostname or parts.path
    return f"{parts.scheme}://{where}" + (f":{parts.port}" if parts.port else "") + (
        parts.path if parts.hostname and parts.path else "")


# one response gone: its hash, the item ids that still point at it, its size and its index entry
# (both scripts below start with it; ``prefix`` is ARGV[1])
_DROP = """
local prefix = ARGV[1]
local idx, sizes, total = prefix .. 'responses', prefix .. 'responses:sizes', prefix .. 'responses:bytes'
local function drop(rid)
  local key = prefix .. 'response:' .. rid
  local ids = redis.call('HGET', key, 'items')
  if ids then
    for iid in string.gmatch(ids, '%S+') do
      if redis.call('GET', prefix .. 'item:' .. iid) == rid then redis.call('DEL', prefix .. 'item:' .. iid) end
    end
  end
  redis.call('DEL', key)
  local size = redis.call('HGET', sizes, rid)
  if size then
    redis.call('DECRBY', total, size)
    redis.call('HDEL', sizes, rid)
  end
  redis.call('ZREM', idx, rid)
end
"""

_PUT_RESPONSE = _DROP + """
local id, data, items = ARGV[2], ARGV[3], ARGV[4]
local ttl, max_n, max_b = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', now - ttl)) do drop(rid) end
drop(id)
local key = prefix .. 'response:' .. id
redis.call('HSET', key, 'data', data, 'items', items)
redis.call('EXPIRE', key, ttl)
for iid in string.gmatch(items, '%S+') do
  redis.call('SET', prefix .. 'item:' .. iid, id, 'EX', ttl)
end
redis.call('ZADD', idx, now, id)
redis.call('HSET', sizes, id, #data)
redis.call('INCRBY', total, #data)
while redis.call('ZCARD', idx) > max_n or tonumber(redis.call('GET', total) or '0') > max_b do
  local oldest = redis.call('ZRANGE', idx, 0, 0)
  if oldest[1] == nil then break end
  drop(oldest[1])
end
return {redis.call('ZCARD', idx), tonumber(redis.call('GET', total) or '0')}
"""

_DROP_RESPONSE = _DROP + """
local existed = redis.call('EXISTS', prefix .. 'response:' .. ARGV[2])
drop(ARGV[2])
return existed
"""

_PUT_REPLAY = """
local prefix, key, data, cap = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local idx = prefix .. 'replays'
local t = redis.call('TIME')
redis.call('SET', prefix .. 'replay:' .. key, data)
redis.call('ZADD', idx, tonumber(t[1]) + tonumber(t[2]) / 1000000, key)
while redis.call('ZCARD', idx) > cap do
  local oldest = redis.call('ZPOPMIN', idx)
  redis.call('DEL', prefix .. 'replay:' .. oldest[1])
end
return redis.call('ZCARD', idx)
"""


class RedisState:
    """One Redis connection pool for the gateway, and whether Redis is reachable."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis  # the redis client library (PyPI `redis`)
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.url = url
        self.where = describe(url)
        # One retry on a fresh connection: after Redis restarted, pooled connections are dead.
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=IO_TIMEOUT,
                                              retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        self._scripts = {name: self.client.register_script(text) for name, text in
                         (("put_response", _PUT_RESPONSE), ("drop_response", _DROP_RESPONSE),
                          ("put_replay", _PUT_REPLAY))}
        self.up = True
        self.errors = 0  # failed calls (metrics)
        self._down_until = 0.0
        self._backoff = BACKOFF[0]
        self._refusal = ""  # the last error reply logged (each different one once, until a call succeeds)
        self._writes: set[asyncio.Task] = set()

    async def call(self, what: str, make):
        """Run ``await make(client)``; ``StateUnavailable`` if Redis is down (or was a moment ago)
        or refuses the command."""
        import redis.exceptions as rex

        if not self.up and time.monotonic() < self._down_until:
            raise StateUnavailable(f"the state store ({self.where}) is unreachable")
        try:
            result = await make(self.client)
        except (rex.ConnectionError, rex.TimeoutError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            if self.up:
                log.warning(f"resp2chat: state store {self.where} unreachable ({what}): {type(exc).__name__}: {exc}")
            else:
                self._backoff = min(self._backoff * 2, BACKOFF[1])
            self.up, self._down_until = False, time.monotonic() + self._backoff
            raise StateUnavailable(f"the state store ({self.where}) is unreachable") from None
        except rex.RedisError as exc:  # an error reply (OOM, READONLY, NOPERM…): reachable, but no use now
            self.errors += 1
            refusal = f"{type(exc).__name__}: {exc}"
            if refusal != self._refusal:
                self._refusal = refusal
                log.warning(f"resp2chat: state store {self.where} refused ({what}): {refusal}")
            raise StateUnavailable(f"the state store ({self.where}) refused {what}: {refusal}") from None
        if not self.up:
            log.warning(f"resp2chat: state store {self.where} reachable again")
            self.up, self._backoff = True, BACKOFF[0]
        self._refusal = ""
        return result

    def write(self, what: str, write) -> None:
        """Run the coroutine ``write`` as a task that never raises: a failure is a warning naming
        ``what`` was lost (a task's exception would be logged as an ERROR, which stops a gateway
        that is still starting). ``close`` waits for it."""
        task = asyncio.ensure_future(self._write(what, write))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, what: str, write) -> None:
        try:
            await write
        except StateUnavailable as exc:
            log.warning(f"resp2chat: {what}: {exc}")
        except Exception as exc:  # noqa: BLE001 — a bug of ours: still no task exception
            log.warning(f"resp2chat: {what}: {type(exc).__name__}: {exc}", exc_info=exc)

    async def flush(self) -> None:
        """Wait for the writes still running."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def script(self, name: str):
        return self._scripts[name]

    async def close(self) -> None:
        await self.flush()
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a pool to a dead server
            pass


def _item_ids(items: list) -> str:
    """The ids of a stored conversation's items (its inputs and its output, as ``item_reference``
    may name either): each ``item:`` key names the newest response holding the item."""
    ids = [i.get("id") for i in items if isinstance(i, dict)]
    return " ".join(dict.fromkeys(i for i in ids if isinstance(i, str) and i and " " not in i))


class RedisResponseStore:
    """Stored responses in Redis: the interface of store.ResponseStore, awaited."""

    def __init__(self, state: RedisState, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self.state, self.ttl, self.max_entries, self.max_bytes = state, int(ttl), max_entries, max_bytes
        self.count = 0  # entries and bytes after this replica's last write (metrics)
        self.bytes = 0

    def __len__(self) -> int:
        return self.count

    async def put(self, response_id: str, items: list, response: dict) -> None:
        data = json.dumps({"items": items, "response": response}, ensure_ascii=False, separators=(",", ":")).encode()
        if len(data) > self.max_bytes or self.ttl <= 0 or self.max_entries <= 0:
            return
        script = self.state.script("put_response")
        self.count, self.bytes = await self.state.call("store a response", lambda c: script(args=[
            PREFIX, response_id, data, _item_ids(items), self.ttl, self.max_entries, self.max_bytes]))

    async def get(self, response_id: str) -> dict | None:
        data = await self.state.call("read a stored response",
                                     lambda c: c.hget(f"{PREFIX}response:{response_id}", "data"))
        return json.loads(data) if data else None

    async def delete(self, response_id: str) -> bool:
        script = self.state.script("drop_response")
        return bool(await self.state.call("delete a stored response", lambda c: script(args=[PREFIX, response_id])))

    async def items(self, item_ids) -> dict[str, dict]:
        """``item_reference`` ids -> the stored items (missing: absent), as store.ResponseStore's
        ``resolve_items``: where they are in one round trip, each response holding some read and
        decoded once however many it serves."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        holders = await self.state.call("look up items", lambda c: c.mget([f"{PREFIX}item:{i}" for i in ids]))
        by_response: dict[str, set[str]] = {}
        for item_id, response_id in zip(ids, holders):
            if response_id:
                by_response.setdefault(response_id.decode(), set()).add(item_id)
        found: dict[str, dict] = {}
        for response_id, wanted in by_response.items():
            entry = await self.get(response_id) or {}
            for item in (*entry.get("items", ()), *(entry.get("response") or {}).get("output", ())):
                iid = item.get("id") if isinstance(item, dict) else None
                if isinstance(iid, str) and iid in wanted and iid not in found:
                    found[iid] = item
        return {i: found[i] for i in ids if i in found}


class RedisReplayCache:
    """The replay cache in Redis: resp2chat_core/replay.py's ReplayCache interface, awaited."""

    def __init__(self, state: RedisState, capacity: int) -> None:
        self.state, self.capacity = state, capacity
        self.hits = self.misses = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def resize(self, capacity: int) -> None:
        self.capacity = capacity  # the next put trims to it

    async def get(self, key: str) -> bytes | None:
        try:
            found = await self.state.call("replay cache lookup", lambda c: c.get(f"{PREFIX}replay:{key}"))
        except StateUnavailable:
            found = None  # a miss: the backend answers
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    async def put(self, key: str, entry: bytes) -> bool:
        from resp2chat_core.replay import MAX_ENTRY_BYTES

        if self.capacity <= 0 or len(entry) > MAX_ENTRY_BYTES:
            return False
        script = self.state.script("put_replay")
        self.count = await self.state.call("replay cache write", lambda c: script(args=[PREFIX, key, entry, self.capacity]))
        return True
