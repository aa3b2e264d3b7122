"""Shared state in Redis (or Valkey): stored responses and the replay cache, for replicas.

With ``state_store_url`` set, every gateway replica keeps what ``previous_response_id`` (and
item references) continue from, and the replay cache, in one Redis through the ``redis`` client
library (``redis.asyncio`` on mitmproxy's event loop), so any replica continues any
conversation.

Keys (``resp2chat:`` prefix; one Redis database per gateway fleet, chosen by the URL's ``/db``).
What a client stores lives under its owner's namespace ``{ns}`` (resp2chat_core/owner.py): empty
for the one owner of a single-key gateway (the keys as they always were), ``owner:{owner}:``
otherwise, so another owner's id is exactly a key that does not exist:

| key | type | what |
| --- | --- | --- |
| ``resp2chat:{ns}response:{id}`` | hash | ``data``: the entry JSON (items + Response, as store.py keeps it; a conversation's, under its ``conv_…`` id); ``v``: its version (store.py: a write may name the version it replaces); ``items``: the ids of the items it holds (below); ``d:{item_id}``: each one's digest (store.py ``item_digest``). Expires after ``session_ttl_hours`` |
| ``resp2chat:{ns}item:{item_id}`` | string | the id of the newest stored response of that owner holding the item unchanged, for an item the gateway produced (a response's output; never a client's input): item references. Same expiry, dropped with that response |
| ``resp2chat:responses`` | sorted set | ``{ns}{id}`` of every owner's responses by the time they were stored (Redis's clock): the oldest go first |
| ``resp2chat:responses:sizes`` / ``:bytes`` | hash / integer | each entry's size (by ``{ns}{id}``) and their sum: ``max_session_memory_mb`` |
| ``resp2chat:replay:{sha256}`` | string | a replay-cache entry (resp2chat_core/replay.py ``pack``), at most 4 MiB; the key's digest covers the owner (replay.py ``replay_key``) |
| ``resp2chat:replays`` | sorted set | replay keys in the order they came: ``max_replay_entries`` (FIFO) |

Bounds: each write runs one Lua script (atomic: a replica killed mid-write leaves either the
whole entry or nothing) that first drops entries past their time, then the oldest until the
count (``max_sessions``) and byte (``max_session_memory_mb``) caps hold again: one bound over
every owner's entries. Keys also carry Redis expiries, so nothing outlives its time even if no
replica writes again.

Redis unreachable: ``StateUnavailable`` is raised for what needs it (the addons answer 503 for
``previous_response_id`` and ``GET /v1/responses/{id}``; plain turns go on: a replay lookup is a
miss, a response that cannot be stored is logged). After a failure, calls fail at once for a
short back-off instead of waiting on a dead server each time; the next call after it tries
again, so recovery is automatic when Redis returns. Redis reachable but refusing a command (an
error reply: ``OOM`` past ``maxmemory``, ``READONLY`` on a replica, ``NOPERM`` from an ACL) is
``StateUnavailable`` too, without the back-off. Writes run as store.py's ``Writes`` (never
raising: a write that fails is a warning; the store addon waits for them before ``close``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import urlsplit

from resp2chat_core import owner as owners
from resp2chat_io.store import (ReplayCounts, StateUnavailable, held_items, item_digest, output_items, pick, valid_id,
                                valid_item_id)

log = logging.getLogger("resp2chat")

KEY_ROOT = "resp2chat:"
CONNECT_TIMEOUT = 1.0  # seconds: Redis is expected close by
IO_TIMEOUT = 3.0
BACKOFF = (0.5, 5.0)  # seconds without calls after a failure: first, and at most (doubling)


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    where = parts.hostname or parts.path
    return f"{parts.scheme}://{where}" + (f":{parts.port}" if parts.port else "") + (
        parts.path if parts.hostname and parts.path else "")


# one response gone (by its member of the index, ``{ns}{id}``): its hash, the item keys that still
# point at it, its size and its index entry (both scripts below start with it; ``prefix`` is ARGV[1])
_DROP = """
local prefix = ARGV[1]
local idx, sizes, total = prefix .. 'responses', prefix .. 'responses:sizes', prefix .. 'responses:bytes'
local function split(member)
  local ns, rid = string.match(member, '^(owner:[^:]*:)(.*)$')
  if ns then return ns, rid end
  return '', member
end
local function drop(member)
  local ns, rid = split(member)
  local key = prefix .. ns .. 'response:' .. rid
  local ids = redis.call('HGET', key, 'items')
  if ids then
    for iid in string.gmatch(ids, '%S+') do
      local ikey = prefix .. ns .. 'item:' .. iid
      if redis.call('GET', ikey) == rid then redis.call('DEL', ikey) end
    end
  end
  redis.call('DEL', key)
  local size = redis.call('HGET', sizes, member)
  if size then
    redis.call('DECRBY', total, size)
    redis.call('HDEL', sizes, member)
  end
  redis.call('ZREM', idx, member)
end
"""

# ARGV: prefix, the response's member ({ns}{id}), its entry, the items it produced ("id digest …"),
# the other items of its conversation with an id ("id digest …": held if produced before, unchanged),
# ttl, max_sessions, max bytes, the version it replaces ("": any). Returns {count, bytes} ({-1, 0}:
# another version is there)
_PUT_RESPONSE = _DROP + """
local member, data, produced, others = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, max_n, max_b = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ns, id = split(member)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, old in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', now - ttl)) do drop(old) end
local version = tonumber(redis.call('HGET', prefix .. ns .. 'response:' .. id, 'v') or '0')
if ARGV[9] ~= '' and tonumber(ARGV[9]) ~= version then return {-1, 0} end
drop(member)
local held, digests = {}, {}
for iid, digest in string.gmatch(produced, '(%S+) (%S+)') do
  held[#held + 1], digests[iid] = iid, digest
end
for iid, digest in string.gmatch(others, '(%S+) (%S+)') do
  if not digests[iid] then
    local holder = redis.call('GET', prefix .. ns .. 'item:' .. iid)
    if holder and redis.call('HGET', prefix .. ns .. 'response:' .. holder, 'd:' .. iid) == digest then
      held[#held + 1], digests[iid] = iid, digest
    end
  end
end
local key = prefix .. ns .. 'response:' .. id
redis.call('HSET', key, 'data', data, 'items', table.concat(held, ' '), 'v', version + 1)
for _, iid in ipairs(held) do
  redis.call('HSET', key, 'd:' .. iid, digests[iid])
  redis.call('SET', prefix .. ns .. 'item:' .. iid, id, 'EX', ttl)
end
redis.call('EXPIRE', key, ttl)
redis.call('ZADD', idx, now, member)
redis.call('HSET', sizes, member, #data)
redis.call('INCRBY', total, #data)
while redis.call('ZCARD', idx) > max_n or tonumber(redis.call('GET', total) or '0') > max_b do
  local oldest = redis.call('ZRANGE', idx, 0, 0)
  if oldest[1] == nil then break end
  drop(oldest[1])
end
return {redis.call('ZCARD', idx), tonumber(redis.call('GET', total) or '0')}
"""

_DROP_RESPONSE = _DROP + """
local ns, rid = split(ARGV[2])
local existed = redis.call('EXISTS', prefix .. ns .. 'response:' .. rid)
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
        self.closed = False  # (state_store_url changed: what still holds this one gets StateUnavailable)
        self.errors = 0  # failed calls (metrics)
        self._down_until = 0.0
        self._backoff = BACKOFF[0]
        self._refusal = ""  # the last error reply logged (each different one once, until a call succeeds)

    async def call(self, what: str, make):
        """Run ``await make(client)``; ``StateUnavailable`` if Redis is down (or was a moment ago)
        or refuses the command."""
        import redis.exceptions as rex

        if self.closed:  # (a call now would open a connection nobody closes)
            raise StateUnavailable(f"the state store ({self.where}) is no longer this gateway's")
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

    def script(self, name: str):
        return self._scripts[name]

    def script_from(self, text: str):
        """A Lua script of another module (its text is its name), registered once."""
        found = self._scripts.get(text)
        if found is None:
            found = self._scripts[text] = self.client.register_script(text)
        return found

    async def close(self) -> None:
        self.closed = True
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a pool to a dead server
            pass


def namespace(owner: str) -> str:
    """Where an owner's keys live, after the prefix (see the key table): ``""`` for the one owner
    of a single-key gateway."""
    return f"owner:{owners.check(owner)}:" if owner else ""


def _item_ids(items: list, response: dict) -> tuple[str, str]:
    """For ``put``: the items a response produced, and the other items of its conversation with
    an id (each may be one produced earlier, held unchanged), as ``"id digest …"`` (only ids that
    can be the gateway's: no spaces)."""
    produced = output_items(response)

    def pairs(found) -> str:
        return " ".join(dict.fromkeys(f"{iid} {item_digest(item)}" for iid, item in found if valid_item_id(iid)))
    return pairs(produced.items()), pairs(held_items(items, produced))


class RedisResponseStore:
    """Stored responses in Redis: store.py's ``Store``. A response is written when its turn ends,
    a moment after the client read ``response.completed``: a client that continues (or GETs it)
    at once on another replica can ask before the write landed, so an id Redis does not know
    yet is looked up again for up to ``fresh_wait`` seconds (the store addon's lookup)."""

    fresh_wait = 2.0

    def __init__(self, state: RedisState, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self.state, self.ttl, self.max_entries, self.max_bytes = state, int(ttl), max_entries, max_bytes
        self.count = 0  # entries and bytes after this replica's last write (metrics)
        self.bytes = 0

    def __len__(self) -> int:
        return self.count

    async def put(self, response_id: str, items: list, response: dict, *, owner: str = owners.SHARED,
                  expect: int | None = None) -> bool:
        data = json.dumps({"items": items, "response": response}, ensure_ascii=False, separators=(",", ":")).encode()
        if len(data) > self.max_bytes or self.ttl <= 0 or self.max_entries <= 0:
            return False
        script = self.state.script("put_response")
        produced, others = _item_ids(items, response)
        member = namespace(owner) + response_id
        count, size = await self.state.call("store a response", lambda c: script(args=[
            KEY_ROOT, member, data, produced, others, self.ttl, self.max_entries, self.max_bytes,
            "" if expect is None else expect]))
        if count < 0:
            return False  # (another version: the caller reads it again)
        self.count, self.bytes = count, size
        return True

    async def get(self, response_id: str, *, owner: str = owners.SHARED) -> dict | None:
        if not valid_id(response_id):
            return None  # (a client's id that names no key of ours: another owner's namespace is out of reach)
        key = f"{KEY_ROOT}{namespace(owner)}response:{response_id}"
        data, version = await self.state.call("read a stored response", lambda c: c.hmget(key, ["data", "v"]))
        return {**json.loads(data), "version": int(version or 1)} if data else None

    async def delete(self, response_id: str, *, owner: str = owners.SHARED) -> bool:
        if not valid_id(response_id):
            return False
        script = self.state.script("drop_response")
        member = namespace(owner) + response_id
        return bool(await self.state.call("delete a stored response", lambda c: script(args=[KEY_ROOT, member])))

    async def items(self, item_ids, *, owner: str = owners.SHARED) -> dict[str, dict]:
        """``item_reference`` ids -> the owner's stored items, as the gateway produced them
        (missing: absent), as store.ResponseStore's ``items``: where they are in one round
        trip, each response holding some read and decoded once however many it serves."""
        ids = list(dict.fromkeys(i for i in item_ids if valid_item_id(i)))
        if not ids:
            return {}
        ns = namespace(owner)
        holders = await self.state.call("look up items", lambda c: c.mget([f"{KEY_ROOT}{ns}item:{i}" for i in ids]))
        by_response: dict[str, list[str]] = {}
        for item_id, holder in zip(ids, holders):
            if holder:
                by_response.setdefault(holder.decode(), []).append(item_id)
        found: dict[str, dict] = {}
        for response_id, wanted in by_response.items():
            key = f"{KEY_ROOT}{ns}response:{response_id}"
            data, *digests = await self.state.call("read a stored response", lambda c, key=key, wanted=wanted: c.hmget(
                key, ["data", *(f"d:{i}" for i in wanted)]))
            if data:
                found.update(pick(json.loads(data), {i: d.decode() for i, d in zip(wanted, digests) if d}))
        return {i: found[i] for i in ids if i in found}


class RedisReplayCache(ReplayCounts):
    """The replay cache in Redis: store.py's ``Replays``."""

    def __init__(self, state: RedisState, capacity: int) -> None:
        self.state, self.capacity = state, capacity
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def resize(self, capacity: int) -> None:
        self.capacity = capacity  # the next put trims to it

    async def get(self, key: str) -> bytes | None:
        try:
            found = await self.state.call("replay cache lookup", lambda c: c.get(f"{KEY_ROOT}replay:{key}"))
        except StateUnavailable:
            found = None  # a miss: the backend answers
        return self.counted(found)

    async def put(self, key: str, entry: bytes) -> bool:
        if not self.takes(entry):
            return False
        script = self.state.script("put_replay")
        self.count = await self.state.call("replay cache write", lambda c: script(args=[KEY_ROOT, key, entry, self.capacity]))
        return True
